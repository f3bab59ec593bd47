//! The node and instance contract (SPEC §4): every label, annotation, taint, finalizer and
//! tag key Stratos reads or writes, in one place. Changing one is a breaking change for
//! users' selectors, IAM conditions and running clusters.

/// Node label: the pool a node belongs to (also a template label of every pool).
pub const POOL_LABEL: &str = "stratos.sh/pool";
/// Node label: where the node is in its lifecycle (`warmup`, `standby`, `starting`,
/// `running`, `draining`).
pub const STATE_LABEL: &str = "stratos.sh/state";

/// Taint on standby nodes (`stratos.sh/standby=true:NoSchedule`): nothing lands on a node
/// about to stop, or stopped.
pub const STANDBY_TAINT: &str = "stratos.sh/standby";

/// Node annotation: since when a running node has been empty (survives restarts).
pub const EMPTY_SINCE: &str = "stratos.sh/empty-since";
/// Node annotation: when its drain began.
pub const DRAINING_SINCE: &str = "stratos.sh/draining-since";
/// Node annotation: when it was last started (most-recently-used order, start → Ready).
pub const LAST_USED: &str = "stratos.sh/last-used";

/// Finalizer on NodePools: their instances and Nodes go before they do.
pub const POOL_FINALIZER: &str = "stratos.sh/nodepool";
/// Finalizer on AWSNodeClasses while a NodePool refers to them.
pub const CLASS_FINALIZER: &str = "stratos.sh/nodeclass-in-use";

/// EC2 tags on every instance (and volume) Stratos owns. IAM policies condition on
/// `stratos.sh/cluster`; Stratos never acts on an instance without it.
pub mod tags {
    pub const CLUSTER: &str = "stratos.sh/cluster";
    pub const POOL: &str = "stratos.sh/pool";
    pub const NODECLASS_HASH: &str = "stratos.sh/nodeclass-hash";
    /// A mirror of the node's state, for humans and IAM.
    pub const STATE: &str = "stratos.sh/state";
    pub const NAME: &str = "Name";
}
