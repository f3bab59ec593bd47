//! Scale-up (SPEC §6): collects unschedulable pods in a short batch window, asks
//! `pool::scaleup` which standby nodes to start, and starts them: node marked `starting`
//! (uncordoned, standby taint removed) first, then one StartInstances per pool.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    future::Future,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::reflector::Store,
};
use serde_json::json;

use super::{CachedPod, Context, instances::Change, nodepool::taints_out_of_standby};
use crate::{
    api::{NodePool, nodepool::STATE_LABEL},
    cloud::{InstanceState, parse_provider_id, tags},
    pool::{
        scaleup::{
            CandidateNode, PendingPod, PoolCandidate, PoolScaleUp, Resources, plan_scale_up,
        },
        state::NodeState,
    },
};

const IDLE: Duration = Duration::from_millis(100);
const MAX_WAIT: Duration = Duration::from_secs(1);

/// A Kubernetes quantity as a number (cores, bytes, counts).
pub(crate) fn pod_quantity(q: &str) -> f64 {
    quantity(q)
}

fn quantity(q: &str) -> f64 {
    let q = q.trim();
    let units: [(&str, f64); 10] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("n", 1e-9),
    ];
    for (u, f) in units {
        if let Some(n) = q.strip_suffix(u) {
            return n.parse::<f64>().unwrap_or(0.0) * f;
        }
    }
    q.parse().unwrap_or(0.0)
}

/// The scheduler's view of a pod's requests (SPEC §6).
pub fn pod_requests(pod: &Pod) -> Resources {
    let mut sum = Resources::new();
    let Some(spec) = &pod.spec else { return sum };
    let of = |c: &k8s_openapi::api::core::v1::Container| -> Resources {
        c.resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .map(|r| r.iter().map(|(k, v)| (k.clone(), quantity(&v.0))).collect())
            .unwrap_or_default()
    };
    for c in &spec.containers {
        for (k, v) in of(c) {
            *sum.entry(k).or_default() += v;
        }
    }
    for c in spec.init_containers.iter().flatten() {
        for (k, v) in of(c) {
            let e = sum.entry(k).or_default();
            *e = e.max(v);
        }
    }
    for (k, v) in spec.overhead.iter().flatten() {
        *sum.entry(k.clone()).or_default() += quantity(&v.0);
    }
    *sum.entry("pods".into()).or_default() += 1.0;
    sum
}

/// Unschedulable, unbound, not being deleted.
pub fn is_pending_unschedulable(pod: &Pod) -> bool {
    let unbound = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_none_or(str::is_empty);
    let pending = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
    let unschedulable = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter().any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
        });
    unbound && pending && unschedulable && pod.metadata.deletion_timestamp.is_none()
}

/// Since when a pod has been unschedulable (its PodScheduled=False transition).
fn pending_since(pod: &CachedPod) -> SystemTime {
    pod.pending_since.unwrap_or_else(SystemTime::now)
}

pub(crate) fn pending_pods(ctx: &Context) -> Vec<Arc<CachedPod>> {
    ctx.stores
        .pods
        .state()
        .into_iter()
        .filter(|p| p.unschedulable)
        .collect()
}

pub async fn run(ctx: Arc<Context>, pools: Store<NodePool>, shutdown: impl Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut reported: HashMap<String, Instant> = HashMap::new();
    // Pods a start was issued for: (pool, pending since), until they are scheduled.
    let mut served: HashMap<String, (String, SystemTime)> = HashMap::new();
    // When this process first saw each pending pod: condition timestamps have one-second
    // precision, too coarse for a decision that takes milliseconds.
    let mut seen: HashMap<String, SystemTime> = HashMap::new();
    loop {
        observe_scheduled(&ctx, &mut served);
        // Batch window: wait for the first pending pod, then until no new one arrives for
        // IDLE (at most MAX_WAIT), so a burst becomes one decision.
        let first_seen = loop {
            if !note_seen(&ctx, &mut seen).is_empty() {
                break Instant::now();
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        };
        let mut count = pending_pods(&ctx).len();
        while first_seen.elapsed() < MAX_WAIT {
            tokio::time::sleep(IDLE).await;
            let now = note_seen(&ctx, &mut seen).len();
            if now == count {
                break;
            }
            count = now;
        }
        let marked = scale_up_round(&ctx, &pools, &mut reported, &mut served, &seen).await;
        observe_scheduled(&ctx, &mut served);
        // The next round must see the nodes just marked `starting` as in-flight capacity,
        // or it would start more for the same pods: wait for the cache to show them
        // (bounded). With nothing started, pause briefly so unservable pods are not
        // re-planned in a hot loop.
        let pause = async {
            if marked.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            } else {
                wait_until_cached(&ctx, &marked, Duration::from_secs(2)).await;
            }
        };
        tokio::select! {
            _ = &mut shutdown => return,
            _ = pause => {}
        }
    }
}

/// Waits until the node cache shows every one of `nodes` as `starting` (or gone).
async fn wait_until_cached(ctx: &Context, nodes: &[String], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let behind = nodes.iter().any(|name| {
            ctx.stores
                .nodes
                .get(&kube::runtime::reflector::ObjectRef::new(name))
                .is_some_and(|n| {
                    n.labels().get(STATE_LABEL).map(String::as_str)
                        != Some(NodeState::Starting.as_str())
                })
        });
        if !behind || Instant::now() >= deadline {
            if behind {
                tracing::warn!("node cache still behind after a scale-up; planning anyway");
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The pending pods now, stamping the ones not seen before and forgetting the gone ones.
fn note_seen(ctx: &Context, seen: &mut HashMap<String, SystemTime>) -> Vec<Arc<CachedPod>> {
    let pods = pending_pods(ctx);
    let now = SystemTime::now();
    let keys: HashSet<String> = pods.iter().map(|p| pod_key(p)).collect();
    seen.retain(|k, _| keys.contains(k));
    for key in keys {
        seen.entry(key).or_insert(now);
    }
    pods
}

fn pod_key(pod: &CachedPod) -> String {
    pod.key()
}

pub(crate) fn node_free(node: &Node, pods_on_node: &[Arc<CachedPod>]) -> Resources {
    let mut free: Resources = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .map(|a| a.iter().map(|(k, v)| (k.clone(), quantity(&v.0))).collect())
        .unwrap_or_default();
    for pod in pods_on_node {
        if pod.finished() {
            continue;
        }
        for (k, v) in &pod.requests {
            *free.entry(k.clone()).or_default() -= v;
        }
    }
    free
}

/// Records pending → scheduled for the pods scale-up served, once they are bound.
fn observe_scheduled(ctx: &Context, served: &mut HashMap<String, (String, SystemTime)>) {
    if served.is_empty() {
        return;
    }
    let pods: HashMap<String, Arc<CachedPod>> = ctx
        .stores
        .pods
        .state()
        .into_iter()
        .map(|p| (pod_key(&p), p))
        .collect();
    served.retain(|key, (pool, since)| match pods.get(key) {
        None => false,
        Some(p) if p.node_name.is_some() => {
            let waited = SystemTime::now().duration_since(*since).unwrap_or_default();
            ctx.metrics.pod_scheduled(pool, waited);
            false
        }
        Some(_) => true,
    });
}

async fn scale_up_round(
    ctx: &Context,
    pools: &Store<NodePool>,
    reported: &mut HashMap<String, Instant>,
    served: &mut HashMap<String, (String, SystemTime)>,
    seen: &HashMap<String, SystemTime>,
) -> Vec<String> {
    let pods = pending_pods(ctx);
    if pods.is_empty() {
        return Vec::new();
    }
    let Ok((_, instances)) = ctx.instances.get().await else {
        return Vec::new();
    };
    let nodes_by_instance: HashMap<String, Arc<Node>> = ctx
        .stores
        .nodes
        .state()
        .into_iter()
        .filter_map(|n| {
            let id = n
                .spec
                .as_ref()?
                .provider_id
                .as_deref()
                .and_then(parse_provider_id)?
                .1
                .to_owned();
            Some((id, n))
        })
        .collect();
    let mut pods_by_node: HashMap<String, Vec<Arc<CachedPod>>> = HashMap::new();
    for pod in ctx.stores.pods.state() {
        if let Some(n) = pod.node_name.clone() {
            pods_by_node.entry(n).or_default().push(pod);
        }
    }
    let mut candidates = Vec::new();
    for pool in pools
        .state()
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let name = pool.name_any();
        let mut candidate = PoolCandidate {
            name: name.clone(),
            labels: pool.spec.template.labels.clone(),
            taints: pool.spec.template.taints.clone(),
            starting: vec![],
            standby: vec![],
        };
        for inst in instances
            .iter()
            .filter(|i| i.tag(tags::POOL) == Some(name.as_str()) && i.state.is_live())
        {
            let Some(node) = nodes_by_instance.get(&inst.id) else {
                continue;
            };
            let state = node
                .labels()
                .get(STATE_LABEL)
                .and_then(|s| NodeState::parse(s));
            let images: BTreeSet<String> = node
                .status
                .as_ref()
                .and_then(|s| s.images.as_ref())
                .map(|i| {
                    i.iter()
                        .flat_map(|i| i.names.clone().unwrap_or_default())
                        .collect()
                })
                .unwrap_or_default();
            let on_node = pods_by_node
                .get(&node.name_any())
                .map(Vec::as_slice)
                .unwrap_or_default();
            let cand = CandidateNode {
                instance_id: inst.id.clone(),
                node_name: node.name_any(),
                zone: inst.zone.clone(),
                labels: node.labels().clone(),
                free: node_free(node, on_node),
                images,
                last_used: node
                    .annotations()
                    .get(LAST_USED_ANNOTATION)
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .map(SystemTime::from),
            };
            // Only a fully stopped instance can be started: EC2 refuses one still stopping.
            let stopped = inst.state == crate::cloud::InstanceState::Stopped;
            match state {
                Some(NodeState::Starting) => candidate.starting.push(cand),
                // Running nodes' room counts too: a pod not yet placed there is about to be
                // (e.g. the startup taints are coming off), and must not start another node.
                Some(NodeState::Running) => candidate.starting.push(cand),
                Some(NodeState::Standby) if stopped => candidate.standby.push(cand),
                _ => {}
            }
        }
        candidates.push(candidate);
    }
    let pending: Vec<PendingPod> = pods
        .iter()
        .map(|p| PendingPod {
            key: pod_key(p),
            spec: p.scheduling.as_deref().cloned().unwrap_or_default(),
            requests: p.requests.clone(),
            images: p.images.iter().cloned().collect(),
        })
        .collect();
    let decision = plan_scale_up(&pending, &candidates);
    // Every pool's start goes out at once: one pool's bookkeeping never delays another's.
    let by_key: HashMap<String, &Arc<CachedPod>> = pods.iter().map(|p| (pod_key(p), p)).collect();
    let all_pools = pools.state();
    let results = futures::future::join_all(decision.pools.iter().filter_map(|scale| {
        let pool = all_pools
            .iter()
            .find(|p| p.name_any() == scale.pool)?
            .clone();
        (!scale.start.is_empty())
            .then(|| start_for_pool(ctx, scale, pool, &nodes_by_instance, &by_key, seen))
    }))
    .await;
    let mut marked = Vec::new();
    for (nodes, result) in results.into_iter().flatten() {
        marked.extend(nodes);
        served.extend(result);
    }
    // Pods nothing can serve: one event each, repeated at most every 10 minutes.
    reported.retain(|_, at| at.elapsed() < Duration::from_secs(600));
    for (key, why) in &decision.unserved {
        if reported.contains_key(key) {
            continue;
        }
        reported.insert(key.clone(), Instant::now());
        if let Some(pod) = pods.iter().find(|p| pod_key(p) == *key) {
            tracing::info!(pod = %key, reason = why.reason(), "no pool can serve this pod");
            ctx.publish(&**pod, true, why.reason(), why.message().to_owned())
                .await;
        }
    }
    marked
}

/// Marks the chosen standby nodes `starting`, starts their instances in one call, then
/// records metrics, tags, events and `lastScaleUp`. Returns the nodes marked `starting` and
/// the pods served (for the pending → scheduled metric), or `None` when nothing started.
async fn start_for_pool(
    ctx: &Context,
    scale: &PoolScaleUp,
    pool: Arc<NodePool>,
    nodes_by_instance: &HashMap<String, Arc<Node>>,
    pods: &HashMap<String, &Arc<CachedPod>>,
    seen: &HashMap<String, SystemTime>,
) -> Option<(Vec<String>, Vec<(String, (String, SystemTime))>)> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let marked = futures::future::join_all(scale.start.iter().filter_map(|id| {
        let node = nodes_by_instance.get(id)?;
        let taints = taints_out_of_standby(node);
        let patch = json!({
            "metadata": {
                "resourceVersion": node.resource_version(),
                "labels": {STATE_LABEL: NodeState::Starting.as_str()},
                "annotations": {LAST_USED_ANNOTATION: jiff::Timestamp::now().to_string()},
            },
            "spec": {"unschedulable": null, "taints": taints},
        });
        let api = api.clone();
        Some(async move {
            match api
                .patch(&node.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => Some((id.clone(), node.name_any())),
                Err(e) => {
                    tracing::warn!(pool = %scale.pool, node = %node.name_any(), error = %e, "could not mark the node starting");
                    None
                }
            }
        })
    }))
    .await;
    let (ids, node_names): (Vec<String>, Vec<String>) = marked.into_iter().flatten().unzip();
    if ids.is_empty() {
        return None;
    }
    let outcome = ctx.cloud.start_instances(&ids).await;
    for (id, e) in &outcome.failed {
        tracing::warn!(pool = %scale.pool, instance = %id, error = %e, "start failed");
    }
    let started = outcome.succeeded.len();
    let now = SystemTime::now();
    let mut latencies = Vec::new();
    let mut served = Vec::new();
    for key in &scale.pods {
        if let Some(p) = pods.get(key) {
            let since = pending_since(p);
            let decided_from = seen.get(key).copied().unwrap_or(since);
            latencies.push(now.duration_since(decided_from).unwrap_or_default());
            served.push((key.clone(), (scale.pool.clone(), since)));
        }
    }
    ctx.metrics
        .scale_up(&scale.pool, "standby", started, &latencies);
    if !outcome.succeeded.is_empty() {
        let tag = BTreeMap::from([(
            tags::STATE.to_owned(),
            NodeState::Starting.as_str().to_owned(),
        )]);
        ctx.instances
            .record(Change::State(&outcome.succeeded, InstanceState::Pending))
            .await;
        if ctx.cloud.set_tags(&outcome.succeeded, &tag).await.is_ok() {
            ctx.instances
                .record(Change::Tagged(&outcome.succeeded, &tag))
                .await;
        }
    }
    tracing::info!(pool = %scale.pool, nodes = started, pods = scale.pods.len(), instances = ?outcome.succeeded, "scale-up: started standby nodes");
    ctx.publish(
        &*pool,
        false,
        "ScaleUp",
        format!(
            "started {started} standby node(s) for {} pending pod(s)",
            scale.pods.len()
        ),
    )
    .await;
    for id in &outcome.succeeded {
        if let Some(node) = nodes_by_instance.get(id) {
            ctx.publish(
                &**node,
                false,
                "NodeStarted",
                format!(
                    "instance {id} started from standby for pool {} ({} pending pod(s) in this scale-up)",
                    scale.pool,
                    scale.pods.len()
                ),
            )
            .await;
        }
    }
    let body = json!({
        "apiVersion": "stratos.sh/v1alpha1", "kind": "NodePool",
        "status": {"lastScaleUp": {"time": jiff::Timestamp::now().to_string(), "nodes": started, "pods": scale.pods.len()}},
    });
    let api: Api<NodePool> = Api::all(ctx.client.clone());
    if let Err(e) = api
        .patch_status(
            &scale.pool,
            &PatchParams::apply("stratos-scaleup").force(),
            &Patch::Apply(&body),
        )
        .await
    {
        tracing::warn!(pool = %scale.pool, error = %e, "could not record lastScaleUp");
    }
    Some((node_names, served))
}

/// When a node was last started, for most-recently-used ordering.
pub const LAST_USED_ANNOTATION: &str = "stratos.sh/last-used";
