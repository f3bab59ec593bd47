//! Checks of SPEC §11's invariants while a test runs.
//!
//! Every FakeCloud call is observed *before* it takes effect, against reflector caches of
//! the cluster's NodePools, Nodes and Pods:
//!
//! - I1: a launch never takes a pool above its `poolSize`;
//! - I2: no start, stop or terminate of an instance without this cluster's tag and a pool
//!   tag (and no node of such an instance is cordoned, see [`Invariants::foreign_node`]);
//! - I3: no stop or termination of an instance whose node holds a pod that is not a
//!   DaemonSet pod, not a mirror pod and not finished — a pod in its termination grace
//!   period counts (Stratos' own image pre-pull pod aside).
//!
//! Violations are collected; [`Invariants::assert_held`] fails the test with all of them.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, Client, ResourceExt, runtime::reflector::Store};
use stratos::{
    api::NodePool,
    cloud::{
        fake::{FakeCloud, ObservedCall},
        ratelimit::Operation,
        tags,
    },
};
use tokio::task::JoinHandle;

/// A stop that found a workload pod in the (possibly lagging) cache; confirmed later.
#[derive(Debug, Clone)]
struct Suspect {
    message: String,
    namespace: String,
    pod: String,
    /// The API server's resourceVersion when the stop was issued.
    stop_rv: u64,
}

/// Reads the API server's current resourceVersion synchronously (embedded server only).
pub type ResourceVersionProbe = Arc<dyn Fn() -> u64 + Send + Sync>;

pub struct Invariants {
    violations: Arc<Mutex<Vec<String>>>,
    suspects: Arc<Mutex<Vec<Suspect>>>,
    tasks: Vec<JoinHandle<()>>,
    nodes: Store<Node>,
    pools: Store<NodePool>,
    foreign: Arc<Mutex<BTreeSet<String>>>,
}

impl Drop for Invariants {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Pods that must be gone before the node's instance may stop: evicted ones still running
/// in their grace period included (SPEC §11 I3).
pub fn blocks_stop(pod: &Pod) -> bool {
    let daemonset = pod
        .owner_references()
        .iter()
        .any(|o| o.kind == "DaemonSet" && o.controller == Some(true));
    let mirror = pod
        .annotations()
        .contains_key("kubernetes.io/config.mirror");
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    !daemonset && !mirror && !finished
}

impl Invariants {
    pub async fn start(
        client: Client,
        cloud: &FakeCloud,
        cluster: &str,
        probe: Option<ResourceVersionProbe>,
    ) -> Invariants {
        let (pools, t1) = crate::reflect::spawn_store(Api::<NodePool>::all(client.clone()), None);
        let (nodes, t2) = crate::reflect::spawn_store(Api::<Node>::all(client.clone()), None);
        let (pods, t3) = crate::reflect::spawn_store(Api::<Pod>::all(client.clone()), None);
        let _ = tokio::join!(
            pools.wait_until_ready(),
            nodes.wait_until_ready(),
            pods.wait_until_ready()
        );
        let violations: Arc<Mutex<Vec<String>>> = Arc::default();
        let suspects: Arc<Mutex<Vec<Suspect>>> = Arc::default();
        let (suspected, rv_probe) = (suspects.clone(), probe.clone());
        let cluster = cluster.to_owned();
        let (v, node_store, pool_store) = (violations.clone(), nodes.clone(), pools.clone());
        cloud.set_observer(Arc::new(move |call| {
            let mut found = Vec::new();
            match call {
                ObservedCall::Launch { request, live_in_pool } => {
                    let pool = request.tags.get(tags::POOL).cloned().unwrap_or_default();
                    if request.tags.get(tags::CLUSTER) != Some(&cluster) {
                        found.push(format!("I2: launch without this cluster's tag: {:?}", request.tags));
                    }
                    match pool_store.state().iter().find(|p| p.name_any() == pool) {
                        Some(p) => {
                            let cap = p.spec.pool_size.max(0) as usize;
                            if live_in_pool + request.count > cap {
                                found.push(format!(
                                    "I1: launch of {} into pool {pool} holding {live_in_pool} exceeds poolSize {cap}",
                                    request.count
                                ));
                            }
                        }
                        None => found.push(format!("I1: launch into pool {pool:?}, which does not exist")),
                    }
                }
                ObservedCall::Act { operation, targets } => {
                    for inst in &targets {
                        let owned = inst.tag(tags::CLUSTER) == Some(cluster.as_str()) && inst.tag(tags::POOL).is_some();
                        if !owned {
                            found.push(format!("I2: {} on {} which Stratos does not own (tags {:?})", operation.as_str(), inst.id, inst.tags));
                        }
                        if matches!(operation, Operation::StopInstances | Operation::TerminateInstances) {
                            let provider_id = inst.provider_id();
                            let node = node_store
                                .state()
                                .into_iter()
                                .find(|n| n.spec.as_ref().and_then(|s| s.provider_id.as_deref()) == Some(provider_id.as_str()));
                            if let Some(node) = node {
                                let name = node.name_any();
                                for pod in pods.state() {
                                    let on_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str());
                                    // Stratos' own image pre-pull pod warms the node; it is no workload.
                                    let prepull = pod.name_any().starts_with("stratos-prepull-");
                                    if on_node && !prepull && blocks_stop(&pod) {
                                        let verb = if operation == Operation::StopInstances { "stopping" } else { "terminating" };
                                        let message = format!(
                                            "I3: {verb} {} while its node {name} runs {}/{}",
                                            inst.id,
                                            pod.namespace().unwrap_or_default(),
                                            pod.name_any()
                                        );
                                        match &rv_probe {
                                            // The cache may lag: confirm against the server.
                                            Some(probe) => suspected.lock().unwrap().push(Suspect {
                                                message,
                                                namespace: pod.namespace().unwrap_or_default(),
                                                pod: pod.name_any(),
                                                stop_rv: probe(),
                                            }),
                                            None => found.push(message),
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            if !found.is_empty() {
                v.lock().unwrap().extend(found);
            }
        }));
        let foreign: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let (v, watched, foreign_nodes) = (violations.clone(), nodes.clone(), foreign.clone());
        let t4 = tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let names = foreign_nodes.lock().unwrap().clone();
                for node in watched
                    .state()
                    .iter()
                    .filter(|n| names.contains(&n.name_any()))
                {
                    let cordoned = node
                        .spec
                        .as_ref()
                        .and_then(|s| s.unschedulable)
                        .unwrap_or(false);
                    if cordoned {
                        let msg = format!(
                            "I2: node {} which Stratos does not own was cordoned",
                            node.name_any()
                        );
                        let mut v = v.lock().unwrap();
                        if !v.contains(&msg) {
                            v.push(msg);
                        }
                    }
                }
            }
        });
        let (v, verify_client, queue) = (violations.clone(), client.clone(), suspects.clone());
        let t5 = tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let pending: Vec<Suspect> = queue.lock().unwrap().clone();
                for s in pending {
                    let api: Api<Pod> = Api::namespaced(verify_client.clone(), &s.namespace);
                    let confirmed = match api.get_opt(&s.pod).await {
                        // Gone: deleted around the stop (the kubelet confirms evictions).
                        Ok(None) => false,
                        Ok(Some(pod)) => {
                            let rv: u64 = pod
                                .resource_version()
                                .and_then(|r| r.parse().ok())
                                .unwrap_or(u64::MAX);
                            // Still a workload, or it only stopped being one after the stop.
                            blocks_stop(&pod) || rv > s.stop_rv
                        }
                        Err(_) => continue,
                    };
                    if confirmed {
                        v.lock().unwrap().push(s.message.clone());
                    }
                    queue
                        .lock()
                        .unwrap()
                        .retain(|q| q.message != s.message || q.stop_rv != s.stop_rv);
                }
            }
        });
        Invariants {
            violations,
            suspects,
            tasks: vec![t1, t2, t3, t4, t5],
            nodes,
            pools,
            foreign,
        }
    }

    /// Waits until the checks see `generation` (or later) of a NodePool, so a test's own
    /// writes are never judged against a stale spec.
    pub async fn wait_for_pool(&self, name: &str, generation: i64) {
        for _ in 0..200 {
            let seen =
                self.pools.state().iter().any(|p| {
                    p.name_any() == name && p.metadata.generation.unwrap_or(0) >= generation
                });
            if seen {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the invariant checks never saw NodePool {name} generation {generation}");
    }

    /// Marks a node as not Stratos'; cordoning it is an I2 violation.
    pub fn foreign_node(&self, name: &str) {
        self.foreign.lock().unwrap().insert(name.to_owned());
    }

    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    /// Fails with every violation seen so far.
    /// Waits until suspected violations are confirmed or cleared.
    pub async fn settle(&self) {
        for _ in 0..100 {
            if self.suspects.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub async fn assert_held(&self) {
        self.settle().await;
        let v = self.violations();
        assert!(
            v.is_empty(),
            "SPEC §11 invariants violated:\n  {}",
            v.join("\n  ")
        );
    }

    /// The cached nodes (for diagnostics).
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.state()
    }
}
