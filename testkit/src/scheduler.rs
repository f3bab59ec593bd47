//! A minimal kube-scheduler: binds pending pods to Ready, schedulable nodes they fit, or
//! marks them `PodScheduled=False, reason=Unschedulable` with kube-scheduler's message.
//! It re-evaluates whenever pods or nodes change, and every second.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::reflector::Store,
};
use serde_json::json;
use tokio::{sync::Notify, task::JoinHandle};

use crate::nodematch::{self, Resources};

pub struct Scheduler {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn node_name(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

impl Scheduler {
    pub fn start(client: Client) -> Scheduler {
        let notify = Arc::new(Notify::new());
        let (pods, pod_task) =
            crate::reflect::spawn_store(Api::<Pod>::all(client.clone()), Some(notify.clone()));
        let (nodes, node_task) =
            crate::reflect::spawn_store(Api::<Node>::all(client.clone()), Some(notify.clone()));
        let main = tokio::spawn(async move {
            pods.wait_until_ready().await.ok();
            nodes.wait_until_ready().await.ok();
            let mut reported: BTreeMap<String, String> = BTreeMap::new();
            let mut assumed: BTreeMap<String, Assumed> = BTreeMap::new();
            // Like kube-scheduler's unschedulable queue: a pod already marked unschedulable
            // is retried when the nodes change, or once a second, not on every pod event.
            let mut last_nodes = 0u64;
            let mut last_full = std::time::Instant::now();
            loop {
                let fingerprint = nodes_fingerprint(&nodes);
                let recheck =
                    fingerprint != last_nodes || last_full.elapsed() >= Duration::from_secs(1);
                if recheck {
                    last_nodes = fingerprint;
                    last_full = std::time::Instant::now();
                }
                schedule_round(&client, &pods, &nodes, &mut reported, &mut assumed, recheck).await;
                tokio::select! {
                    _ = notify.notified() => tokio::time::sleep(Duration::from_millis(10)).await,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Scheduler {
            tasks: vec![pod_task, node_task, main],
        }
    }
}

/// Changes whenever a node is added, removed or updated.
fn nodes_fingerprint(nodes: &Store<Node>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut keys: Vec<(String, String)> = nodes
        .state()
        .iter()
        .map(|n| (n.name_any(), n.resource_version().unwrap_or_default()))
        .collect();
    keys.sort();
    keys.hash(&mut h);
    h.finish()
}

/// A binding made but not yet seen in the cache (kube-scheduler's "assumed" pods): its
/// requests count on the node until the cache shows the pod bound.
struct Assumed {
    node: String,
    requests: Resources,
    at: std::time::Instant,
}

async fn schedule_round(
    client: &Client,
    pods: &Store<Pod>,
    nodes: &Store<Node>,
    reported: &mut BTreeMap<String, String>,
    assumed: &mut BTreeMap<String, Assumed>,
    recheck: bool,
) {
    let nodes = nodes.state();
    let all_pods = pods.state();
    let mut used: BTreeMap<String, Resources> = BTreeMap::new();
    for pod in all_pods.iter().filter(|p| !is_terminal(p)) {
        if let Some(node) = node_name(pod) {
            let entry = used.entry(node.to_owned()).or_default();
            for (k, v) in nodematch::pod_requests(pod) {
                *entry.entry(k).or_default() += v;
            }
        }
    }
    // Bindings the cache has not caught up with yet still take room on their node.
    let key_of = |p: &Pod| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
    let bound: std::collections::HashSet<String> = all_pods
        .iter()
        .filter(|p| node_name(p).is_some())
        .map(|p| key_of(p))
        .collect();
    let unbound: std::collections::HashSet<String> = all_pods
        .iter()
        .filter(|p| node_name(p).is_none())
        .map(|p| key_of(p))
        .collect();
    assumed.retain(|key, a| {
        !bound.contains(key) && a.at.elapsed() < std::time::Duration::from_secs(30)
    });
    for a in assumed.values() {
        let entry = used.entry(a.node.clone()).or_default();
        for (k, v) in &a.requests {
            *entry.entry(k.clone()).or_default() += v;
        }
    }
    let mut pending: Vec<&Arc<Pod>> = all_pods
        .iter()
        .filter(|p| {
            node_name(p).is_none() && p.metadata.deletion_timestamp.is_none() && !is_terminal(p)
        })
        .filter(|p| {
            !assumed.contains_key(&format!(
                "{}/{}",
                p.namespace().unwrap_or_default(),
                p.name_any()
            ))
        })
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.scheduler_name.as_deref())
                .unwrap_or("default-scheduler")
                == "default-scheduler"
        })
        .collect();
    pending.sort_by_key(|p| {
        (
            p.metadata.creation_timestamp.clone().map(|t| t.0),
            p.name_any(),
        )
    });
    let mut unschedulable = Vec::new();
    for pod in pending {
        let ns = pod.namespace().unwrap_or_default();
        let key = format!("{ns}/{}", pod.name_any());
        if !recheck && reported.contains_key(&key) {
            continue;
        }
        let mut misfits = Vec::new();
        let mut best: Option<(f64, String)> = None;
        for node in nodes.iter() {
            let name = node.name_any();
            let node_used = used.get(&name).cloned().unwrap_or_default();
            match nodematch::fits(pod, node, &node_used) {
                Ok(()) => {
                    // LeastAllocated on CPU, ties broken by name.
                    let cpu = nodematch::allocatable(node)
                        .get("cpu")
                        .copied()
                        .unwrap_or(1.0)
                        .max(1e-9);
                    let score = node_used.get("cpu").copied().unwrap_or(0.0) / cpu;
                    if best
                        .as_ref()
                        .is_none_or(|(s, n)| score < *s || (score == *s && name < *n))
                    {
                        best = Some((score, name));
                    }
                }
                Err(m) => misfits.push(m),
            }
        }
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        match best {
            Some((_, node)) => {
                let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod.name_any()}, "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
                let bound = api
                    .create_subresource::<serde_json::Value, serde_json::Value>(
                        "binding",
                        &pod.name_any(),
                        &PostParams::default(),
                        &binding,
                    )
                    .await;
                if bound.is_ok() {
                    let requests = nodematch::pod_requests(pod);
                    let entry = used.entry(node.clone()).or_default();
                    for (k, v) in &requests {
                        *entry.entry(k.clone()).or_default() += v;
                    }
                    assumed.insert(
                        key.clone(),
                        Assumed {
                            node,
                            requests,
                            at: std::time::Instant::now(),
                        },
                    );
                    reported.remove(&key);
                }
            }
            None => {
                let message = nodematch::unschedulable_message(nodes.len(), &misfits);
                if reported.get(&key) == Some(&message) {
                    continue;
                }
                unschedulable.push((api, pod.name_any(), key, message));
            }
        }
    }
    // Like kube-scheduler, status updates go out concurrently, after the decisions.
    let updates = futures::stream::iter(unschedulable)
        .map(|(api, name, key, message)| async move {
            let patch = json!({"status": {"conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": message, "lastProbeTime": null,
                "lastTransitionTime": crate::apiserver::now(),
            }]}});
            let ok = api
                .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
                .is_ok();
            ok.then_some((key, message))
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    reported.extend(updates.into_iter().flatten());
    reported.retain(|k, _| unbound.contains(k));
}
