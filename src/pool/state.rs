//! A pool member's lifecycle state, derived from its instance and its Node (SPEC §4, §5).
//!
//! The Node's `stratos.sh/state` label (or, before a Node exists, the instance's tag) is
//! the *intent*: Stratos writes it before it acts. The instance's EC2 state is what
//! happened. Reading both lets a restarted operator resume any half-done transition.

use std::{fmt, time::SystemTime};

use crate::cloud::{Instance, InstanceState, tags};

/// The lifecycle states of SPEC §5, as labels and tags spell them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeState {
    Warmup,
    Standby,
    Starting,
    Running,
    Draining,
}

impl NodeState {
    pub const ALL: [NodeState; 5] = [
        Self::Warmup,
        Self::Standby,
        Self::Starting,
        Self::Running,
        Self::Draining,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Warmup => "warmup",
            Self::Standby => "standby",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Draining => "draining",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The image pre-pull pod of a warming node (SPEC §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrePull {
    /// The pool pulls no extra images.
    NotNeeded,
    Missing,
    Pending,
    Succeeded,
    Failed,
}

/// What the planner needs to know about a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub created: Option<SystemTime>,
    pub ready: bool,
    /// SPEC §5.4: NetworkUnavailable=False, NetworkingReady=True, or the aws-node pod Ready.
    pub network_ready: bool,
    pub state_label: Option<NodeState>,
    /// DaemonSets that would run a pod on this node.
    pub daemonsets_expected: usize,
    /// Of those, how many have a Ready pod on it.
    pub daemonset_pods_ready: usize,
    pub prepull: PrePull,
    /// Pods a drain must evict: not DaemonSet, not mirror, not finished, not being deleted.
    pub workload_pods: usize,
    /// Pods being deleted that still run (in their termination grace period): a drain is
    /// finished, and the node empty, only once they are gone (SPEC §5.6, I3).
    pub terminating_pods: usize,
    /// Since when the node has run no workload (the `stratos.sh/empty-since` annotation).
    pub empty_since: Option<SystemTime>,
    /// Since when the node has been draining (`stratos.sh/draining-since`).
    pub draining_since: Option<SystemTime>,
    /// When a start was last requested for it (`stratos.sh/last-used`).
    pub start_requested: Option<SystemTime>,
}

impl NodeView {
    /// Whether any pod other than DaemonSet, mirror and finished pods is on the node,
    /// evicted or not.
    pub fn holds_pods(&self) -> bool {
        self.workload_pods + self.terminating_pods > 0
    }

    /// SPEC §5.1: Ready, network ready, every DaemonSet pod Ready, images pulled.
    pub fn warm(&self) -> bool {
        self.ready
            && self.network_ready
            && self.daemonset_pods_ready >= self.daemonsets_expected
            && matches!(self.prepull, PrePull::NotNeeded | PrePull::Succeeded)
    }
}

/// One instance of the pool and its Node, if it registered one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub instance: Instance,
    pub node: Option<NodeView>,
}

/// Where a member is, from intent and the instance's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Launched and not yet warm.
    Warming,
    /// Warm and running: stop it into standby.
    WarmReady,
    /// Stopped by itself after its node registered (the bootstrap's `poweroff`).
    SelfStopped,
    /// Stopped before any Node registered: warmup failed.
    StoppedWithoutNode,
    /// Stopped (or stopping) with standby intent.
    Standby,
    /// Standby intent but running: an interrupted stop to resume.
    StandbyButRunning,
    /// Start issued, node not Ready yet.
    Starting,
    /// Starting intent, instance still stopped: the start is yet to be issued (or to show
    /// in a listing); issuing it again is harmless.
    StartPending,
    Running,
    Draining,
    /// Running, starting or draining intent, but the instance stopped.
    StoppedUnexpectedly,
    /// Shutting down or terminated.
    Gone,
}

impl Member {
    pub fn id(&self) -> &str {
        &self.instance.id
    }

    pub fn node_name(&self) -> Option<&str> {
        self.node.as_ref().map(|n| n.name.as_str())
    }

    /// The intent: the Node's label, else the instance's tag, else warmup.
    pub fn intent(&self) -> NodeState {
        self.node
            .as_ref()
            .and_then(|n| n.state_label)
            .or_else(|| self.instance.tag(tags::STATE).and_then(NodeState::parse))
            .unwrap_or(NodeState::Warmup)
    }

    pub fn phase(&self) -> Phase {
        use InstanceState as I;
        let stopped = matches!(self.instance.state, I::Stopping | I::Stopped);
        if !self.instance.state.is_live() {
            return Phase::Gone;
        }
        match self.intent() {
            NodeState::Warmup => match (stopped, &self.node) {
                (true, Some(_)) => Phase::SelfStopped,
                (true, None) => Phase::StoppedWithoutNode,
                (false, Some(n)) if n.warm() && self.instance.state == I::Running => {
                    Phase::WarmReady
                }
                (false, _) => Phase::Warming,
            },
            NodeState::Standby => {
                if stopped {
                    Phase::Standby
                } else {
                    Phase::StandbyButRunning
                }
            }
            NodeState::Starting if stopped => Phase::StartPending,
            NodeState::Running | NodeState::Draining if stopped => Phase::StoppedUnexpectedly,
            NodeState::Starting => {
                if self.node.as_ref().is_some_and(|n| n.ready) {
                    Phase::Running
                } else {
                    Phase::Starting
                }
            }
            NodeState::Running => Phase::Running,
            NodeState::Draining => Phase::Draining,
        }
    }

    pub fn nodeclass_hash(&self) -> Option<&str> {
        self.instance.tag(tags::NODECLASS_HASH)
    }
}

impl Phase {
    /// The state this phase counts as in the pool's status.
    pub fn counted_as(self) -> Option<NodeState> {
        match self {
            // A self-stop before warmup completed is still warming up: never standby
            // capacity with its warmup incomplete (SPEC §5.1).
            Self::Warming | Self::WarmReady | Self::SelfStopped => Some(NodeState::Warmup),
            Self::StoppedWithoutNode
            | Self::Standby
            | Self::StandbyButRunning
            | Self::StoppedUnexpectedly => Some(NodeState::Standby),
            Self::Starting | Self::StartPending => Some(NodeState::Starting),
            Self::Running => Some(NodeState::Running),
            Self::Draining => Some(NodeState::Draining),
            Self::Gone => None,
        }
    }
}
