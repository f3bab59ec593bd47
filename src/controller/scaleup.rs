//! Scale-up (SPEC §6), the executor of [`plan_scale_up`]: it batches unschedulable pods as
//! a group commit, builds one snapshot of every pool from the caches, asks the one pure
//! decision, and acts on it — the chosen standby nodes marked `starting` and started in one
//! StartInstances call for all pools, the launches and hand-overs handed to the pools'
//! reconciles, the pods nothing can serve told why. It decides nothing itself.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    future::Future,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::core::v1::{Node, PodSpec};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::reflector::Store,
};
use serde_json::json;

use super::{CachedPod, Context, instances::Change, nodepool};
use crate::{
    api::{
        NodePool,
        nodepool::{POOL_LABEL, STATE_LABEL},
    },
    cloud::{Instance, InstanceState, parse_provider_id, tags},
    pool::{
        placement::{PlacedPod, PodPlacement, ZONE},
        quantity::{self, Resources},
        scaleup::{CandidateNode, Cluster, PendingPod, PoolCandidate, ScaleUp, plan_scale_up},
        state::NodeState,
    },
};

pub use crate::contract::LAST_USED as LAST_USED_ANNOTATION;

/// The idle gap that ends a batch: pods the scheduler marks within it join the decision.
const IDLE_GAP: Duration = Duration::from_millis(20);
/// A batch never waits longer than this for its gap.
const MAX_GATHER: Duration = Duration::from_millis(100);
/// With pods still pending, decide again at least this often (a launch that failed, a
/// start back-off that ended, a pool that changed).
const RESYNC: Duration = Duration::from_secs(2);
/// While a decision waits on launched or warming nodes, how often it follows their changes.
const FOLLOW_NODES: Duration = Duration::from_millis(200);
/// How soon to look again at a chosen standby instance that was still stopping.
const STOP_RECHECK: Duration = Duration::from_millis(250);
/// How long a start of this process counts even where the node cache does not show it.
const CACHE_CATCH_UP: Duration = Duration::from_secs(30);
/// A standby instance that failed to start is not chosen again for this long.
const START_BACKOFF: Duration = Duration::from_secs(120);
/// Pods served by a start are not counted again until their node has been running and
/// schedulable this long (kube-scheduler retries on the node's update)…
const SETTLE: Duration = Duration::from_secs(15);
/// …or this long after the start, whatever happened.
const IN_FLIGHT_LIMIT: Duration = Duration::from_secs(180);

/// What this process remembers between rounds (all of it reconstructible: a restarted
/// operator counts `starting` nodes as room instead).
#[derive(Default)]
struct Memory {
    /// Pods a start served: (node, when decided, when first seen running+schedulable).
    in_flight: HashMap<String, InFlight>,
    /// Instances whose start failed, until when they are left out.
    backoff: HashMap<String, Instant>,
    /// Instances this process started, and when: `starting` even before the node cache
    /// shows the label (a decision moments later must not see them as standby, nor lose
    /// their room).
    started: HashMap<String, Instant>,
    /// When this process first saw each pending pod (condition times have one-second
    /// precision, too coarse for a decision that takes milliseconds).
    seen: HashMap<String, SystemTime>,
    /// Pods told that nothing can serve them, and when (one event per 10 minutes).
    reported: HashMap<String, Instant>,
    /// Pods served, for the pending → scheduled metric: (pool, pending since).
    served: HashMap<String, (String, SystemTime)>,
    /// The last decision waits on launches or warming nodes: decide again as nodes change
    /// (a warm node must be handed over before it goes to standby).
    awaiting_nodes: bool,
}

struct InFlight {
    node: String,
    requests: Resources,
    at: Instant,
    settled_since: Option<Instant>,
}

pub async fn run(ctx: Arc<Context>, pools: Store<NodePool>, shutdown: impl Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut memory = Memory::default();
    let mut last_round = Instant::now();
    loop {
        // Wait for a pending pod not decided yet (woken by pod changes), or resync while
        // some remain.
        loop {
            observe_scheduled(&ctx, &mut memory);
            let pending = note_seen(&ctx, &mut memory);
            if pending == 0 {
                // Nothing pending: no pool is wanted any more (its empty nodes may go).
                publish_demand(&ctx, &ScaleUp::default());
            }
            let since_round = SystemTime::now() - last_round.elapsed();
            let undecided = memory.seen.values().any(|t| *t >= since_round);
            let follow_nodes = memory.awaiting_nodes && last_round.elapsed() >= FOLLOW_NODES;
            if pending > 0 && (undecided || follow_nodes || last_round.elapsed() >= RESYNC) {
                break;
            }
            tokio::select! {
                _ = &mut shutdown => {
                    publish_demand(&ctx, &ScaleUp::default());
                    return;
                }
                _ = ctx.pods_changed.notified() => {}
                _ = tokio::time::sleep(RESYNC) => {}
            }
        }
        // Group commit: wait for an idle gap, so pods the scheduler marks together are
        // decided together; pods that arrive while this round's calls are in flight are
        // decided as soon as they return.
        let gather = Instant::now();
        let mut count = memory.seen.len();
        while gather.elapsed() < MAX_GATHER {
            tokio::time::sleep(IDLE_GAP).await;
            note_seen(&ctx, &mut memory);
            if memory.seen.len() == count {
                break;
            }
            count = memory.seen.len();
        }
        last_round = Instant::now();
        let again = scale_up_round(&ctx, &pools, &mut memory).await;
        if again {
            // A start failed: decide again at once, without the failed instances.
            last_round = Instant::now() - RESYNC;
        }
    }
}

/// Stamps the pending pods not seen before and forgets the gone ones; returns how many.
fn note_seen(ctx: &Context, memory: &mut Memory) -> usize {
    let now = SystemTime::now();
    let keys: HashSet<String> = ctx
        .stores
        .pods
        .state()
        .iter()
        .filter(|p| p.unschedulable)
        .map(|p| p.key())
        .collect();
    memory.seen.retain(|k, _| keys.contains(k));
    for key in &keys {
        memory.seen.entry(key.clone()).or_insert(now);
    }
    keys.len()
}

/// Records pending → scheduled for the pods scale-up served, once they are bound.
fn observe_scheduled(ctx: &Context, memory: &mut Memory) {
    if memory.served.is_empty() {
        return;
    }
    // A lookup per served pod, not a map of every pod: this runs on every pod change.
    let pod = |key: &str| {
        let (ns, name) = key.split_once('/')?;
        ctx.stores
            .pods
            .get(&kube::runtime::reflector::ObjectRef::new(name).within(ns))
    };
    memory.served.retain(|key, (pool, since)| match pod(key) {
        None => false,
        Some(p) if p.node_name.is_some() => {
            let waited = SystemTime::now().duration_since(*since).unwrap_or_default();
            ctx.metrics.pod_scheduled(pool, waited);
            false
        }
        Some(_) => true,
    });
}

/// Allocatable less the requests of the pods on the node (finished ones aside; and, for a
/// stopped node, those being deleted: its kubelet removes them as it boots).
pub(crate) fn node_free(
    node: &Node,
    pods_on_node: &[Arc<CachedPod>],
    stopped: bool,
) -> Option<Resources> {
    let allocatable = node.status.as_ref()?.allocatable.as_ref()?;
    let mut free = quantity::parse_all(allocatable.iter().map(|(k, v)| (k, v.0.as_str()))).ok()?;
    let holds = |p: &&Arc<CachedPod>| {
        let gone_at_boot = stopped && p.metadata.deletion_timestamp.is_some();
        !p.finished() && !gone_at_boot
    };
    for pod in pods_on_node.iter().filter(holds) {
        if let Some(r) = &pod.requests {
            quantity::take(&mut free, r);
        }
    }
    Some(free)
}

fn node_of_instance(node: &Node) -> Option<String> {
    let id = node
        .spec
        .as_ref()?
        .provider_id
        .as_deref()
        .and_then(parse_provider_id)?
        .1;
    Some(id.to_owned())
}

/// The zone the pod's bound zonal volumes pin it to (claim → volume → node affinity).
fn claimed_zone(ctx: &Context, namespace: Option<&str>, spec: &PodSpec) -> Option<String> {
    use kube::runtime::reflector::ObjectRef;
    let ns = namespace.unwrap_or("default");
    spec.volumes.iter().flatten().find_map(|v| {
        let claim = v.persistent_volume_claim.as_ref()?;
        let pvc = ctx
            .stores
            .claims
            .get(&ObjectRef::new(&claim.claim_name).within(ns))?;
        let bound = pvc.spec.as_ref()?.volume_name.as_deref()?;
        let pv = ctx.stores.volumes.get(&ObjectRef::new(bound))?;
        crate::pool::placement::volume_zone(&pv)
    })
}

/// Whether the node turned Ready less than [`SETTLE`] ago.
fn just_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
        .and_then(|c| c.last_transition_time.as_ref())
        .and_then(|t| SystemTime::now().duration_since(SystemTime::from(t.0)).ok())
        .is_some_and(|age| age < SETTLE)
}

/// A cordon, or a taint that is neither the pool's nor one coming off by itself (startup,
/// node lifecycle): something other than room keeps pods off this node.
fn kept_off(node: &Node, pool: &NodePool) -> bool {
    let spec = node.spec.clone().unwrap_or_default();
    let known = |key: &str| {
        key.starts_with("node.kubernetes.io/")
            || pool.spec.template.taints.iter().any(|t| t.key == key)
            || pool
                .spec
                .template
                .startup_taints
                .iter()
                .any(|t| t.key == key)
    };
    spec.unschedulable == Some(true)
        || spec
            .taints
            .unwrap_or_default()
            .iter()
            .any(|t| !known(&t.key))
}

fn zone_of(node: &Node) -> Option<String> {
    node.labels().get(ZONE).cloned()
}

/// The snapshot of one round: every pool's candidates, the pending pods, the pods that
/// constraints count, from the caches and one instance listing.
struct Snapshot {
    pods: Vec<PendingPod>,
    pools: Vec<PoolCandidate>,
    cluster: Cluster,
    nodes_by_instance: HashMap<String, Arc<Node>>,
    pool_objects: BTreeMap<String, Arc<NodePool>>,
}

fn gather(
    ctx: &Context,
    pools: &Store<NodePool>,
    instances: &[Instance],
    memory: &mut Memory,
) -> Snapshot {
    let nodes = ctx.stores.nodes.state();
    let nodes_by_instance: HashMap<String, Arc<Node>> = nodes
        .iter()
        .filter_map(|n| Some((node_of_instance(n)?, n.clone())))
        .collect();
    let nodes_by_name: HashMap<String, Arc<Node>> =
        nodes.iter().map(|n| (n.name_any(), n.clone())).collect();
    let all_pods = ctx.stores.pods.state();
    let mut pods_by_node: HashMap<String, Vec<Arc<CachedPod>>> = HashMap::new();
    for pod in &all_pods {
        if let Some(n) = &pod.node_name {
            pods_by_node.entry(n.clone()).or_default().push(pod.clone());
        }
    }

    // Pods a start served stay out until their node had its chance.
    let now = Instant::now();
    let unschedulable: HashSet<String> = all_pods
        .iter()
        .filter(|p| p.unschedulable)
        .map(|p| p.key())
        .collect();
    memory.in_flight.retain(|key, f| {
        let node = nodes_by_name.get(&f.node);
        let settled = node.is_some_and(|n| {
            n.labels().get(STATE_LABEL).map(String::as_str) == Some(NodeState::Running.as_str())
                && n.spec.as_ref().and_then(|s| s.unschedulable) != Some(true)
        });
        if settled {
            f.settled_since.get_or_insert(now);
        }
        unschedulable.contains(key)
            && node.is_some()
            && now.duration_since(f.at) < IN_FLIGHT_LIMIT
            && f.settled_since
                .is_none_or(|s| now.duration_since(s) < SETTLE)
    });
    memory.backoff.retain(|_, until| *until > now);
    memory
        .started
        .retain(|_, at| now.duration_since(*at) < CACHE_CATCH_UP);

    let pending: Vec<PendingPod> = all_pods
        .iter()
        .filter(|p| p.unschedulable && !memory.in_flight.contains_key(&p.key()))
        .map(|p| {
            let spec = p.scheduling.as_deref().cloned().unwrap_or_default();
            let volume_zone = claimed_zone(ctx, p.metadata.namespace.as_deref(), &spec);
            PendingPod {
                key: p.key(),
                placement: PodPlacement::new(
                    p.metadata.namespace.as_deref().unwrap_or("default"),
                    (*p.labels).clone(),
                    &spec,
                ),
                spec,
                requests: p.requests.clone(),
                images: p.images.iter().cloned().collect(),
                volume_zone,
            }
        })
        .collect();

    // The pods already on nodes that constraints look at: all of them when some pending
    // pod has inter-pod constraints of its own, else those that keep others away.
    let own = pending.iter().any(|p| p.placement.has_own_constraints());
    let cluster = Cluster {
        placed: all_pods
            .iter()
            .filter(|p| !p.finished())
            .filter(|p| own || !p.anti_affinity.is_empty() || !p.host_ports.is_empty())
            .filter_map(|p| {
                let node = p.node_name.as_ref()?;
                Some(PlacedPod {
                    namespace: p.metadata.namespace.clone().unwrap_or_default(),
                    labels: (*p.labels).clone(),
                    node: node.clone(),
                    zone: nodes_by_name.get(node).and_then(|n| zone_of(n)),
                    anti_affinity: p.anti_affinity.clone(),
                    host_ports: p.host_ports.clone(),
                })
            })
            .collect(),
        zones: nodes.iter().filter_map(|n| zone_of(n)).collect(),
    };

    let mut candidates = Vec::new();
    let mut pool_objects = BTreeMap::new();
    for pool in pools.state() {
        if pool.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = pool.name_any();
        let mut labels = pool.spec.template.labels.clone();
        labels.insert(POOL_LABEL.into(), name.clone());
        let class = nodepool::class_of(&pool.spec, ctx);
        let instance_type = class.as_ref().map(|(c, _)| c.spec.instance_type.clone());
        let members: Vec<&Instance> = instances
            .iter()
            .filter(|i| i.tag(tags::POOL) == Some(name.as_str()) && i.state.is_live())
            .collect();
        let allocatable = |n: &Node| {
            let a = n.status.as_ref()?.allocatable.as_ref()?;
            quantity::parse_all(a.iter().map(|(k, v)| (k, v.0.as_str()))).ok()
        };
        // A new node's size: one of the pool's own, else any node of its instance type.
        let node_size = members
            .iter()
            .filter_map(|i| nodes_by_instance.get(&i.id))
            .find_map(|n| allocatable(n))
            .or_else(|| {
                let t = instance_type.as_ref()?;
                nodes.iter().find_map(|n| {
                    (n.labels().get("node.kubernetes.io/instance-type") == Some(t))
                        .then(|| allocatable(n))
                        .flatten()
                })
            });
        let mut zones: Vec<String> = class
            .as_ref()
            .and_then(|(c, _)| c.status.as_ref())
            .map(|s| s.subnets.iter().map(|s| s.zone.clone()).collect())
            .unwrap_or_default();
        zones.sort();
        zones.dedup();
        // Warm nodes go straight to pods only if the user data will not power them off.
        let hands_over = !class
            .as_ref()
            .and_then(|(c, _)| c.spec.user_data.as_deref())
            .is_some_and(crate::pool::bootstrap::powers_off);
        let mut candidate = PoolCandidate {
            name: name.clone(),
            hands_over,
            labels: labels.clone(),
            taints: pool.spec.template.taints.clone(),
            // I1: instances still shutting down count against poolSize too.
            launch_room: (pool.spec.pool_size.max(0) as usize).saturating_sub(
                instances
                    .iter()
                    .filter(|i| {
                        i.tag(tags::POOL) == Some(name.as_str())
                            && i.state != InstanceState::Terminated
                    })
                    .count(),
            ),
            node_size: node_size.clone(),
            zones,
            ..Default::default()
        };
        for inst in members {
            let node = nodes_by_instance.get(&inst.id);
            let state = node
                .and_then(|n| n.labels().get(STATE_LABEL))
                .and_then(|s| NodeState::parse(s));
            let mut free = match node {
                Some(n) => node_free(
                    n,
                    pods_by_node
                        .get(&n.name_any())
                        .map(Vec::as_slice)
                        .unwrap_or_default(),
                    matches!(inst.state, InstanceState::Stopped | InstanceState::Stopping),
                ),
                None => node_size.clone(),
            };
            // Room promised to pods a start served is not offered again.
            if let (Some(n), Some(free)) = (node, free.as_mut()) {
                let name = n.name_any();
                for f in memory.in_flight.values().filter(|f| f.node == name) {
                    quantity::take(free, &f.requests);
                }
            }
            let mut node_labels = node.map(|n| n.labels().clone()).unwrap_or_default();
            node_labels.extend(labels.clone());
            let cand = CandidateNode {
                instance_id: inst.id.clone(),
                node_name: node
                    .map(|n| n.name_any())
                    .unwrap_or_else(|| inst.id.clone()),
                zone: inst.zone.clone(),
                labels: node_labels,
                free,
                images: node
                    .and_then(|n| n.status.as_ref()?.images.as_ref())
                    .map(|i| {
                        i.iter()
                            .flat_map(|i| i.names.clone().unwrap_or_default())
                            .collect()
                    })
                    .unwrap_or_default(),
                last_used: node
                    .and_then(|n| n.annotations().get(LAST_USED_ANNOTATION))
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .map(SystemTime::from),
                stopping: inst.state != InstanceState::Stopped,
            };
            let just_started =
                memory.started.contains_key(&inst.id) && state != Some(NodeState::Running);
            match (state, inst.state) {
                (Some(NodeState::Starting), _) => candidate.starting.push(cand),
                // Ready moments ago: kube-scheduler has not had its chance yet (it retries
                // refused pods with a back-off of up to 10 s), so its room is still coming —
                // unless someone else's taint or a cordon keeps pods off it.
                (Some(NodeState::Running), _)
                    if node.is_some_and(|n| just_ready(n) && !kept_off(n, &pool)) =>
                {
                    candidate.starting.push(cand)
                }
                _ if just_started => candidate.starting.push(cand),
                (Some(NodeState::Standby), InstanceState::Stopped)
                    if !memory.backoff.contains_key(&inst.id) =>
                {
                    candidate.standby.push(cand)
                }
                // On its way into standby (still stopping, or the stop not yet in the
                // listing): room, started once stopped (EC2 refuses it before).
                (Some(NodeState::Standby), _) if !memory.backoff.contains_key(&inst.id) => {
                    candidate.standby.push(CandidateNode {
                        stopping: true,
                        ..cand
                    })
                }
                // Launched, registering, warming, or powered off mid-warmup (to be resumed):
                // capacity on its way.
                (None | Some(NodeState::Warmup), _) => candidate.warming.push(cand),
                // Running nodes are never room: kube-scheduler already refused the pods.
                _ => {}
            }
        }
        pool_objects.insert(name, pool.clone());
        candidates.push(candidate);
    }
    Snapshot {
        pods: pending,
        pools: candidates,
        cluster,
        nodes_by_instance,
        pool_objects,
    }
}

/// One decision and its execution. Returns whether to decide again at once.
async fn scale_up_round(ctx: &Context, pools: &Store<NodePool>, memory: &mut Memory) -> bool {
    let round = Instant::now();
    let Ok((_, instances)) = ctx.instances.get().await else {
        return false;
    };
    let decide = Instant::now();
    let snap = gather(ctx, pools, &instances, memory);
    // Pools whose nodes in-flight pods wait for stay wanted: their empty nodes must not be
    // drained before the pods land.
    let in_flight_pools: BTreeSet<String> = memory
        .in_flight
        .values()
        .filter_map(|f| {
            ctx.stores
                .nodes
                .get(&kube::runtime::reflector::ObjectRef::new(&f.node))
        })
        .filter_map(|n| n.labels().get(POOL_LABEL).cloned())
        .collect();
    if snap.pods.is_empty() {
        memory.awaiting_nodes = false;
        let idle = ScaleUp {
            wanted: in_flight_pools,
            ..Default::default()
        };
        publish_demand(ctx, &idle);
        return false;
    }
    let mut decision = plan_scale_up(&snap.pods, &snap.pools, &snap.cluster);
    let deciding = decide.elapsed();
    decision.wanted.extend(in_flight_pools);
    memory.awaiting_nodes = decision.pools.iter().any(|p| p.launch > 0 || p.handoff > 0)
        || decision.placements.iter().any(|(_, node)| {
            snap.pools
                .iter()
                .any(|p| p.warming.iter().any(|w| w.node_name == *node))
        });
    tracing::debug!(
        pending = snap.pods.len(),
        in_flight = memory.in_flight.len(),
        starts = ?decision.starts(),
        launches = ?decision.pools.iter().filter(|p| p.launch > 0).map(|p| (&p.pool, p.launch)).collect::<Vec<_>>(),
        unserved = ?decision.unserved.iter().map(|(k, r)| (k, r.reason())).collect::<Vec<_>>(),
        "scale-up decision"
    );
    publish_demand(ctx, &decision);
    let failed = start_all(ctx, &snap, &decision, memory).await;
    report_unserved(ctx, &decision, memory).await;
    ctx.metrics.round("scaleup", round.elapsed(), deciding);
    if !decision.awaiting_stop.is_empty() {
        // Chosen nodes are still stopping: look again shortly, with a fresh listing.
        tokio::time::sleep(STOP_RECHECK).await;
        ctx.instances.invalidate().await;
        return true;
    }
    failed
}

/// What each pool's reconcile launches and hands over for pending pods.
fn publish_demand(ctx: &Context, decision: &ScaleUp) {
    let mut demand = ctx.demand.lock().expect("demand lock");
    let before = demand.clone();
    demand.clear();
    for pool in &decision.wanted {
        demand.entry(pool.clone()).or_default().wanted = true;
    }
    for p in &decision.pools {
        let d = demand.entry(p.pool.clone()).or_default();
        d.launch = p.launch;
        d.handoff = p.handoff;
    }
    if *demand != before {
        ctx.pools_changed.notify_one();
    }
}

/// Marks every chosen node `starting`, starts all of them in ONE call, and records what
/// succeeded. A failed instance goes back to standby, out of the choice for a while.
/// Returns whether some start failed or a node could not be marked for conflicts (decide
/// again at once).
async fn start_all(
    ctx: &Context,
    snap: &Snapshot,
    decision: &ScaleUp,
    memory: &mut Memory,
) -> bool {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let pool_of: HashMap<&str, &str> = decision
        .pools
        .iter()
        .flat_map(|p| p.start.iter().map(|id| (id.as_str(), p.pool.as_str())))
        .collect();
    let marks = futures::future::join_all(decision.starts().into_iter().filter_map(|id| {
        let node = snap.nodes_by_instance.get(&id)?.clone();
        let patch = |n: &Node| {
            Some(json!({
                "metadata": {
                    "labels": {STATE_LABEL: NodeState::Starting.as_str()},
                    "annotations": {LAST_USED_ANNOTATION: jiff::Timestamp::now().to_string()},
                },
                "spec": {"unschedulable": null, "taints": nodepool::taints_out_of_standby(n)},
            }))
        };
        Some(async move {
            match nodepool::patch_node(ctx, &node, patch).await {
                Ok(_) => Ok(id),
                Err(e) => {
                    let class = super::retry::classify(&e);
                    tracing::warn!(node = %node.name_any(), error = %e, ?class, "could not mark the node starting");
                    Err(class)
                }
            }
        })
    }))
    .await;
    // Others kept changing a node even across fresh reads: decide again at once rather
    // than at the next resync (a conflict is no reason to wait).
    let conflicted = marks.contains(&Err(super::retry::ErrorClass::Conflict));
    let ids: Vec<String> = marks.into_iter().filter_map(Result::ok).collect();
    if ids.is_empty() {
        return conflicted;
    }
    for id in &ids {
        ctx.marked_starting(id);
    }
    let outcome = ctx.cloud.start_instances(&ids).await;
    let mut any_failed = false;
    for (id, e) in &outcome.failed {
        any_failed = true;
        memory
            .backoff
            .insert(id.clone(), Instant::now() + START_BACKOFF);
        let pool = pool_of.get(id.as_str()).copied().unwrap_or_default();
        tracing::warn!(pool, instance = %id, error = %e, "start failed; back to standby, deciding again without it");
        if let Some(node) = snap.nodes_by_instance.get(id) {
            back_to_standby(&api, snap.pool_objects.get(pool).map(|p| &**p), node).await;
            ctx.unmarked_starting(id);
            let note = format!(
                "instance {id} could not start: {e}; it stays in standby for {}s and the pods are decided again",
                START_BACKOFF.as_secs()
            );
            ctx.publish(&**node, true, "StartFailed", note.clone())
                .await;
            if let Some(p) = snap.pool_objects.get(pool) {
                ctx.publish(&**p, true, "StartFailed", note).await;
            }
        }
    }
    for id in &outcome.succeeded {
        memory.started.insert(id.clone(), Instant::now());
    }
    if !outcome.succeeded.is_empty() {
        ctx.instances
            .record(Change::State(&outcome.succeeded, InstanceState::Pending))
            .await;
        let tag = BTreeMap::from([(
            tags::STATE.to_owned(),
            NodeState::Starting.as_str().to_owned(),
        )]);
        if ctx.cloud.set_tags(&outcome.succeeded, &tag).await.is_ok() {
            ctx.instances
                .record(Change::Tagged(&outcome.succeeded, &tag))
                .await;
        }
    }
    let started: BTreeSet<&str> = outcome.succeeded.iter().map(String::as_str).collect();
    remember_in_flight(snap, decision, memory, &started);
    record_starts(ctx, snap, decision, memory, &started).await;
    any_failed || conflicted
}

/// Pods placed on a node that is starting (or was just started) are in flight: they are
/// not counted again, and the room promised to them is not offered again, until the node
/// had its chance to take them.
fn remember_in_flight(
    snap: &Snapshot,
    decision: &ScaleUp,
    memory: &mut Memory,
    started: &BTreeSet<&str>,
) {
    let starting: HashSet<String> = snap
        .pools
        .iter()
        .flat_map(|p| p.starting.iter().map(|n| n.node_name.clone()))
        .chain(
            started
                .iter()
                .filter_map(|id| snap.nodes_by_instance.get(*id).map(|n| n.name_any())),
        )
        .collect();
    let pods: HashMap<&str, &PendingPod> = snap.pods.iter().map(|p| (p.key.as_str(), p)).collect();
    for (key, node) in &decision.placements {
        if !starting.contains(node) {
            continue;
        }
        if let Some(p) = pods.get(key.as_str()) {
            memory.in_flight.entry(key.clone()).or_insert(InFlight {
                node: node.clone(),
                requests: p.requests.clone().unwrap_or_default(),
                at: Instant::now(),
                settled_since: None,
            });
        }
    }
}

/// Puts a node whose instance did not start back as it was: standby, cordoned, tainted.
async fn back_to_standby(api: &Api<Node>, pool: Option<&NodePool>, node: &Node) {
    let taints = match pool {
        Some(pool) => nodepool::standby_taints(pool, node),
        None => {
            crate::pool::taints::standby_taints(&nodepool::taints_out_of_standby(node), &[], &[])
        }
    };
    let patch = json!({
        "metadata": {"labels": {STATE_LABEL: NodeState::Standby.as_str()}},
        "spec": {"unschedulable": true, "taints": taints},
    });
    if let Err(e) = api
        .patch(
            &node.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        tracing::warn!(node = %node.name_any(), error = %e, "could not put the node back in standby");
    }
}

/// Metrics, events, `lastScaleUp` and in-flight memory, for the starts that succeeded.
async fn record_starts(
    ctx: &Context,
    snap: &Snapshot,
    decision: &ScaleUp,
    memory: &mut Memory,
    started: &BTreeSet<&str>,
) {
    let cached: HashMap<String, Arc<CachedPod>> = ctx
        .stores
        .pods
        .state()
        .into_iter()
        .filter(|p| p.unschedulable)
        .map(|p| (p.key(), p))
        .collect();
    let now = SystemTime::now();
    for scale in &decision.pools {
        let ok: Vec<&String> = scale
            .start
            .iter()
            .filter(|id| started.contains(id.as_str()))
            .collect();
        if ok.is_empty() {
            continue;
        }
        // The pods of this pool's decision, each promised to a started or starting node.
        let mut latencies = Vec::new();
        for key in &scale.pods {
            let Some(p) = cached.get(key) else { continue };
            let since = p.pending_since.unwrap_or(now);
            let decided_from = memory.seen.get(key).copied().unwrap_or(since);
            latencies.push(now.duration_since(decided_from).unwrap_or_default());
            memory
                .served
                .insert(key.clone(), (scale.pool.clone(), since));
        }
        ctx.metrics
            .scale_up(&scale.pool, "standby", ok.len(), &latencies);
        tracing::info!(pool = %scale.pool, nodes = ok.len(), pods = scale.pods.len(), instances = ?ok, "scale-up: started standby nodes");
        let Some(pool) = snap.pool_objects.get(&scale.pool) else {
            continue;
        };
        ctx.publish(
            &**pool,
            false,
            "ScaleUp",
            format!(
                "started {} standby node(s) for {} pending pod(s)",
                ok.len(),
                scale.pods.len()
            ),
        )
        .await;
        for id in &ok {
            if let Some(node) = snap.nodes_by_instance.get(*id) {
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
            "status": {"lastScaleUp": {"time": jiff::Timestamp::now().to_string(), "nodes": ok.len(), "pods": scale.pods.len()}},
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
    }
}

/// One event per pod nothing can serve, repeated at most every 10 minutes.
async fn report_unserved(ctx: &Context, decision: &ScaleUp, memory: &mut Memory) {
    memory
        .reported
        .retain(|_, at| at.elapsed() < Duration::from_secs(600));
    for (key, why) in &decision.unserved {
        if memory.reported.contains_key(key) {
            continue;
        }
        memory.reported.insert(key.clone(), Instant::now());
        let Some(pod) = ctx
            .stores
            .pods
            .state()
            .into_iter()
            .find(|p| p.key() == *key)
        else {
            continue;
        };
        tracing::info!(pod = %key, reason = why.reason(), "no pool can serve this pod");
        ctx.publish(&*pod, true, why.reason(), why.message()).await;
    }
}
