//! The controller-manager parts the tests need: a DaemonSet controller (one pod per eligible
//! node, with the default DaemonSet tolerations), the node lifecycle controller's taints
//! (`not-ready`/`unreachable` by the Ready condition, `unschedulable` by the cordon), and
//! pod garbage collection (pods bound to a node that no longer exists are deleted).

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Node, Pod, Taint, Toleration},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, PostParams},
    runtime::reflector::Store,
};
use tokio::{sync::Notify, task::JoinHandle};

use crate::nodematch;

pub struct Controllers {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Controllers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The tolerations the DaemonSet controller adds to every DaemonSet pod.
pub fn daemonset_default_tolerations() -> Vec<Toleration> {
    let t = |key: &str, effect: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    };
    vec![
        t("node.kubernetes.io/not-ready", "NoExecute"),
        t("node.kubernetes.io/unreachable", "NoExecute"),
        t("node.kubernetes.io/disk-pressure", "NoSchedule"),
        t("node.kubernetes.io/memory-pressure", "NoSchedule"),
        t("node.kubernetes.io/pid-pressure", "NoSchedule"),
        t("node.kubernetes.io/unschedulable", "NoSchedule"),
    ]
}

impl Controllers {
    pub fn start(client: Client) -> Controllers {
        let notify = Arc::new(Notify::new());
        let (pods, t1) =
            crate::reflect::spawn_store(Api::<Pod>::all(client.clone()), Some(notify.clone()));
        let (nodes, t2) =
            crate::reflect::spawn_store(Api::<Node>::all(client.clone()), Some(notify.clone()));
        let (sets, t3) = crate::reflect::spawn_store(
            Api::<DaemonSet>::all(client.clone()),
            Some(notify.clone()),
        );
        let main = tokio::spawn(async move {
            let _ = tokio::join!(
                pods.wait_until_ready(),
                nodes.wait_until_ready(),
                sets.wait_until_ready()
            );
            loop {
                reconcile_node_taints(&client, &nodes).await;
                reconcile_daemonsets(&client, &pods, &nodes, &sets).await;
                collect_orphan_pods(&client, &pods, &nodes).await;
                tokio::select! {
                    _ = notify.notified() => tokio::time::sleep(Duration::from_millis(10)).await,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Controllers {
            tasks: vec![t1, t2, t3, main],
        }
    }
}

async fn reconcile_daemonsets(
    client: &Client,
    pods: &Store<Pod>,
    nodes: &Store<Node>,
    sets: &Store<DaemonSet>,
) {
    let pods = pods.state();
    for ds in sets.state() {
        let ns = ds.namespace().unwrap_or_default();
        let uid = ds.uid().unwrap_or_default();
        let have: BTreeSet<String> = pods
            .iter()
            .filter(|p| p.owner_references().iter().any(|o| o.uid == uid))
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        let Some(template) = ds.spec.as_ref().map(|s| s.template.clone()) else {
            continue;
        };
        for node in nodes.state() {
            let node_name = node.name_any();
            if have.contains(&node_name) || node.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let mut spec = template.spec.clone().unwrap_or_default();
            let mut tolerations = spec.tolerations.clone().unwrap_or_default();
            tolerations.extend(daemonset_default_tolerations());
            spec.tolerations = Some(tolerations);
            let mut pod = Pod {
                metadata: template.metadata.clone().unwrap_or_default(),
                spec: Some(spec),
                status: None,
            };
            // As the real controller: selectors, and every NoSchedule/NoExecute taint
            // tolerated (the defaults cover cordons and NoExecute not-ready, but not a new
            // node's not-ready:NoSchedule).
            let eligible = nodematch::selects_node(&pod, &node)
                && nodematch::untolerated_taint(&pod, &node).is_none();
            if !eligible {
                continue;
            }
            pod.metadata.name = Some(format!("{}-{}", ds.name_any(), short_hash(&node_name)));
            pod.metadata.namespace = Some(ns.clone());
            pod.metadata.owner_references = Some(vec![
                ds.controller_owner_ref(&()).expect("daemonset has a uid"),
            ]);
            if let Some(spec) = pod.spec.as_mut() {
                spec.node_name = Some(node_name.clone());
            }
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let _ = api.create(&PostParams::default(), &pod).await;
        }
    }
}

/// The taints the node lifecycle controller keeps on a node, by its Ready condition and
/// its cordon: (key, effect) pairs.
pub fn lifecycle_taints(node: &Node) -> BTreeSet<(&'static str, &'static str)> {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.as_str());
    let mut taints = BTreeSet::new();
    let key = match ready {
        Some("True") => None,
        Some("False") => Some(NOT_READY),
        Some(_) => Some(UNREACHABLE),
        // Not reported yet: admission's not-ready:NoSchedule stays.
        None => {
            taints.insert((NOT_READY, "NoSchedule"));
            None
        }
    };
    if let Some(key) = key {
        taints.insert((key, "NoSchedule"));
        taints.insert((key, "NoExecute"));
    }
    if node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
    {
        taints.insert((UNSCHEDULABLE, "NoSchedule"));
    }
    taints
}

const NOT_READY: &str = "node.kubernetes.io/not-ready";
const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
const UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

/// Puts the lifecycle taints on every node and takes off those that no longer apply. The
/// write carries the node's resourceVersion: a concurrent writer wins and the next pass
/// tries again, as with the real controller.
async fn reconcile_node_taints(client: &Client, nodes: &Store<Node>) {
    let api: Api<Node> = Api::all(client.clone());
    for node in nodes.state() {
        let want = lifecycle_taints(&node);
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let managed = |t: &Taint| [NOT_READY, UNREACHABLE, UNSCHEDULABLE].contains(&t.key.as_str());
        let have: BTreeSet<(String, String)> = taints
            .iter()
            .filter(|t| managed(t))
            .map(|t| (t.key.clone(), t.effect.clone()))
            .collect();
        let want_owned: BTreeSet<(String, String)> = want
            .iter()
            .map(|(k, e)| ((*k).to_owned(), (*e).to_owned()))
            .collect();
        if have == want_owned {
            continue;
        }
        let mut next: Vec<Taint> = taints.into_iter().filter(|t| !managed(t)).collect();
        let added = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
        next.extend(want.iter().map(|(key, effect)| Taint {
            key: (*key).into(),
            effect: (*effect).into(),
            time_added: (*effect == "NoExecute").then(|| added.clone()),
            value: None,
        }));
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": node.resource_version()},
            "spec": {"taints": next},
        });
        let _ = api
            .patch(
                &node.name_any(),
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(patch),
            )
            .await;
    }
}

async fn collect_orphan_pods(client: &Client, pods: &Store<Pod>, nodes: &Store<Node>) {
    let names: BTreeSet<String> = nodes.state().iter().map(|n| n.name_any()).collect();
    for pod in pods.state() {
        let Some(node) = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        if !names.contains(&node) {
            let api: Api<Pod> =
                Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
            let _ = api
                .delete(
                    &pod.name_any(),
                    &DeleteParams {
                        grace_period_seconds: Some(0),
                        ..Default::default()
                    },
                )
                .await;
        }
    }
}

fn short_hash(s: &str) -> String {
    let h = s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    format!("{:05x}", h & 0xfffff)
}
