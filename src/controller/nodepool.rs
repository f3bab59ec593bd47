//! The NodePool controller: gathers a pool's snapshot, runs the planner, executes its
//! actions (batched: one launch, one stop, one terminate call per pool and round) and
//! writes status, events and metrics.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::{StreamExt, future::BoxFuture};
use k8s_openapi::{
    api::core::v1::{Node, Pod, Taint},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::{
        Controller,
        controller::Action as Requeue,
        finalizer::{Event as FinalizerEvent, finalizer},
        reflector::ObjectRef,
    },
};
use serde_json::json;
use tokio::sync::Notify;

use super::{CachedPod, Context, Error, drain, instances::Change};
use crate::{
    api::{
        NodePool,
        nodepool::{NodePoolSpec, POOL_LABEL, STATE_LABEL},
    },
    cloud::{Instance, InstanceState, LaunchRequest, LaunchSpec, parse_provider_id, tags},
    pool::{
        converge, nodeclass_hash,
        plan::{
            self, Action, ClassView, Plan, PoolSnapshot, PoolView, StandbyReason, TerminateReason,
        },
        scheduling,
        state::{Member, NodeState, NodeView, Phase, PrePull},
    },
};

pub use crate::contract::{
    DRAINING_SINCE, EMPTY_SINCE, POOL_FINALIZER as FINALIZER, STANDBY_TAINT,
};
const FIELD_MANAGER: &str = "stratos";

pub struct PoolController {
    pub run: BoxFuture<'static, ()>,
}

pub fn controller(
    ctx: Arc<Context>,
    notify: Arc<Notify>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> PoolController {
    let api: Api<NodePool> = Api::all(ctx.client.clone());
    let controller = Controller::new(api, ctx.config.scoped_watch())
        .with_config(
            kube::runtime::controller::Config::default().debounce(Duration::from_millis(100)),
        )
        .trigger_backoff(super::reflect::WatchBackoff::default());
    // Any change of a node, pod, DaemonSet or class may change what a pool needs.
    let trigger = futures::stream::unfold(notify, |n| async move {
        n.notified().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some(((), n))
    });
    let run = controller
        .reconcile_all_on(trigger)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {});
    PoolController { run: Box::pin(run) }
}

fn error_policy(pool: Arc<NodePool>, error: &Error, ctx: Arc<Context>) -> Requeue {
    use super::retry::{ErrorClass, classify};
    let name = pool.name_any();
    let delay = ctx.retry_delay(&format!("nodepool/{name}"), error);
    match classify(error) {
        // Expected while it lasts; made visible by the reconcile itself (events, conditions).
        ErrorClass::Blocked => {
            tracing::debug!(pool = %name, why = %error, "waiting");
        }
        ErrorClass::Conflict => {
            tracing::debug!(pool = %name, error = %error, "conflict; retrying from a fresh read");
        }
        class => {
            ctx.metrics.reconcile_error("nodepool", error.label());
            tracing::warn!(pool = %name, error = %error, ?class, retry_in_ms = delay.as_millis() as u64, "reconcile failed");
        }
    }
    Requeue::requeue(delay)
}

async fn reconcile(pool: Arc<NodePool>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let api: Api<NodePool> = Api::all(ctx.client.clone());
    let result = finalizer(&api, FINALIZER, pool, |event| async {
        match event {
            FinalizerEvent::Apply(pool) => reconcile_pool(&pool, &ctx, false).await,
            FinalizerEvent::Cleanup(pool) => reconcile_pool(&pool, &ctx, true).await,
        }
    })
    .await;
    match result {
        Ok(action) => Ok(action),
        Err(
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e),
        ) => Err(e),
        // Adding or removing the finalizer is an API write like any other (409, 5xx, …).
        Err(
            kube::runtime::finalizer::Error::AddFinalizer(e)
            | kube::runtime::finalizer::Error::RemoveFinalizer(e),
        ) => Err(Error::Kube(e)),
        Err(e) => Err(Error::Finalizer(e.to_string())),
    }
}

/// The class's launch spec, hash and readiness, if the class exists.
pub(crate) fn class_of(
    spec: &NodePoolSpec,
    ctx: &Context,
) -> Option<(Arc<crate::api::AWSNodeClass>, ClassView)> {
    let class = ctx
        .stores
        .classes
        .get(&ObjectRef::new(&spec.template.node_class_ref.name))?;
    let ready = class.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    });
    let view = ClassView {
        hash: nodeclass_hash(&class.spec),
        ready,
    };
    Some((class, view))
}

fn prepull_pod_name(node: &str) -> String {
    format!("stratos-prepull-{node}")
}

/// Builds the planner's view of a Node from the caches.
fn node_view(
    node: &Node,
    pods_on_node: &[Arc<CachedPod>],
    ctx: &Context,
    images_to_pull: bool,
) -> NodeView {
    let name = node.name_any();
    let ready = scheduling::node_ready(node);
    let aws_node = pods_on_node
        .iter()
        .find(|p| {
            p.namespace().as_deref() == Some("kube-system") && p.name_any().starts_with("aws-node")
        })
        .map(|p| p.ready);
    let expected: Vec<String> = ctx
        .stores
        .daemonsets
        .state()
        .iter()
        .filter(|ds| {
            ds.spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .is_some_and(|t| scheduling::daemonset_runs_on(t, node))
        })
        .filter_map(|ds| ds.uid())
        .collect();
    let ready_ds = expected
        .iter()
        .filter(|uid| {
            pods_on_node
                .iter()
                .any(|p| p.ready && p.daemonset.as_deref() == Some(uid.as_str()))
        })
        .count();
    let prepull_name = prepull_pod_name(&name);
    let prepull = if !images_to_pull {
        PrePull::NotNeeded
    } else {
        match pods_on_node.iter().find(|p| p.name_any() == prepull_name) {
            None => PrePull::Missing,
            Some(p) => match p.phase.as_deref() {
                Some("Succeeded") => PrePull::Succeeded,
                Some("Failed") => PrePull::Failed,
                _ => PrePull::Pending,
            },
        }
    };
    NodeView {
        name: name.clone(),
        created: node
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| SystemTime::from(t.0)),
        ready,
        network_ready: scheduling::network_ready(node, aws_node),
        state_label: node
            .labels()
            .get(STATE_LABEL)
            .and_then(|s| NodeState::parse(s)),
        daemonsets_expected: expected.len(),
        daemonset_pods_ready: ready_ds,
        prepull,
        workload_pods: pods_on_node
            .iter()
            .filter(|p| p.is_workload() && p.name_any() != prepull_name)
            .count(),
        terminating_pods: pods_on_node
            .iter()
            .filter(|p| p.is_terminating() && p.name_any() != prepull_name)
            .count(),
        empty_since: annotation_time(node, EMPTY_SINCE),
        draining_since: annotation_time(node, DRAINING_SINCE),
        start_requested: annotation_time(node, super::scaleup::LAST_USED_ANNOTATION),
    }
}

fn annotation_time(node: &Node, key: &str) -> Option<SystemTime> {
    node.annotations()
        .get(key)
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .map(SystemTime::from)
}

struct Gathered {
    snapshot: PoolSnapshot,
    nodes: HashMap<String, Arc<Node>>,
    class: Option<Arc<crate::api::AWSNodeClass>>,
    /// How long the instance listing took (a cached one is instant).
    listing: Duration,
}

async fn gather(pool: &NodePool, ctx: &Context, deleting: bool) -> Result<Gathered, Error> {
    let name = pool.name_any();
    // Current before the caches are read and still after: nothing in between came from a
    // store whose watch had failed.
    let current_before = ctx.stores.freshness.current();
    let listing = std::time::Instant::now();
    let (_, instances) = ctx.instances.get().await?;
    let listing = listing.elapsed();
    let members_instances: Vec<&Instance> = instances
        .iter()
        .filter(|i| i.tag(tags::POOL) == Some(name.as_str()))
        .collect();
    // Only this pool's nodes and their pods: a round costs one pass over each cache, with
    // lookups into the pool's own few hundred members, never a map of the whole cluster.
    let member_ids: HashSet<&str> = members_instances.iter().map(|i| i.id.as_str()).collect();
    let mut node_by_instance: HashMap<String, Arc<Node>> = HashMap::new();
    for node in ctx.stores.nodes.state() {
        if let Some((_, id)) = node
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.as_deref())
            .and_then(parse_provider_id)
            && member_ids.contains(id)
        {
            node_by_instance.insert(id.to_owned(), node.clone());
        }
    }
    let mut pods_by_node: HashMap<String, Vec<Arc<CachedPod>>> = node_by_instance
        .values()
        .map(|n| (n.name_any(), Vec::new()))
        .collect();
    for pod in ctx.stores.pods.state() {
        if let Some(on) = pod
            .node_name
            .as_deref()
            .and_then(|n| pods_by_node.get_mut(n))
        {
            on.push(pod);
        }
    }
    let images_to_pull = !pool.spec.pre_warm.images_to_pull.is_empty();
    let mut nodes = HashMap::new();
    let members = members_instances
        .into_iter()
        .map(|inst| {
            let node = node_by_instance.get(&inst.id).cloned();
            let view = node.as_ref().map(|n| {
                let pods = pods_by_node
                    .get(&n.name_any())
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let mut view = node_view(n, pods, ctx, images_to_pull);
                // Our own `starting` label, written moments ago and not yet in the cache.
                if let Some(at) = ctx.recently_marked_starting(&inst.id) {
                    if view.state_label == Some(NodeState::Standby)
                        && view.start_requested.is_none_or(|r| r < at)
                    {
                        view.state_label = Some(NodeState::Starting);
                        view.start_requested = Some(at);
                    } else {
                        // The cache has caught up: from now on it is the truth (a later
                        // return to standby is real).
                        ctx.unmarked_starting(&inst.id);
                    }
                }
                view
            });
            if let Some(n) = node {
                nodes.insert(inst.id.clone(), n);
            }
            Member {
                instance: inst.clone(),
                node: view,
            }
        })
        .collect();
    let class = class_of(&pool.spec, ctx);
    // What the one scale-up decision wants of this pool (launches, hand-overs, and whether
    // pending pods could use its nodes).
    let demand = ctx.demand_of(&name);
    let snapshot = PoolSnapshot {
        pool: PoolView {
            name: name.clone(),
            uid: pool.uid().unwrap_or_default(),
            pool_size: pool.spec.pool_size.max(0) as usize,
            min_standby: pool.spec.min_standby.max(0) as usize,
            warmup_timeout: pool.spec.pre_warm.timeout.as_std(),
            timeout_action: pool.spec.pre_warm.timeout_action,
            deleting,
            scale_down: pool.spec.scale_down.enabled.then(|| {
                (
                    pool.spec.scale_down.empty_node_ttl.as_std(),
                    pool.spec.scale_down.drain_timeout.as_std(),
                )
            }),
            pending_demand: demand.wanted,
            demand_nodes: if deleting { 0 } else { demand.launch },
            handoff_nodes: if deleting { 0 } else { demand.handoff },
        },
        class: class.as_ref().map(|(_, v)| v.clone()),
        members,
        now: SystemTime::now(),
        view_current: current_before && ctx.stores.freshness.current(),
    };
    Ok(Gathered {
        snapshot,
        nodes,
        class: class.map(|(c, _)| c),
        listing,
    })
}

async fn reconcile_pool(pool: &NodePool, ctx: &Context, deleting: bool) -> Result<Requeue, Error> {
    let name = pool.name_any();
    let round = std::time::Instant::now();
    let gathered = match gather(pool, ctx, deleting).await {
        Ok(g) => g,
        Err(Error::Cloud(e)) if !deleting => {
            // Without a listing nothing can be decided; say so in the status, keeping the
            // last known counts, and retry with backoff.
            let existing = pool.status.clone().unwrap_or_default();
            let plan = Plan {
                counts: plan::Counts {
                    warmup: existing.warmup.max(0) as usize,
                    standby: existing.standby.max(0) as usize,
                    starting: existing.starting.max(0) as usize,
                    running: existing.running.max(0) as usize,
                    draining: existing.draining.max(0) as usize,
                    total: existing.total.max(0) as usize,
                },
                ..Default::default()
            };
            let error = Error::Cloud(e);
            let class_found = class_of(&pool.spec, ctx).is_some();
            write_status(pool, ctx, &plan, class_found, std::slice::from_ref(&error)).await?;
            return Err(error);
        }
        Err(e) => return Err(e),
    };
    let plan = plan::plan_pool(&gathered.snapshot);
    let deciding = round.elapsed().saturating_sub(gathered.listing);
    if !plan.held.is_empty() {
        let held: Vec<String> = plan.held.iter().map(describe_action).collect();
        tracing::info!(
            pool = %name,
            stale = ?ctx.stores.freshness.stale(),
            ?held,
            "waiting for the caches to catch up before destructive actions"
        );
    }
    let mut errors = execute(pool, ctx, &gathered, &plan).await;
    if !deleting {
        errors.extend(converge_nodes(pool, ctx, &gathered, &plan).await);
    }
    let counts = &plan.counts;
    let by_state: Vec<(&str, i64)> = NodeState::ALL
        .iter()
        .map(|s| (s.as_str(), counts.get(*s) as i64))
        .collect();
    if deleting {
        let live = gathered
            .snapshot
            .members
            .iter()
            .filter(|m| m.phase() != Phase::Gone)
            .count();
        // What blocks the deletion shows in the status (and clears once it proceeds).
        let was_degraded = pool.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Degraded" && c.status == "True")
        });
        if live > 0 && (!errors.is_empty() || was_degraded) {
            let class_found = gathered.class.is_some();
            if let Err(e) = write_status(pool, ctx, &plan, class_found, &errors).await {
                tracing::debug!(pool = %name, error = %e, "could not write the deleting pool's status");
            }
        }
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        if live > 0 {
            return Err(Error::Waiting(format!(
                "{live} instance(s) of pool {name} still to terminate"
            )));
        }
        let states: Vec<&str> = NodeState::ALL.iter().map(|s| s.as_str()).collect();
        ctx.metrics.remove_pool(&name, &states);
        tracing::info!(pool = %name, "pool deleted: every instance terminated");
        return Ok(Requeue::await_change());
    }
    ctx.metrics.set_pool(
        &name,
        pool.spec.pool_size as i64,
        pool.spec.min_standby as i64,
        &by_state,
    );
    write_status(pool, ctx, &plan, gathered.class.is_some(), &errors).await?;
    ctx.metrics.round("nodepool", round.elapsed(), deciding);
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    ctx.reset_backoff(&format!("nodepool/{name}"));
    let busy = gathered
        .snapshot
        .members
        .iter()
        .any(|m| !matches!(m.phase(), Phase::Standby | Phase::Running | Phase::Gone))
        || !plan.held.is_empty()
        || plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::Launch { .. }));
    Ok(Requeue::requeue(if busy {
        Duration::from_secs(2)
    } else {
        ctx.config.resync
    }))
}

/// The pods that keep `node` from being stopped (SPEC §11 I3), read from the API server:
/// bound to it, not DaemonSet or mirror pods, not finished; terminating ones count.
async fn pods_holding(ctx: &Context, node: &str) -> Result<Vec<String>, Error> {
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::all(ctx.client.clone());
    let params = kube::api::ListParams::default().fields(&format!("spec.nodeName={node}"));
    let pods = api.list(&params).await?;
    Ok(pods
        .items
        .into_iter()
        .map(CachedPod::from)
        .filter(|p| p.is_workload() || p.is_terminating())
        .map(|p| p.key())
        .collect())
}

/// The Node of `instance`, read from the API server rather than the cache: by name (EKS
/// names a Node after its instance's private DNS name), then among all Nodes by provider ID.
/// Only for the rare "did it register at all?" question before a warmup is judged failed.
async fn registered_node(ctx: &Context, instance: &Instance) -> Result<Option<String>, Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let is_of = |n: &Node| {
        n.spec
            .as_ref()
            .and_then(|s| s.provider_id.as_deref())
            .and_then(parse_provider_id)
            .is_some_and(|(_, id)| id == instance.id)
    };
    if let Some(dns) = instance
        .private_dns_name
        .as_deref()
        .filter(|d| !d.is_empty())
        && let Some(node) = api.get_opt(dns).await?
        && is_of(&node)
    {
        return Ok(Some(node.name_any()));
    }
    let mut params = kube::api::ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        if let Some(node) = page.items.iter().find(|n| is_of(n)) {
            return Ok(Some(node.name_any()));
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(None),
        }
    }
}

/// Makes a drain that the cluster refuses visible (SPEC §8.2): a counter per refused
/// eviction, and — at most once per cause (see `Context::publish`) — a warn log and a Warning
/// event on the pool and the node naming the pod, the node and what refuses (RBAC, the
/// PodDisruptionBudget by name, a webhook). The returned error puts the same words in the
/// pool's `Degraded` condition until the drain proceeds.
async fn report_blocked_drain(
    pool: &NodePool,
    ctx: &Context,
    node_obj: Option<&Arc<Node>>,
    node: &str,
    progress: &drain::Progress,
) -> Error {
    let name = pool.name_any();
    for b in &progress.blocked {
        ctx.metrics.blocked(&name, b.refusal.reason());
    }
    let first = &progress.blocked[0];
    let reason = first.refusal.reason();
    let mut message = first.refusal.describe(&first.pod, node);
    let more = progress.blocked.len() - 1;
    if more > 0 {
        message.push_str(&format!(" (and {more} more pod(s) on the node)"));
    }
    if pool.metadata.deletion_timestamp.is_some() {
        message.push_str("; the pool's deletion waits for it");
    }
    ctx.publish_once(pool, reason, &message, || {
        tracing::warn!(pool = %name, node, reason, "{message}");
    })
    .await;
    if let Some(n) = node_obj {
        ctx.publish(&**n, true, reason, message.clone()).await;
    }
    Error::Blocked { reason, message }
}

/// One line per action, for logs.
fn describe_action(a: &Action) -> String {
    match a {
        Action::Terminate {
            instance, reason, ..
        } => format!("terminate {instance} ({})", reason.as_str()),
        Action::EnterStandby {
            instance, reason, ..
        } => format!("standby {instance} ({reason:?})"),
        Action::Drain { instance, .. } => format!("drain {instance}"),
        other => format!("{other:?}"),
    }
}

fn desired_labels(pool: &NodePool, state: NodeState) -> BTreeMap<String, String> {
    let name = pool.name_any();
    let template = converge::Template {
        pool: &name,
        labels: &pool.spec.template.labels,
        startup_taints: &pool.spec.template.startup_taints,
        startup_taint_removal: pool.spec.template.startup_taint_removal,
    };
    converge::desired_labels(&template, state)
}

/// How many times a node patch is tried when others keep changing the node (409 Conflict).
const CONFLICT_ATTEMPTS: usize = 3;

/// Patches a node with optimistic concurrency, so taints that others change concurrently are
/// never overwritten from a stale copy. `build` makes the patch from a copy of the node
/// (`None`: nothing left to change). On a conflict the node is read again and the patch
/// rebuilt from the fresh copy, at once: a conflict is someone else's concurrent write (the
/// kubelet's status, the node lifecycle controller's taints, a re-listing cache after an API
/// restart), not a failure worth a backoff.
pub(crate) async fn patch_node(
    ctx: &Context,
    node: &Node,
    build: impl Fn(&Node) -> Option<serde_json::Value>,
) -> Result<(), Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let name = node.name_any();
    let mut fresh: Option<Node> = None;
    for attempt in 1..=CONFLICT_ATTEMPTS {
        let current = fresh.as_ref().unwrap_or(node);
        let Some(mut patch) = build(current) else {
            return Ok(());
        };
        patch["metadata"]["resourceVersion"] = json!(current.resource_version());
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 && attempt < CONFLICT_ATTEMPTS => {
                tracing::debug!(node = %name, attempt, "node changed meanwhile; patching the fresh copy");
                fresh = Some(api.get(&name).await?);
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the last attempt returns")
}

fn node_taints(node: &Node) -> Vec<Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
}

/// The node's taints without the standby taint: what a node leaving standby keeps.
pub(crate) fn taints_out_of_standby(node: &Node) -> Vec<Taint> {
    crate::pool::taints::out_of_standby(&node_taints(node))
}

/// What a node of `pool` carries once back in standby.
pub(crate) fn standby_taints(pool: &NodePool, node: &Node) -> Vec<Taint> {
    crate::pool::taints::standby_taints(
        &node_taints(node),
        &pool.spec.template.taints,
        &pool.spec.template.startup_taints,
    )
}

async fn execute(pool: &NodePool, ctx: &Context, g: &Gathered, plan: &Plan) -> Vec<Error> {
    let name = pool.name_any();
    let mut errors = Vec::new();
    let member = |id: &str| g.snapshot.members.iter().find(|m| m.id() == id);

    // "No Node registered" was read from the cache; a cache can be behind even when its
    // watch is healthy. Confirm it with the API server before anything acts on it.
    let mut unconfirmed: Vec<&str> = Vec::new();
    for action in &plan.actions {
        let (Action::Terminate {
            instance,
            reason: TerminateReason::StoppedBeforeRegistering,
            ..
        }
        | Action::EnterStandby {
            instance,
            reason: StandbyReason::StoppedBeforeRegistering,
            ..
        }) = action
        else {
            continue;
        };
        let Some(m) = member(instance) else { continue };
        match registered_node(ctx, &m.instance).await {
            Ok(None) => {}
            Ok(Some(node)) => {
                tracing::info!(pool = %name, instance = %instance, node = %node, "its Node registered after all (the cache is behind): not a failed warmup");
                unconfirmed.push(instance);
            }
            Err(e) => {
                tracing::warn!(pool = %name, instance = %instance, error = %e, "could not confirm that no Node registered; deciding again next round");
                unconfirmed.push(instance);
            }
        }
    }

    // Terminations first, so a launch in the same round sees the room they make.
    let terminations: Vec<(&String, &Option<String>, &TerminateReason)> = plan
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Terminate {
                instance,
                node,
                reason,
            } if !unconfirmed.contains(&instance.as_str()) => Some((instance, node, reason)),
            _ => None,
        })
        .collect();
    // I3 from the API server, as for stops below.
    let mut confirmed = Vec::with_capacity(terminations.len());
    for t in terminations {
        if let (_, Some(node), _) = t {
            match pods_holding(ctx, node).await {
                Ok(holding) if holding.is_empty() => {}
                Ok(holding) => {
                    tracing::info!(pool = %name, instance = %t.0, node = %node, ?holding, "not terminating: pods are bound to the node (the pod cache is behind)");
                    continue;
                }
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            }
        }
        confirmed.push(t);
    }
    let terminations = confirmed;
    if !terminations.is_empty() {
        let ids: Vec<String> = terminations.iter().map(|(i, ..)| (*i).clone()).collect();
        let outcome = ctx.cloud.terminate_instances(&ids).await;
        ctx.instances
            .record(Change::State(
                &outcome.succeeded,
                InstanceState::ShuttingDown,
            ))
            .await;
        for (id, node, reason) in &terminations {
            if let Some((_, e)) = outcome.failed.iter().find(|(f, _)| f == *id) {
                ctx.metrics.blocked(&name, "TerminateFailed");
                let message = format!(
                    "could not terminate instance {id} ({}): {e}; retrying",
                    reason.as_str()
                );
                ctx.publish_once(
                    pool,
                    "TerminateFailed",
                    &message,
                    || tracing::warn!(pool = %name, instance = %id, error = %e, "terminate failed"),
                )
                .await;
                errors.push(Error::Cloud(e.clone()));
                continue;
            }
            tracing::info!(pool = %name, instance = %id, node = node.as_deref().unwrap_or("-"), reason = reason.as_str(), "terminated");
            if reason.is_warmup_failure() {
                let result = if matches!(reason, TerminateReason::WarmupTimeout) {
                    "timeout"
                } else {
                    "stopped_before_registering"
                };
                ctx.metrics.warmup_result(&name, result, None);
                let why = match reason {
                    TerminateReason::WarmupTimeout => format!(
                        "instance {id} missed the warmup deadline of {}; terminated",
                        pool.spec.pre_warm.timeout
                    ),
                    _ => format!("instance {id} stopped before its node registered; terminated"),
                };
                ctx.publish(pool, true, "WarmupFailed", why).await;
            }
            if let Some(node) = node {
                let api: Api<Node> = Api::all(ctx.client.clone());
                match api.delete(node, &DeleteParams::default()).await {
                    Ok(_) | Err(kube::Error::Api(_)) => {}
                    Err(e) => errors.push(e.into()),
                }
            }
        }
        let n = terminations.len() - outcome.failed.len();
        if n > 0 {
            let reasons: Vec<&str> = terminations.iter().map(|(_, _, r)| r.as_str()).collect();
            ctx.publish(
                pool,
                false,
                "Terminated",
                format!("terminated {n} instance(s) ({})", reasons.join(", ")),
            )
            .await;
        }
    }

    // Into standby: intent first (label, cordon, taints), then one stop call, then tags.
    let mut to_stop = Vec::new();
    let mut to_tag = Vec::new();
    for action in &plan.actions {
        let Action::EnterStandby {
            instance, reason, ..
        } = action
        else {
            continue;
        };
        if unconfirmed.contains(&instance.as_str()) {
            continue;
        }
        let Some(m) = member(instance) else { continue };
        let runs = matches!(
            m.instance.state,
            crate::cloud::InstanceState::Running | crate::cloud::InstanceState::Pending
        );
        if let Some(node) = g.nodes.get(instance) {
            // I3 from the API server, not the cache: a pod bound moments ago (kube-scheduler
            // placed it before the cordon, the pod watch is behind) keeps the node running;
            // a draining node stays draining and the next round evicts it.
            if runs {
                match pods_holding(ctx, &node.name_any()).await {
                    Ok(holding) if holding.is_empty() => {}
                    Ok(holding) => {
                        tracing::info!(pool = %name, instance = %instance, node = %node.name_any(), ?holding, "not stopping: pods are bound to the node (the pod cache is behind)");
                        continue;
                    }
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                }
            }
            let patch = |n: &Node| {
                Some(json!({
                    "metadata": {
                        "labels": desired_labels(pool, NodeState::Standby),
                        "annotations": {EMPTY_SINCE: null, DRAINING_SINCE: null},
                    },
                    "spec": {"unschedulable": true, "taints": standby_taints(pool, n)},
                }))
            };
            if let Err(e) = patch_node(ctx, node, patch).await {
                errors.push(e);
                continue;
            }
        }
        if runs {
            to_stop.push(instance.clone());
        }
        to_tag.push(instance.clone());
        let age = m
            .instance
            .launch_time
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        match reason {
            StandbyReason::WarmupComplete => {
                ctx.metrics.warmup_result(&name, "completed", age);
                tracing::info!(pool = %name, instance = %instance, node = m.node_name().unwrap_or("-"), reason = ?reason, "warmup complete: into standby");
            }
            StandbyReason::WarmupTimeout | StandbyReason::StoppedBeforeRegistering => {
                let result = if *reason == StandbyReason::WarmupTimeout {
                    "timeout"
                } else {
                    "stopped_before_registering"
                };
                ctx.metrics.warmup_result(&name, result, None);
                ctx.publish(pool, true, "WarmupFailed", format!("instance {instance}: {reason:?}; stopped into standby (timeoutAction: stop)")).await;
            }
            StandbyReason::Drained => {
                if let Some(took) = m
                    .node
                    .as_ref()
                    .and_then(|n| n.draining_since)
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                {
                    ctx.metrics.drained(&name, took);
                }
                tracing::info!(pool = %name, instance = %instance, node = m.node_name().unwrap_or("-"), "scale-down: drained, back to standby");
                ctx.publish(
                    pool,
                    false,
                    "ScaleDown",
                    format!(
                        "node {} was empty for {}; drained and stopped into standby",
                        m.node_name().unwrap_or("-"),
                        pool.spec.scale_down.empty_node_ttl
                    ),
                )
                .await;
            }
            StandbyReason::Resume | StandbyReason::StoppedUnexpectedly => {
                tracing::info!(pool = %name, instance = %instance, reason = ?reason, "into standby");
            }
        }
    }
    // Again now that every one of these nodes is cordoned and tainted, just before the one
    // stop call: a pod bound in between (by a scheduler that had not seen the cordon yet)
    // keeps its node running; the node gets its previous state back, so the next round
    // drains it again.
    let mut still_empty = Vec::with_capacity(to_stop.len());
    for id in to_stop {
        let Some(node) = g.nodes.get(&id) else {
            still_empty.push(id);
            continue;
        };
        let holding = match pods_holding(ctx, &node.name_any()).await {
            Ok(holding) if holding.is_empty() => {
                still_empty.push(id);
                continue;
            }
            Ok(holding) => holding,
            Err(e) => {
                errors.push(e);
                vec!["(unknown: the pods could not be read)".to_owned()]
            }
        };
        tracing::info!(pool = %name, instance = %id, node = %node.name_any(), ?holding, "not stopping: pods were bound to the node meanwhile");
        let before = |key: &str| node.annotations().get(key).cloned();
        let restore = json!({
            "metadata": {
                "labels": {STATE_LABEL: node.labels().get(STATE_LABEL)},
                "annotations": {EMPTY_SINCE: before(EMPTY_SINCE), DRAINING_SINCE: before(DRAINING_SINCE)},
            }
        });
        if let Err(e) = patch_node(ctx, node, |_| Some(restore.clone())).await {
            errors.push(e);
        }
        to_tag.retain(|t| *t != id);
    }
    let to_stop = still_empty;
    if !to_stop.is_empty() {
        let outcome = ctx.cloud.stop_instances(&to_stop).await;
        ctx.instances
            .record(Change::State(&outcome.succeeded, InstanceState::Stopping))
            .await;
        for (id, e) in &outcome.failed {
            tracing::warn!(pool = %name, instance = %id, error = %e, "stop failed");
            errors.push(Error::Cloud(e.clone()));
        }
    }
    let warmed = plan
        .actions
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::EnterStandby {
                    reason: StandbyReason::WarmupComplete,
                    ..
                }
            )
        })
        .count();
    if warmed > 0 {
        ctx.publish(
            pool,
            false,
            "WarmupCompleted",
            format!("{warmed} node(s) warmed up and stopped into standby"),
        )
        .await;
    }
    if !to_tag.is_empty() {
        let state = BTreeMap::from([(
            tags::STATE.to_owned(),
            NodeState::Standby.as_str().to_owned(),
        )]);
        match ctx.cloud.set_tags(&to_tag, &state).await {
            Ok(()) => ctx.instances.record(Change::Tagged(&to_tag, &state)).await,
            Err(e) => errors.push(Error::Cloud(e)),
        }
    }

    // Starts re-issued for nodes marked starting, and warmups resumed after a self-stop:
    // one call for both, each id's result apart.
    let (mut restarts, mut resumed) = (Vec::new(), Vec::new());
    for action in &plan.actions {
        match action {
            Action::Start { instance } => restarts.push(instance.clone()),
            Action::ResumeWarmup { instance } => resumed.push(instance.clone()),
            _ => {}
        }
    }
    let outcome = if restarts.is_empty() && resumed.is_empty() {
        Default::default()
    } else {
        let ids: Vec<String> = restarts.iter().chain(&resumed).cloned().collect();
        let outcome = ctx.cloud.start_instances(&ids).await;
        ctx.instances
            .record(Change::State(&outcome.succeeded, InstanceState::Pending))
            .await;
        for (id, e) in &outcome.failed {
            tracing::warn!(pool = %name, instance = %id, error = %e, "start failed");
            errors.push(Error::Cloud(e.clone()));
        }
        outcome
    };
    if !restarts.is_empty() {
        tracing::info!(pool = %name, instances = ?restarts, "start (re-)issued for nodes marked starting");
    }
    let resumed: Vec<String> = outcome
        .succeeded
        .into_iter()
        .filter(|id| resumed.contains(id))
        .collect();
    if !resumed.is_empty() {
        for id in &resumed {
            ctx.metrics.warmup_result(&name, "resumed", None);
            tracing::info!(pool = %name, instance = %id, "self-stopped before warmup was complete: started again to finish it");
        }
        ctx.publish(
            pool,
            false,
            "WarmupResumed",
            format!(
                "{} instance(s) powered off before their warmup was complete (images, DaemonSet pods); started again to finish it: {}",
                resumed.len(),
                resumed.join(", ")
            ),
        )
        .await;
    }

    for action in &plan.actions {
        match action {
            Action::CreatePrePullPod { node } => {
                if let Err(e) = create_prepull_pod(pool, ctx, node).await {
                    errors.push(e);
                }
            }
            Action::Drain { node, instance } => {
                if let Some(n) = g.nodes.get(instance) {
                    let patch = |n: &Node| {
                        let since = n
                            .annotations()
                            .get(DRAINING_SINCE)
                            .cloned()
                            .unwrap_or_else(|| jiff::Timestamp::now().to_string());
                        Some(json!({
                            "metadata": {"labels": {STATE_LABEL: NodeState::Draining.as_str()}, "annotations": {DRAINING_SINCE: since}},
                            "spec": {"unschedulable": true},
                        }))
                    };
                    if let Err(e) = patch_node(ctx, n, patch).await {
                        errors.push(e);
                        continue;
                    }
                }
                match drain::evict_workload(ctx, node).await {
                    Ok(progress) if progress.blocked.is_empty() => {
                        if progress.remaining > 0 {
                            tracing::info!(pool = %name, node = %node, left = progress.remaining, "draining: waiting for evicted pods to go");
                        }
                    }
                    Ok(progress) => {
                        errors.push(
                            report_blocked_drain(pool, ctx, g.nodes.get(instance), node, &progress)
                                .await,
                        );
                    }
                    Err(e) => errors.push(e),
                }
            }
            Action::Handoff { instance, node } => {
                if let Some(n) = g.nodes.get(instance) {
                    let patch = |n: &Node| {
                        Some(json!({
                            "metadata": {"labels": desired_labels(pool, NodeState::Running)},
                            "spec": {"unschedulable": null, "taints": taints_out_of_standby(n)},
                        }))
                    };
                    match patch_node(ctx, n, patch).await {
                        Ok(()) => {
                            let tag = BTreeMap::from([(
                                tags::STATE.to_owned(),
                                NodeState::Running.as_str().to_owned(),
                            )]);
                            let _ = ctx
                                .cloud
                                .set_tags(std::slice::from_ref(instance), &tag)
                                .await;
                            ctx.metrics.warmup_result(&name, "completed", None);
                            ctx.metrics.scale_up(&name, "launch", 1, &[]);
                            tracing::info!(pool = %name, instance = %instance, node = %node, "warm node handed to pending pods");
                            ctx.publish(pool, false, "ScaleUp", format!("node {node} finished warmup and went straight to pending pods (standby exhausted)")).await;
                        }
                        Err(e) => errors.push(e),
                    }
                }
            }
            Action::MarkEmpty { instance, .. } | Action::ClearEmpty { instance, .. } => {
                let value = matches!(action, Action::MarkEmpty { .. })
                    .then(|| jiff::Timestamp::now().to_string());
                if let Some(n) = g.nodes.get(instance)
                    && let Err(e) = patch_node(ctx, n, |_| {
                        Some(json!({"metadata": {"annotations": {EMPTY_SINCE: value}}}))
                    })
                    .await
                {
                    errors.push(e);
                }
            }
            Action::AbortDrain { instance, node } => {
                if let Some(n) = g.nodes.get(instance) {
                    let patch = |_: &Node| {
                        Some(json!({
                            "metadata": {
                                "labels": {STATE_LABEL: NodeState::Running.as_str()},
                                "annotations": {DRAINING_SINCE: null, EMPTY_SINCE: null},
                            },
                            "spec": {"unschedulable": null},
                        }))
                    };
                    match patch_node(ctx, n, patch).await {
                        Ok(()) => {
                            ctx.metrics.drain_failed(&name, "timeout");
                            ctx.metrics.blocked(&name, "DrainTimeout");
                            tracing::warn!(pool = %name, node = %node, timeout = %pool.spec.scale_down.drain_timeout, "drain aborted: back to running");
                            ctx.publish(pool, true, "DrainAborted", format!("node {node} could not be drained within {} (pods could not be evicted, e.g. a PodDisruptionBudget); it is running again", pool.spec.scale_down.drain_timeout)).await;
                        }
                        Err(e) => errors.push(e),
                    }
                }
            }
            _ => {}
        }
    }

    for action in &plan.actions {
        let Action::Launch {
            count,
            token,
            existing_per_subnet,
        } = action
        else {
            continue;
        };
        let Some(class) = &g.class else { continue };
        let mut instance_tags = class.spec.tags.clone();
        instance_tags.insert(tags::CLUSTER.into(), ctx.config.cluster.clone());
        instance_tags.insert(tags::POOL.into(), name.clone());
        instance_tags.insert(tags::NODECLASS_HASH.into(), nodeclass_hash(&class.spec));
        instance_tags.insert(tags::STATE.into(), NodeState::Warmup.as_str().into());
        let request = LaunchRequest {
            spec: LaunchSpec::from(&class.spec),
            count: *count,
            tags: instance_tags,
            client_token: token.clone(),
            existing_per_subnet: existing_per_subnet.clone(),
        };
        let outcome = ctx.cloud.launch(&request).await;
        ctx.instances
            .record(Change::Launched(&outcome.instances))
            .await;
        if !outcome.instances.is_empty() {
            // The scale-up decision's launches are done: the next decision counts these
            // instances as capacity on its way, and nothing launches for it twice.
            ctx.demand_launched(&name);
        }
        let ids: Vec<&str> = outcome.instances.iter().map(|i| i.id.as_str()).collect();
        tracing::info!(pool = %name, requested = count, launched = ids.len(), instances = ?ids, "launch for warmup");
        if !outcome.instances.is_empty() {
            ctx.publish(
                pool,
                false,
                "WarmupStarted",
                format!(
                    "launched {} instance(s) to keep {} in standby",
                    outcome.instances.len(),
                    pool.spec.min_standby
                ),
            )
            .await;
        }
        for e in outcome.errors {
            ctx.publish(pool, true, "LaunchFailed", e.to_string()).await;
            errors.push(Error::Cloud(e));
        }
    }
    errors
}

/// Keeps member nodes' labels and startup taints as the pool wants them.
async fn converge_nodes(pool: &NodePool, ctx: &Context, g: &Gathered, plan: &Plan) -> Vec<Error> {
    let mut errors = Vec::new();
    // Members the plan acted on this round were just patched from this same snapshot.
    let acted: Vec<&str> = plan
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::EnterStandby { instance, .. }
            | Action::Terminate { instance, .. }
            | Action::Drain { instance, .. }
            | Action::Start { instance }
            | Action::Handoff { instance, .. } => Some(instance.as_str()),
            _ => None,
        })
        .collect();
    for m in g
        .snapshot
        .members
        .iter()
        .filter(|m| !acted.contains(&m.id()))
    {
        let (Some(node), Some(view)) = (g.nodes.get(m.id()), &m.node) else {
            continue;
        };
        let state = match m.phase() {
            Phase::Warming => NodeState::Warmup,
            Phase::Starting => NodeState::Starting,
            Phase::Running => NodeState::Running,
            _ => continue,
        };
        let name = pool.name_any();
        let template = converge::Template {
            pool: &name,
            labels: &pool.spec.template.labels,
            startup_taints: &pool.spec.template.startup_taints,
            startup_taint_removal: pool.spec.template.startup_taint_removal,
        };
        // What changes, from the cached copy or, after a conflict, from a fresh one.
        let change_of = |n: &Node| {
            let taints = node_taints(n);
            let now = converge::NodeNow {
                labels: n.labels(),
                taints: &taints,
                unschedulable: n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true),
                ready: view.ready,
                network_ready: view.network_ready,
            };
            converge::converge(&template, state, &now)
        };
        let Some(change) = change_of(node) else {
            continue;
        };
        let (promoted, remove_startup) = (change.promoted, change.taints.is_some());
        let patch = |n: &Node| {
            let change = change_of(n)?;
            let mut patch = json!({"metadata": {"labels": change.labels}});
            if let Some(kept) = change.taints {
                patch["spec"] = json!({"taints": kept});
            }
            if change.cordon {
                patch["spec"]["unschedulable"] = json!(true);
            }
            Some(patch)
        };
        let result = patch_node(ctx, node, patch).await;
        // Observed once: only the write that actually promoted the node counts.
        if result.is_ok()
            && promoted
            && let Some(after) = view
                .start_requested
                .and_then(|t| SystemTime::now().duration_since(t).ok())
        {
            ctx.metrics.node_ready_after_start(&pool.name_any(), after);
        }
        match result {
            Ok(()) if remove_startup => {
                tracing::info!(pool = %pool.name_any(), node = %view.name, "startup taints removed")
            }
            Ok(()) => {}
            // Someone changed the node meanwhile: the next round works from the new copy.
            Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 => {}
            Err(e) => errors.push(e),
        }
    }
    errors
}

async fn create_prepull_pod(pool: &NodePool, ctx: &Context, node: &str) -> Result<(), Error> {
    let image = &ctx.config.prepull_image;
    let mount = json!([{"name": "stratos-bin", "mountPath": "/stratos-bin"}]);
    let small = json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}});
    let mut init = vec![json!({
        "name": "install", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": ["/stratos", "install-noop", "/stratos-bin/noop"], "volumeMounts": mount, "resources": small,
    })];
    for (i, pull) in pool.spec.pre_warm.images_to_pull.iter().enumerate() {
        init.push(json!({
            "name": format!("pull-{i}"), "image": pull, "imagePullPolicy": "IfNotPresent",
            "command": ["/stratos-bin/noop"], "volumeMounts": mount, "resources": small,
        }));
    }
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": prepull_pod_name(node),
            "namespace": ctx.config.prepull_namespace,
            "labels": {"app.kubernetes.io/managed-by": "stratos", POOL_LABEL: pool.name_any(), "stratos.sh/prepull": "true"},
        },
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "tolerations": [{"operator": "Exists"}],
            "volumes": [{"name": "stratos-bin", "emptyDir": {}}],
            "initContainers": init,
            "containers": [{"name": "done", "image": image, "imagePullPolicy": "IfNotPresent", "command": ["/stratos", "noop"], "resources": small}],
        }
    }))
    .expect("pre-pull pod json");
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.config.prepull_namespace);
    match api.create(&PostParams::default(), &pod).await {
        Ok(_) => {
            tracing::info!(pool = %pool.name_any(), node, images = pool.spec.pre_warm.images_to_pull.len(), "pre-pull pod created");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn write_status(
    pool: &NodePool,
    ctx: &Context,
    plan: &Plan,
    class_found: bool,
    errors: &[Error],
) -> Result<(), Error> {
    use crate::pool::status::{Failure, StatusInput, pool_status};
    let existing = pool.status.clone().unwrap_or_default();
    // A refusal says most about what the user must do; then the first failure.
    let first = errors
        .iter()
        .find(|e| matches!(e, Error::Blocked { .. }))
        .or(errors.first());
    let failure = first.map(|e| match e {
        Error::Blocked { reason, message } => Failure::Blocked {
            reason: (*reason).to_owned(),
            message: message.clone(),
        },
        Error::Cloud(crate::cloud::CloudError::InsufficientCapacity(m)) => {
            Failure::InsufficientCapacity(m.clone())
        }
        Error::Cloud(e) => Failure::Cloud(e.to_string()),
        e => Failure::Other(e.to_string()),
    });
    let (status, newly_degraded) = pool_status(&StatusInput {
        plan,
        class_name: &pool.spec.template.node_class_ref.name,
        class_found,
        min_standby: pool.spec.min_standby.max(0) as usize,
        failure: failure.as_ref(),
        existing: &existing.conditions,
        generation: pool.metadata.generation,
        now: Time(jiff::Timestamp::now()),
    });
    if let Some((reason, message)) = newly_degraded {
        ctx.publish(pool, true, &reason, message).await;
    }
    let body = json!({"apiVersion": "stratos.sh/v1alpha1", "kind": "NodePool", "status": status});
    let api: Api<NodePool> = Api::all(ctx.client.clone());
    api.patch_status(
        &pool.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}
