//! Lifecycle decisions for one pool (SPEC §5.1–§5.3, §5.7): warmup completion and failure,
//! replenishment, trimming, drift, deletion. A pure function of a [`PoolSnapshot`].

use std::{collections::BTreeMap, time::Duration, time::SystemTime};

use super::{
    launch_token,
    state::{Member, NodeState, Phase, PrePull},
};
use crate::api::nodepool::TimeoutAction;

/// The parts of a NodePool the planner reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    pub name: String,
    pub uid: String,
    pub pool_size: usize,
    pub min_standby: usize,
    pub warmup_timeout: Duration,
    pub timeout_action: TimeoutAction,
    /// The pool is being deleted.
    pub deleting: bool,
    /// `(emptyNodeTTL, drainTimeout)`, or `None` when scale-down is disabled.
    pub scale_down: Option<(Duration, Duration)>,
    /// Some pending pod could use this pool's nodes: empty nodes stay, and warm nodes go
    /// to the pods instead of into standby.
    pub pending_demand: bool,
    /// New nodes pending pods need beyond all the pool's standby, starting and warming
    /// capacity (standby exhausted, SPEC §6).
    pub demand_nodes: usize,
    /// Nodes pending pods need beyond standby, starting and running capacity: how many
    /// warm nodes go straight to the pods instead of into standby.
    pub handoff_nodes: usize,
}

/// The pool's node class, when it exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassView {
    pub hash: String,
    /// Its AMI, subnets and security groups were found.
    pub ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSnapshot {
    pub pool: PoolView,
    pub class: Option<ClassView>,
    pub members: Vec<Member>,
    pub now: SystemTime,
    /// The Node, Pod, DaemonSet and NodePool caches are current: listed completely and
    /// watching without error since (SPEC §4). When they are not, what the snapshot says
    /// about Nodes and pods may be minutes old, and nothing that cannot be undone is
    /// decided from it (see [`needs_current_view`]).
    pub view_current: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandbyReason {
    WarmupComplete,
    WarmupTimeout,
    StoppedBeforeRegistering,
    /// A stop into standby was interrupted; finish it.
    Resume,
    StoppedUnexpectedly,
    /// Empty for `emptyNodeTTL` and drained.
    Drained,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminateReason {
    WarmupTimeout,
    StoppedBeforeRegistering,
    /// `poolSize` was lowered below the pool's size.
    Trim,
    /// Launched from an older node class.
    Drift,
    PoolDeleted,
}

impl TerminateReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::WarmupTimeout => "WarmupTimeout",
            Self::StoppedBeforeRegistering => "StoppedBeforeRegistering",
            Self::Trim => "Trim",
            Self::Drift => "Drift",
            Self::PoolDeleted => "PoolDeleted",
        }
    }

    /// A failed warmup (counted in the warmup-results metric and a Warning event).
    pub fn is_warmup_failure(&self) -> bool {
        matches!(self, Self::WarmupTimeout | Self::StoppedBeforeRegistering)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Launch instances in one batch.
    Launch {
        count: usize,
        token: String,
        existing_per_subnet: BTreeMap<String, usize>,
    },
    /// Create the image pre-pull pod on a warming node.
    CreatePrePullPod { node: String },
    /// Into standby: cordon, standby taint, startup taints back, label and tag `standby`,
    /// and stop the instance if it still runs.
    EnterStandby {
        instance: String,
        node: Option<String>,
        reason: StandbyReason,
    },
    /// A warm node goes straight to pending pods: uncordoned, `running`, never stopped.
    Handoff { instance: String, node: String },
    /// (Re-)issue the start of an instance whose node is marked `starting`.
    Start { instance: String },
    /// The instance stopped itself (the bootstrap's `poweroff`) before its warmup was
    /// complete: start it again (no user data runs this time) to finish warming up, after
    /// which Stratos stops it itself (SPEC §5.1, resumed warmup).
    ResumeWarmup { instance: String },
    /// Cordon the node, mark it draining and evict its workload (scale-down, or before the
    /// pool's deletion terminates it).
    Drain { instance: String, node: String },
    /// The drain did not finish within `drainTimeout`: uncordon, back to running.
    AbortDrain { instance: String, node: String },
    /// Record that a running node became empty (its TTL starts).
    MarkEmpty { instance: String, node: String },
    /// A running node is busy again.
    ClearEmpty { instance: String, node: String },
    /// Terminate the instance and delete its Node.
    Terminate {
        instance: String,
        node: Option<String>,
        reason: TerminateReason,
    },
}

/// Members by lifecycle state, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub warmup: usize,
    pub standby: usize,
    pub starting: usize,
    pub running: usize,
    pub draining: usize,
    pub total: usize,
}

impl Counts {
    pub fn of(members: &[Member]) -> Self {
        let mut c = Counts::default();
        for m in members {
            match m.phase().counted_as() {
                Some(NodeState::Warmup) => c.warmup += 1,
                Some(NodeState::Standby) => c.standby += 1,
                Some(NodeState::Starting) => c.starting += 1,
                Some(NodeState::Running) => c.running += 1,
                Some(NodeState::Draining) => c.draining += 1,
                None => continue,
            }
            c.total += 1;
        }
        c
    }

    pub fn get(&self, state: NodeState) -> usize {
        match state {
            NodeState::Warmup => self.warmup,
            NodeState::Standby => self.standby,
            NodeState::Starting => self.starting,
            NodeState::Running => self.running,
            NodeState::Draining => self.draining,
        }
    }
}

/// Why the pool cannot do its job right now, for the Degraded condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    NodeClassNotFound,
    NodeClassNotReady,
    /// Pre-pull pods failed on these nodes (warmup fails at the deadline).
    PrePullFailed(Vec<String>),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub counts: Counts,
    pub problems: Vec<Problem>,
    /// Actions the snapshot called for but that wait for a current view.
    pub held: Vec<Action>,
}

/// Whether `action` destroys something or cannot be undone, so that it may only be decided
/// from a current view (SPEC §11, I1/I3/I5). After an API outage a stale Node cache shows a
/// freshly registered node as missing and a stale pod cache shows a busy node as empty:
/// terminating, stopping or draining on that evidence loses warm instances or running pods.
/// Starts, launches within `poolSize`, hand-overs, labels and pre-pull pods are reversible
/// and go ahead.
pub fn needs_current_view(action: &Action, members: &[Member]) -> bool {
    use crate::cloud::InstanceState as I;
    match action {
        Action::Terminate { .. } | Action::Drain { .. } => true,
        // "No Node registered" concluded from the absence of a cached Node.
        Action::EnterStandby {
            reason: StandbyReason::StoppedBeforeRegistering,
            ..
        } => true,
        // Stopping an instance that runs; recording the standby intent of a stopped one is
        // harmless.
        Action::EnterStandby { instance, .. } => members
            .iter()
            .find(|m| m.id() == instance)
            .is_none_or(|m| matches!(m.instance.state, I::Pending | I::Running)),
        Action::Launch { .. }
        | Action::CreatePrePullPod { .. }
        | Action::Handoff { .. }
        | Action::Start { .. }
        | Action::ResumeWarmup { .. }
        | Action::AbortDrain { .. }
        | Action::MarkEmpty { .. }
        | Action::ClearEmpty { .. } => false,
    }
}

fn launched_at(m: &Member) -> Option<SystemTime> {
    m.instance.launch_time
}

fn timed_out(m: &Member, snap: &PoolSnapshot) -> bool {
    launched_at(m)
        .and_then(|t| snap.now.duration_since(t).ok())
        .is_some_and(|age| age > snap.pool.warmup_timeout)
}

/// How long a requested start counts as in flight before it is issued again.
pub const START_IN_FLIGHT: Duration = Duration::from_secs(15);

fn terminate(m: &Member, reason: TerminateReason) -> Action {
    Action::Terminate {
        instance: m.id().into(),
        node: m.node_name().map(Into::into),
        reason,
    }
}

/// Decides what a pool needs now.
pub fn plan_pool(snap: &PoolSnapshot) -> Plan {
    let mut plan = Plan {
        counts: Counts::of(&snap.members),
        ..Default::default()
    };
    let live: Vec<&Member> = snap
        .members
        .iter()
        .filter(|m| m.phase() != Phase::Gone)
        .collect();

    if snap.pool.deleting {
        for m in &live {
            let busy = m
                .node
                .as_ref()
                .is_some_and(super::state::NodeView::holds_pods);
            match (m.phase(), m.node_name()) {
                (Phase::Running | Phase::Starting | Phase::Draining, Some(node)) if busy => {
                    plan.actions.push(Action::Drain {
                        instance: m.id().into(),
                        node: node.into(),
                    })
                }
                _ => plan.actions.push(Action::Terminate {
                    instance: m.id().into(),
                    node: m.node_name().map(Into::into),
                    reason: TerminateReason::PoolDeleted,
                }),
            }
        }
        hold_unless_current(&mut plan, snap);
        return plan;
    }

    match &snap.class {
        None => plan.problems.push(Problem::NodeClassNotFound),
        Some(c) if !c.ready => plan.problems.push(Problem::NodeClassNotReady),
        Some(_) => {}
    }
    let current_hash = snap.class.as_ref().map(|c| c.hash.as_str());
    let drifted = |m: &Member| current_hash.is_some_and(|h| m.nodeclass_hash() != Some(h));
    let mut terminating: Vec<&str> = Vec::new();
    let mut failed_prepull = Vec::new();

    // Warmup completion and failure; interrupted transitions.
    let mut handoffs_left = snap.pool.handoff_nodes;
    for m in &live {
        let standby = |reason| Action::EnterStandby {
            instance: m.id().into(),
            node: m.node_name().map(Into::into),
            reason,
        };
        match m.phase() {
            Phase::WarmReady if handoffs_left > 0 && m.node_name().is_some() => {
                handoffs_left -= 1;
                let node = m.node_name().unwrap_or_default();
                plan.actions.push(Action::Handoff {
                    instance: m.id().into(),
                    node: node.into(),
                });
            }
            Phase::WarmReady => plan.actions.push(standby(StandbyReason::WarmupComplete)),
            // A self-stop before warmup was complete (Stratos stops a warm node itself, first):
            // start it again within the deadline to finish; EC2 starts it once stopped.
            Phase::SelfStopped if timed_out(m, snap) => match snap.pool.timeout_action {
                TimeoutAction::Terminate => {
                    terminating.push(m.id());
                    plan.actions
                        .push(terminate(m, TerminateReason::WarmupTimeout));
                }
                TimeoutAction::Stop => plan.actions.push(standby(StandbyReason::WarmupTimeout)),
            },
            Phase::SelfStopped if m.instance.state == crate::cloud::InstanceState::Stopped => {
                plan.actions.push(Action::ResumeWarmup {
                    instance: m.id().into(),
                })
            }
            Phase::StandbyButRunning => plan.actions.push(standby(StandbyReason::Resume)),
            // A start requested moments ago is still on its way (or not yet in the listing).
            Phase::StartPending => {
                let requested = m.node.as_ref().and_then(|n| n.start_requested);
                let in_flight = requested
                    .and_then(|t| snap.now.duration_since(t).ok())
                    .is_some_and(|a| a < START_IN_FLIGHT);
                if !in_flight {
                    plan.actions.push(Action::Start {
                        instance: m.id().into(),
                    });
                }
            }
            Phase::StoppedUnexpectedly => plan
                .actions
                .push(standby(StandbyReason::StoppedUnexpectedly)),
            Phase::StoppedWithoutNode => match snap.pool.timeout_action {
                TimeoutAction::Terminate => {
                    terminating.push(m.id());
                    plan.actions
                        .push(terminate(m, TerminateReason::StoppedBeforeRegistering));
                }
                TimeoutAction::Stop => plan
                    .actions
                    .push(standby(StandbyReason::StoppedBeforeRegistering)),
            },
            Phase::Warming if timed_out(m, snap) => match snap.pool.timeout_action {
                TimeoutAction::Terminate => {
                    terminating.push(m.id());
                    plan.actions
                        .push(terminate(m, TerminateReason::WarmupTimeout));
                }
                TimeoutAction::Stop => plan.actions.push(standby(StandbyReason::WarmupTimeout)),
            },
            Phase::Warming => {
                if let Some(node) = &m.node {
                    match node.prepull {
                        PrePull::Missing => plan.actions.push(Action::CreatePrePullPod {
                            node: node.name.clone(),
                        }),
                        PrePull::Failed => failed_prepull.push(node.name.clone()),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if !failed_prepull.is_empty() {
        plan.problems.push(Problem::PrePullFailed(failed_prepull));
    }

    // Scale-down (SPEC §5.6): empty running nodes go back to standby after the TTL.
    for m in &live {
        let (Some(node), Some(name)) = (&m.node, m.node_name()) else {
            continue;
        };
        let ids = || (m.id().to_owned(), name.to_owned());
        let age = |t: Option<SystemTime>| t.and_then(|t| snap.now.duration_since(t).ok());
        match m.phase() {
            Phase::Running if !node.holds_pods() => {
                match (node.empty_since, snap.pool.scale_down) {
                    (None, _) => {
                        let (instance, node) = ids();
                        plan.actions.push(Action::MarkEmpty { instance, node });
                    }
                    (Some(_), Some((ttl, _)))
                        if !snap.pool.pending_demand
                            && age(node.empty_since).is_some_and(|a| a >= ttl) =>
                    {
                        let (instance, node) = ids();
                        plan.actions.push(Action::Drain { instance, node });
                    }
                    _ => {}
                }
            }
            Phase::Running if node.empty_since.is_some() => {
                let (instance, node) = ids();
                plan.actions.push(Action::ClearEmpty { instance, node });
            }
            Phase::Draining if !node.holds_pods() => plan.actions.push(Action::EnterStandby {
                instance: m.id().into(),
                node: Some(name.into()),
                reason: StandbyReason::Drained,
            }),
            Phase::Draining => {
                let timeout = snap
                    .pool
                    .scale_down
                    .map(|(_, t)| t)
                    .unwrap_or(Duration::from_secs(300));
                let (instance, node_name) = ids();
                if age(node.draining_since).is_some_and(|a| a > timeout) {
                    plan.actions.push(Action::AbortDrain {
                        instance,
                        node: node_name,
                    });
                } else {
                    plan.actions.push(Action::Drain {
                        instance,
                        node: node_name,
                    });
                }
            }
            _ => {}
        }
    }

    // Drift: stopped standby nodes from an older class are replaced.
    for m in &live {
        if m.phase() == Phase::Standby && drifted(m) && !terminating.contains(&m.id()) {
            terminating.push(m.id());
            plan.actions.push(terminate(m, TerminateReason::Drift));
        }
    }

    // Trim to poolSize: standby first, then warming; never nodes that serve or may serve pods.
    let remaining: Vec<&&Member> = live
        .iter()
        .filter(|m| !terminating.contains(&m.id()))
        .collect();
    if remaining.len() > snap.pool.pool_size {
        let excess = remaining.len() - snap.pool.pool_size;
        let mut candidates: Vec<&&Member> = remaining
            .iter()
            .copied()
            .filter(|m| {
                matches!(
                    m.phase(),
                    Phase::Standby
                        | Phase::Warming
                        | Phase::StoppedWithoutNode
                        | Phase::SelfStopped
                )
            })
            .collect();
        // Standby before warming; older launches first; ids break ties.
        candidates.sort_by_key(|m| {
            (
                m.phase() != Phase::Standby,
                launched_at(m),
                m.id().to_owned(),
            )
        });
        for m in candidates.into_iter().take(excess) {
            terminating.push(m.id());
            plan.actions.push(terminate(m, TerminateReason::Trim));
        }
    }

    // From a stale view the destructive decisions above wait; what they would have
    // removed still stands for replenishment.
    hold_unless_current(&mut plan, snap);
    let terminating: Vec<&str> = plan
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Terminate { instance, .. } => Some(instance.as_str()),
            _ => None,
        })
        .collect();

    // Replenish: keep standby + warmup (of the current class) at minStandby, within poolSize.
    if let Some(class) = snap.class.as_ref().filter(|c| c.ready) {
        let kept: Vec<&&Member> = live
            .iter()
            .filter(|m| !terminating.contains(&m.id()))
            .collect();
        let available = kept
            .iter()
            .filter(|m| !drifted(m))
            .filter(|m| {
                matches!(
                    m.phase(),
                    Phase::Warming
                        | Phase::WarmReady
                        | Phase::SelfStopped
                        | Phase::Standby
                        | Phase::StandbyButRunning
                        | Phase::StoppedWithoutNode
                        | Phase::StoppedUnexpectedly
                )
            })
            .count();
        // Pending pods' demand comes from the pod cache: not from a stale one.
        let demand = if snap.view_current {
            snap.pool.demand_nodes
        } else {
            0
        };
        let need = snap.pool.min_standby.saturating_sub(available) + demand;
        // I1 at every instant: an instance counts against poolSize until EC2 says it is
        // terminated — those shutting down, and those this round terminates, included.
        let occupied = snap
            .members
            .iter()
            .filter(|m| m.instance.state != crate::cloud::InstanceState::Terminated)
            .count();
        let room = snap.pool.pool_size.saturating_sub(occupied);
        let count = need.min(room);
        if count > 0 {
            let live_ids: Vec<String> = live.iter().map(|m| m.id().to_owned()).collect();
            let mut existing_per_subnet = BTreeMap::new();
            for m in &kept {
                *existing_per_subnet
                    .entry(m.instance.subnet_id.clone())
                    .or_insert(0) += 1;
            }
            plan.actions.push(Action::Launch {
                count,
                token: launch_token(&snap.pool.uid, &class.hash, &live_ids, count),
                existing_per_subnet,
            });
        }
    }
    plan
}

/// Moves what needs a current view out of the actions when the view is not current.
fn hold_unless_current(plan: &mut Plan, snap: &PoolSnapshot) {
    if snap.view_current {
        return;
    }
    let (mut held, go): (Vec<Action>, Vec<Action>) = std::mem::take(&mut plan.actions)
        .into_iter()
        .partition(|a| needs_current_view(a, &snap.members));
    plan.actions = go;
    plan.held.append(&mut held);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cloud::{Instance, InstanceState, tags},
        pool::state::NodeView,
    };

    const NOW_SECS: u64 = 1_800_000_000;

    fn at(secs_ago: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_SECS - secs_ago)
    }

    fn instance(id: &str, state: InstanceState, tag_state: &str, hash: &str, age: u64) -> Instance {
        Instance {
            id: id.into(),
            state,
            instance_type: "m5.large".into(),
            zone: "us-east-1a".into(),
            subnet_id: "subnet-1".into(),
            private_dns_name: Some(format!("ip-{id}")),
            private_ip: None,
            launch_time: Some(at(age)),
            tags: [
                (tags::STATE, tag_state),
                (tags::NODECLASS_HASH, hash),
                (tags::POOL, "p"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        }
    }

    fn node(
        id: &str,
        label: Option<NodeState>,
        ready: bool,
        ds: (usize, usize),
        prepull: PrePull,
    ) -> NodeView {
        NodeView {
            name: format!("ip-{id}"),
            created: Some(at(60)),
            ready,
            network_ready: ready,
            state_label: label,
            daemonsets_expected: ds.0,
            daemonset_pods_ready: ds.1,
            prepull,
            workload_pods: 0,
            terminating_pods: 0,
            empty_since: None,
            draining_since: None,
            start_requested: None,
        }
    }

    fn member(inst: Instance, node: Option<NodeView>) -> Member {
        Member {
            instance: inst,
            node,
        }
    }

    use InstanceState::{Pending, Running, ShuttingDown, Stopped};
    use NodeState::{Running as RunningLabel, Standby as StandbyLabel, Warmup as WarmupLabel};

    fn warming(id: &str, age: u64) -> Member {
        member(instance(id, Running, "warmup", "h1", age), None)
    }
    fn standby(id: &str, hash: &str) -> Member {
        member(
            instance(id, Stopped, "standby", hash, 3600),
            Some(node(
                id,
                Some(StandbyLabel),
                false,
                (1, 0),
                PrePull::NotNeeded,
            )),
        )
    }
    /// A running node with one workload pod.
    fn running(id: &str) -> Member {
        let mut m = member(
            instance(id, Running, "running", "h1", 3600),
            Some(node(
                id,
                Some(RunningLabel),
                true,
                (1, 1),
                PrePull::NotNeeded,
            )),
        );
        m.node.as_mut().unwrap().workload_pods = 1;
        m
    }

    fn snapshot(members: Vec<Member>, pool_size: usize, min_standby: usize) -> PoolSnapshot {
        PoolSnapshot {
            pool: PoolView {
                name: "p".into(),
                uid: "uid-1".into(),
                pool_size,
                min_standby,
                warmup_timeout: Duration::from_secs(900),
                timeout_action: TimeoutAction::Terminate,
                deleting: false,
                scale_down: Some((Duration::from_secs(300), Duration::from_secs(300))),
                pending_demand: false,
                demand_nodes: 0,
                handoff_nodes: 0,
            },
            class: Some(ClassView {
                hash: "h1".into(),
                ready: true,
            }),
            members,
            now: at(0),
            view_current: true,
        }
    }

    fn summary(plan: &Plan) -> Vec<String> {
        plan.actions
            .iter()
            .map(|a| match a {
                Action::Launch { count, .. } => format!("launch {count}"),
                Action::CreatePrePullPod { node } => format!("prepull {node}"),
                Action::EnterStandby {
                    instance, reason, ..
                } => format!("standby {instance} {reason:?}"),
                Action::Drain { instance, .. } => format!("drain {instance}"),
                Action::Start { instance } => format!("start {instance}"),
                Action::ResumeWarmup { instance } => format!("resume {instance}"),
                Action::Handoff { instance, .. } => format!("handoff {instance}"),
                Action::AbortDrain { instance, .. } => format!("abort-drain {instance}"),
                Action::MarkEmpty { instance, .. } => format!("empty {instance}"),
                Action::ClearEmpty { instance, .. } => format!("busy {instance}"),
                Action::Terminate {
                    instance, reason, ..
                } => format!("terminate {instance} {}", reason.as_str()),
            })
            .collect()
    }

    #[test]
    fn lifecycle_decisions() {
        let with_action = |mut s: PoolSnapshot, action: TimeoutAction| {
            s.pool.timeout_action = action;
            s
        };
        let cases: Vec<(&str, PoolSnapshot, Vec<&str>)> = vec![
            (
                "an empty pool fills to minStandby",
                snapshot(vec![], 10, 3),
                vec!["launch 3"],
            ),
            (
                "warming nodes count toward minStandby",
                snapshot(vec![warming("a", 10), warming("b", 10)], 10, 3),
                vec!["launch 1"],
            ),
            (
                "launches stay within poolSize",
                snapshot(vec![running("a"), running("b")], 3, 3),
                vec!["launch 1"],
            ),
            (
                "a full pool launches nothing",
                snapshot(vec![running("a"), running("b"), running("c")], 3, 3),
                vec![],
            ),
            (
                "ready but DaemonSet pods not ready: still warming",
                snapshot(
                    vec![member(
                        instance("a", Running, "warmup", "h1", 60),
                        Some(node(
                            "a",
                            Some(WarmupLabel),
                            true,
                            (2, 1),
                            PrePull::NotNeeded,
                        )),
                    )],
                    10,
                    1,
                ),
                vec![],
            ),
            (
                "ready, network and DaemonSets ready: into standby",
                snapshot(
                    vec![member(
                        instance("a", Running, "warmup", "h1", 60),
                        Some(node(
                            "a",
                            Some(WarmupLabel),
                            true,
                            (2, 2),
                            PrePull::NotNeeded,
                        )),
                    )],
                    10,
                    1,
                ),
                vec!["standby a WarmupComplete"],
            ),
            (
                "images to pull: the pre-pull pod is created",
                snapshot(
                    vec![member(
                        instance("a", Running, "warmup", "h1", 60),
                        Some(node("a", None, true, (0, 0), PrePull::Missing)),
                    )],
                    10,
                    1,
                ),
                vec!["prepull ip-a"],
            ),
            (
                "pre-pull still running: not warm",
                snapshot(
                    vec![member(
                        instance("a", Running, "warmup", "h1", 60),
                        Some(node("a", None, true, (0, 0), PrePull::Pending)),
                    )],
                    10,
                    1,
                ),
                vec![],
            ),
            (
                "self-stop before warmup was complete: started again to finish (SPEC §5.1)",
                snapshot(
                    vec![member(
                        instance("a", Stopped, "warmup", "h1", 60),
                        Some(node(
                            "a",
                            Some(WarmupLabel),
                            false,
                            (1, 0),
                            PrePull::NotNeeded,
                        )),
                    )],
                    10,
                    1,
                ),
                vec!["resume a"],
            ),
            (
                "a self-stop still stopping: started once stopped",
                snapshot(
                    vec![member(
                        instance("a", InstanceState::Stopping, "warmup", "h1", 60),
                        Some(node(
                            "a",
                            Some(WarmupLabel),
                            false,
                            (1, 0),
                            PrePull::NotNeeded,
                        )),
                    )],
                    10,
                    1,
                ),
                vec![],
            ),
            (
                "a self-stop past the warmup deadline: the timeout action",
                snapshot(
                    vec![member(
                        instance("a", Stopped, "warmup", "h1", 3600),
                        Some(node(
                            "a",
                            Some(WarmupLabel),
                            false,
                            (1, 0),
                            PrePull::NotNeeded,
                        )),
                    )],
                    10,
                    0,
                ),
                vec!["terminate a WarmupTimeout"],
            ),
            (
                "self-stop without a node is a failed warmup",
                snapshot(
                    vec![member(instance("a", Stopped, "warmup", "h1", 60), None)],
                    10,
                    1,
                ),
                vec!["terminate a StoppedBeforeRegistering", "launch 1"],
            ),
            (
                "... or, with timeoutAction stop, standby",
                with_action(
                    snapshot(
                        vec![member(instance("a", Stopped, "warmup", "h1", 60), None)],
                        10,
                        1,
                    ),
                    TimeoutAction::Stop,
                ),
                vec!["standby a StoppedBeforeRegistering"],
            ),
            (
                "a missed warmup deadline terminates",
                snapshot(vec![warming("a", 1000)], 10, 1),
                vec!["terminate a WarmupTimeout", "launch 1"],
            ),
            (
                "... or stops into standby",
                with_action(
                    snapshot(vec![warming("a", 1000)], 10, 1),
                    TimeoutAction::Stop,
                ),
                vec!["standby a WarmupTimeout"],
            ),
            (
                "an interrupted stop into standby resumes",
                snapshot(
                    vec![member(
                        instance("a", Running, "standby", "h1", 60),
                        Some(node(
                            "a",
                            Some(StandbyLabel),
                            true,
                            (0, 0),
                            PrePull::NotNeeded,
                        )),
                    )],
                    10,
                    1,
                ),
                vec!["standby a Resume"],
            ),
            (
                "poolSize lowered below running: standby goes, running stays",
                snapshot(
                    vec![
                        running("a"),
                        running("b"),
                        standby("c", "h1"),
                        standby("d", "h1"),
                    ],
                    2,
                    1,
                ),
                vec!["terminate c Trim", "terminate d Trim"],
            ),
            (
                "trim prefers standby over warming",
                snapshot(
                    vec![warming("a", 10), standby("b", "h1"), standby("c", "h1")],
                    2,
                    2,
                ),
                vec!["terminate b Trim"],
            ),
            (
                "drift replaces standby nodes",
                snapshot(vec![standby("a", "h0"), standby("b", "h1")], 10, 2),
                vec!["terminate a Drift", "launch 1"],
            ),
            (
                "drift leaves running nodes alone",
                snapshot(
                    vec![member(
                        instance("a", Running, "running", "h0", 60),
                        Some(node(
                            "a",
                            Some(RunningLabel),
                            true,
                            (0, 0),
                            PrePull::NotNeeded,
                        )),
                    )],
                    10,
                    0,
                ),
                vec!["empty a"],
            ),
            (
                "terminated instances do not count",
                snapshot(
                    vec![member(
                        instance("a", InstanceState::Terminated, "standby", "h1", 60),
                        None,
                    )],
                    1,
                    1,
                ),
                vec!["launch 1"],
            ),
            (
                "I1: an instance shutting down counts against poolSize until it is terminated",
                snapshot(
                    vec![member(
                        instance("a", ShuttingDown, "standby", "h1", 60),
                        None,
                    )],
                    1,
                    1,
                ),
                vec![],
            ),
            (
                "I1: a failed warmup in a full pool is replaced once its instance is gone, not in the same round",
                snapshot(
                    vec![member(instance("a", Stopped, "warmup", "h1", 30), None)],
                    1,
                    1,
                ),
                vec!["terminate a StoppedBeforeRegistering"],
            ),
            (
                "a failed warmup with room in the pool is replaced at once",
                snapshot(
                    vec![member(instance("a", Stopped, "warmup", "h1", 30), None)],
                    2,
                    1,
                ),
                vec!["terminate a StoppedBeforeRegistering", "launch 1"],
            ),
            (
                "pending instances count",
                snapshot(
                    vec![member(instance("a", Pending, "warmup", "h1", 5), None)],
                    1,
                    1,
                ),
                vec![],
            ),
            (
                "a start marked on the node but not issued yet is (re-)issued, not undone",
                snapshot(
                    vec![member(
                        instance("a", Stopped, "standby", "h1", 60),
                        Some(node(
                            "a",
                            Some(NodeState::Starting),
                            false,
                            (0, 0),
                            PrePull::NotNeeded,
                        )),
                    )],
                    10,
                    0,
                ),
                vec!["start a"],
            ),
        ];
        for (what, snap, expected) in cases {
            assert_eq!(summary(&plan_pool(&snap)), expected, "{what}");
        }
    }

    #[test]
    fn a_stale_view_decides_nothing_destructive() {
        let stale = |mut s: PoolSnapshot| {
            s.view_current = false;
            s
        };
        let empty_for_an_hour = |id: &str| {
            let mut m = running(id);
            let n = m.node.as_mut().unwrap();
            n.workload_pods = 0;
            n.empty_since = Some(at(3600));
            m
        };
        let warm_ready = |id: &str| {
            member(
                instance(id, Running, "warmup", "h1", 30),
                Some(node(
                    id,
                    Some(WarmupLabel),
                    true,
                    (1, 1),
                    PrePull::NotNeeded,
                )),
            )
        };
        let self_stopped = |id: &str| {
            member(
                instance(id, Stopped, "warmup", "h1", 30),
                Some(node(
                    id,
                    Some(WarmupLabel),
                    false,
                    (1, 1),
                    PrePull::NotNeeded,
                )),
            )
        };
        let stopped_without_node =
            |id: &str| member(instance(id, Stopped, "warmup", "h1", 30), None);
        let mut deleting = snapshot(vec![standby("a", "h1"), running("b")], 3, 1);
        deleting.pool.deleting = true;
        let mut demand = snapshot(vec![], 5, 0);
        demand.pool.demand_nodes = 2;
        // (what, snapshot, actions taken, actions held)
        let cases: Vec<(&str, PoolSnapshot, Vec<&str>, Vec<&str>)> = vec![
            (
                "a stopped warming instance without a cached Node is not judged a failed warmup",
                snapshot(vec![stopped_without_node("a")], 4, 1),
                vec![],
                vec!["terminate a StoppedBeforeRegistering"],
            ),
            (
                "same with timeoutAction Stop: not marked standby either",
                {
                    let mut s = snapshot(vec![stopped_without_node("a")], 4, 1);
                    s.pool.timeout_action = TimeoutAction::Stop;
                    s
                },
                vec![],
                vec!["standby a StoppedBeforeRegistering"],
            ),
            (
                "trim terminates nothing",
                snapshot(vec![standby("a", "h1"), standby("b", "h1")], 1, 1),
                vec![],
                vec!["terminate a Trim"],
            ),
            (
                "drift terminates nothing (the current class's replacement still launches)",
                snapshot(vec![standby("a", "h0"), standby("b", "h1")], 10, 2),
                vec!["launch 1"],
                vec!["terminate a Drift"],
            ),
            (
                "a warm running node is not stopped",
                snapshot(vec![warm_ready("a")], 4, 1),
                vec![],
                vec!["standby a WarmupComplete"],
            ),
            (
                "an empty node past its TTL is not drained",
                snapshot(vec![empty_for_an_hour("a")], 4, 0),
                vec![],
                vec!["drain a"],
            ),
            (
                "a deleted pool terminates and drains nothing",
                deleting,
                vec![],
                vec!["terminate a PoolDeleted", "drain b"],
            ),
            (
                "a raised minStandby still launches, within poolSize",
                snapshot(vec![standby("a", "h1")], 4, 3),
                vec!["launch 2"],
                vec![],
            ),
            (
                "pending pods' demand is not launched for from a stale pod cache",
                demand,
                vec![],
                vec![],
            ),
            (
                "a self-stopped node with its Node cached resumes its warmup (a start)",
                snapshot(vec![self_stopped("a")], 4, 1),
                vec!["resume a"],
                vec![],
            ),
        ];
        for (what, snap, taken, held) in cases {
            let fresh = plan_pool(&snap);
            let plan = plan_pool(&stale(snap));
            assert_eq!(summary(&plan), taken, "{what}");
            let held_plan = Plan {
                actions: plan.held.clone(),
                ..Default::default()
            };
            assert_eq!(summary(&held_plan), held, "{what}: held");
            // What is held is exactly what a current view would have done on top.
            let mut all = plan.actions.clone();
            all.extend(plan.held.clone());
            for a in &fresh.actions {
                assert!(
                    all.contains(a) || matches!(a, Action::Launch { .. }),
                    "{what}: {a:?} neither taken nor held"
                );
            }
        }
    }

    #[test]
    fn empty_nodes_drain_back_to_standby_after_the_ttl() {
        let with = |workload: usize,
                    empty_for: Option<u64>,
                    draining_for: Option<u64>,
                    state: NodeState| {
            let mut m = running("a");
            let n = m.node.as_mut().unwrap();
            n.state_label = Some(state);
            n.workload_pods = workload;
            n.empty_since = empty_for.map(at);
            n.draining_since = draining_for.map(at);
            m
        };
        let terminating = |mut m: Member| {
            m.node.as_mut().unwrap().terminating_pods = 1;
            m
        };
        let cases = [
            (
                "a running node just became empty",
                with(0, None, None, RunningLabel),
                false,
                vec!["empty a"],
            ),
            (
                "empty, TTL not yet reached",
                with(0, Some(60), None, RunningLabel),
                false,
                vec![],
            ),
            (
                "empty for the TTL: drain",
                with(0, Some(301), None, RunningLabel),
                false,
                vec!["drain a"],
            ),
            (
                "empty for the TTL but pods pending for the pool",
                with(0, Some(301), None, RunningLabel),
                true,
                vec![],
            ),
            (
                "busy again",
                with(2, Some(60), None, RunningLabel),
                false,
                vec!["busy a"],
            ),
            (
                "drained: into standby",
                with(0, Some(400), Some(5), NodeState::Draining),
                false,
                vec!["standby a Drained"],
            ),
            (
                "still evicting",
                with(1, None, Some(5), NodeState::Draining),
                false,
                vec!["drain a"],
            ),
            (
                "drain timed out: abort",
                with(1, None, Some(301), NodeState::Draining),
                false,
                vec!["abort-drain a"],
            ),
            (
                "evicted, still terminating: the drain waits for it to be gone",
                terminating(with(0, Some(400), Some(5), NodeState::Draining)),
                false,
                vec!["drain a"],
            ),
            (
                "a pod in its grace period: not empty",
                terminating(with(0, None, None, RunningLabel)),
                false,
                vec![],
            ),
            (
                "terminating past the drain timeout: abort, never stop under it",
                terminating(with(0, None, Some(301), NodeState::Draining)),
                false,
                vec!["abort-drain a"],
            ),
        ];
        for (what, member, demand, expected) in cases {
            let mut snap = snapshot(vec![member], 10, 0);
            snap.pool.pending_demand = demand;
            assert_eq!(summary(&plan_pool(&snap)), expected, "{what}");
        }
        let mut disabled = snapshot(vec![with(0, Some(10_000), None, RunningLabel)], 10, 0);
        disabled.pool.scale_down = None;
        assert!(
            plan_pool(&disabled).actions.is_empty(),
            "scaleDown.enabled: false keeps empty nodes"
        );
    }

    #[test]
    fn standby_exhausted_launches_for_the_pods_and_hands_warm_nodes_over() {
        let mut snap = snapshot(vec![running("a")], 4, 0);
        snap.pool.pending_demand = true;
        snap.pool.demand_nodes = 5;
        assert_eq!(
            summary(&plan_pool(&snap)),
            vec!["launch 3"],
            "up to poolSize"
        );
        let warm = member(
            instance("w", Running, "warmup", "h1", 60),
            Some(node(
                "w",
                Some(WarmupLabel),
                true,
                (0, 0),
                PrePull::NotNeeded,
            )),
        );
        let mut snap = snapshot(vec![warm], 4, 1);
        snap.pool.pending_demand = true;
        snap.pool.handoff_nodes = 1;
        assert_eq!(summary(&plan_pool(&snap)), vec!["handoff w"]);
        snap.pool.handoff_nodes = 0;
        assert_eq!(
            summary(&plan_pool(&snap)),
            vec!["standby w WarmupComplete"],
            "pods already covered: standby"
        );
    }

    #[test]
    fn nothing_launches_without_a_ready_class() {
        let mut snap = snapshot(vec![], 10, 3);
        snap.class = None;
        let plan = plan_pool(&snap);
        assert!(plan.actions.is_empty());
        assert_eq!(plan.problems, vec![Problem::NodeClassNotFound]);
        snap.class = Some(ClassView {
            hash: "h1".into(),
            ready: false,
        });
        let plan = plan_pool(&snap);
        assert!(plan.actions.is_empty());
        assert_eq!(plan.problems, vec![Problem::NodeClassNotReady]);
    }

    #[test]
    fn deletion_drains_busy_nodes_and_terminates_the_rest() {
        let mut busy = running("a");
        busy.node.as_mut().unwrap().workload_pods = 2;
        let mut idle = running("b");
        idle.node.as_mut().unwrap().workload_pods = 0;
        let mut snap = snapshot(
            vec![
                busy,
                idle,
                standby("c", "h1"),
                member(instance("d", Pending, "warmup", "h1", 5), None),
            ],
            10,
            3,
        );
        snap.pool.deleting = true;
        let mut going = running("e");
        going.node.as_mut().unwrap().terminating_pods = 1;
        let mut waiting = snap.clone();
        waiting.members = vec![going];
        assert_eq!(
            summary(&plan_pool(&waiting)),
            vec!["drain e"],
            "pool deletion waits for a terminating pod before terminating the instance"
        );
        assert_eq!(
            summary(&plan_pool(&snap)),
            vec![
                "drain a",
                "terminate b PoolDeleted",
                "terminate c PoolDeleted",
                "terminate d PoolDeleted"
            ]
        );
    }

    #[test]
    fn launch_tokens_are_stable_for_the_same_observed_state() {
        let snap = snapshot(vec![standby("a", "h1")], 10, 3);
        let token = |p: &Plan| match &p.actions[0] {
            Action::Launch { token, .. } => token.clone(),
            other => panic!("{other:?}"),
        };
        let first = token(&plan_pool(&snap));
        assert_eq!(
            first,
            token(&plan_pool(&snap)),
            "a retry after a crash sends the same token"
        );
        let changed = snapshot(vec![standby("b", "h1")], 10, 3);
        assert_ne!(first, token(&plan_pool(&changed)));
    }

    #[test]
    fn counts_follow_phases() {
        let snap = snapshot(
            vec![
                warming("a", 1),
                standby("b", "h1"),
                running("c"),
                member(instance("d", ShuttingDown, "standby", "h1", 1), None),
            ],
            10,
            0,
        );
        let c = plan_pool(&snap).counts;
        assert_eq!((c.warmup, c.standby, c.running, c.total), (1, 1, 1, 3));
    }
}
