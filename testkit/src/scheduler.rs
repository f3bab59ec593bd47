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

use crate::{
    interpod::{self, Placed, PodConstraints},
    nodematch::{self, Resources},
};

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

/// How fast the scheduler may write. kube-scheduler's client is rate limited
/// (`--kube-api-qps`, `--kube-api-burst`), so a large burst of pods is bound or marked
/// Unschedulable over seconds; an unlimited scheduler marks it all at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct SchedulerOptions {
    /// Writes (bindings and status updates) per second; `None`: unlimited.
    pub api_qps: Option<f64>,
    /// Writes that may go at once before the rate applies.
    pub api_burst: u32,
}

impl SchedulerOptions {
    /// kube-scheduler's defaults: 50 writes a second, bursts of 100.
    pub fn kube_scheduler_pace() -> Self {
        Self {
            api_qps: Some(50.0),
            api_burst: 100,
        }
    }
}

/// A token bucket shared by the scheduler's writes.
struct Pacer {
    options: SchedulerOptions,
    state: tokio::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl Pacer {
    fn new(options: SchedulerOptions) -> Self {
        Self {
            options,
            state: tokio::sync::Mutex::new((
                f64::from(options.api_burst.max(1)),
                tokio::time::Instant::now(),
            )),
        }
    }

    async fn take(&self) {
        let Some(qps) = self.options.api_qps.filter(|q| *q > 0.0) else {
            return;
        };
        let burst = f64::from(self.options.api_burst.max(1));
        let mut state = self.state.lock().await;
        let (tokens, at) = &mut *state;
        let now = tokio::time::Instant::now();
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * qps).min(burst);
        *at = now;
        if *tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - *tokens) / qps);
            tokio::time::sleep(wait).await;
            *tokens = 1.0;
            *at = tokio::time::Instant::now();
        }
        *tokens -= 1.0;
    }
}

impl Scheduler {
    pub fn start(client: Client) -> Scheduler {
        Self::start_with(client, SchedulerOptions::default())
    }

    pub fn start_with(client: Client, options: SchedulerOptions) -> Scheduler {
        let pacer = Arc::new(Pacer::new(options));
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
                schedule_round(
                    &client,
                    &pods,
                    &nodes,
                    &mut reported,
                    &mut assumed,
                    recheck,
                    &pacer,
                )
                .await;
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
    pod: Arc<Pod>,
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
    pacer: &Pacer,
) {
    let nodes = nodes.state();
    let node_refs: Vec<&Node> = nodes.iter().map(|n| &**n).collect();
    let by_name: BTreeMap<String, Arc<Node>> =
        nodes.iter().map(|n| (n.name_any(), n.clone())).collect();
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
    // Pods on nodes, for the filters that look at other pods: bound, assumed, and bound
    // earlier in this round.
    let mut placed: Vec<(Arc<Pod>, Arc<Node>)> = all_pods
        .iter()
        .filter(|p| !is_terminal(p))
        .filter_map(|p| Some((p.clone(), by_name.get(node_name(p)?)?.clone())))
        .chain(
            assumed
                .values()
                .filter_map(|a| Some((a.pod.clone(), by_name.get(&a.node)?.clone()))),
        )
        .collect();
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
        // Only what can matter to this pod: every placed pod when it has inter-pod
        // constraints of its own, else those whose anti-affinity or host ports may.
        let own = interpod::has_own_constraints(pod);
        let relevant: Vec<Placed<'_>> = placed
            .iter()
            .filter(|(p, _)| own || interpod::constrains_others(p))
            .map(|(pod, node)| Placed { pod, node })
            .collect();
        let constraints = PodConstraints::for_pod(pod, &relevant, &node_refs);
        for node in nodes.iter() {
            let name = node.name_any();
            let node_used = used.get(&name).cloned().unwrap_or_default();
            // kube-scheduler's filter order: the first that fails names the reason.
            let verdict = nodematch::admits(pod, node)
                .and_then(|()| constraints.ports_fit(node))
                .and_then(|()| nodematch::resources_fit(pod, node, &node_used))
                .and_then(|()| constraints.placement_fits(node));
            match verdict {
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
                pacer.take().await;
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
                    if let Some(n) = by_name.get(&node) {
                        placed.push((pod.clone(), n.clone()));
                    }
                    assumed.insert(
                        key.clone(),
                        Assumed {
                            node,
                            pod: pod.clone(),
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
            pacer.take().await;
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
