//! `NodePool`: a pool of reusable nodes and its policies (SPEC §3.2). Pure data and schema; no I/O.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::Taint,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::Duration;

pub use crate::contract::{POOL_LABEL, STATE_LABEL};

/// NodePool keeps a pool of pre-warmed instances: launched once, warmed, stopped, and
/// started again on demand.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "stratos.sh",
    version = "v1alpha1",
    kind = "NodePool",
    plural = "nodepools",
    singular = "nodepool",
    shortname = "np",
    category = "stratos",
    status = "NodePoolStatus",
    derive = "PartialEq",
    doc = "NodePool keeps a pool of pre-warmed, reusable nodes: launched once, warmed, stopped, and started again when pods are pending.",
    validation = Rule::new("!has(self.spec.template.labels) || !('stratos.sh/pool' in self.spec.template.labels) || self.spec.template.labels['stratos.sh/pool'] == self.metadata.name")
        .message("the label stratos.sh/pool, when set, must equal the NodePool's name")
        .field_path(".spec.template.labels"),
    validation = Rule::new("self.metadata.name.size() <= 63")
        .message("metadata.name: a NodePool's name is used as a label value and must be at most 63 characters"),
    printcolumn = r#"{"name":"POOLSIZE","type":"integer","jsonPath":".spec.poolSize"}"#,
    printcolumn = r#"{"name":"MINSTANDBY","type":"integer","jsonPath":".spec.minStandby"}"#,
    printcolumn = r#"{"name":"STANDBY","type":"integer","jsonPath":".status.standby"}"#,
    printcolumn = r#"{"name":"RUNNING","type":"integer","jsonPath":".status.running"}"#,
    printcolumn = r#"{"name":"WARMUP","type":"integer","jsonPath":".status.warmup"}"#,
    printcolumn = r#"{"name":"READY","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.minStandby <= self.poolSize", "message": "minStandby must be less than or equal to poolSize", "fieldPath": ".minStandby"},
]))]
pub struct NodePoolSpec {
    /// Hard cap on the pool's non-terminated instances, in every state.
    #[schemars(range(min = 1, max = 5000))]
    pub pool_size: i32,

    /// Stopped, ready-to-start nodes to keep; warming nodes count toward it.
    #[schemars(range(min = 0, max = 5000))]
    pub min_standby: i32,

    pub template: NodeTemplate,

    #[serde(default)]
    pub pre_warm: PreWarm,

    #[serde(default)]
    pub scale_down: ScaleDown,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeTemplate {
    pub node_class_ref: NodeClassRef,

    /// Labels applied to every node of the pool; `stratos.sh/pool=<name>` is always added.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "!('stratos.sh/state' in self)", "message": "the label stratos.sh/state is managed by Stratos and may not be set"},
    ]))]
    pub labels: BTreeMap<String, String>,

    /// Permanent taints on every node of the pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [
        {"rule": "self.all(t, t.effect in ['NoSchedule', 'PreferNoSchedule', 'NoExecute'])", "message": "taint effect must be NoSchedule, PreferNoSchedule or NoExecute"},
    ]))]
    pub taints: Vec<Taint>,

    /// Taints the node's bootstrap registers and Stratos removes per `startupTaintRemoval`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [
        {"rule": "self.all(t, t.effect in ['NoSchedule', 'PreferNoSchedule', 'NoExecute'])", "message": "taint effect must be NoSchedule, PreferNoSchedule or NoExecute"},
    ]))]
    pub startup_taints: Vec<Taint>,

    #[serde(default)]
    pub startup_taint_removal: StartupTaintRemoval,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.kind == 'AWSNodeClass'", "message": "nodeClassRef.kind must be AWSNodeClass", "fieldPath": ".kind"},
]))]
pub struct NodeClassRef {
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// When Stratos removes `startupTaints`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum StartupTaintRemoval {
    /// Once the node is Ready and its CNI reports the network ready.
    #[default]
    WhenNetworkReady,
    /// As soon as the node is Ready.
    WhenNodeReady,
    /// Never; something else removes them.
    Never,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreWarm {
    /// Warmup deadline, counted from launch.
    #[serde(default = "default_prewarm_timeout")]
    pub timeout: Duration,

    /// What happens to an instance that misses the deadline.
    #[serde(default)]
    pub timeout_action: TimeoutAction,

    /// Images pulled onto the node during warmup, in addition to DaemonSet images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 1024)))]
    pub images_to_pull: Vec<String>,
}

impl Default for PreWarm {
    fn default() -> Self {
        Self {
            timeout: default_prewarm_timeout(),
            timeout_action: TimeoutAction::default(),
            images_to_pull: Vec::new(),
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutAction {
    #[default]
    Terminate,
    Stop,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDown {
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// How long a running node must be empty before it returns to standby.
    #[serde(rename = "emptyNodeTTL", default = "default_empty_node_ttl")]
    pub empty_node_ttl: Duration,

    /// How long a drain may take before it is aborted and the node returns to running.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Duration,
}

impl Default for ScaleDown {
    fn default() -> Self {
        Self {
            enabled: true,
            empty_node_ttl: default_empty_node_ttl(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

/// Observed state of a NodePool.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePoolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    #[serde(default)]
    pub warmup: i32,
    #[serde(default)]
    pub standby: i32,
    #[serde(default)]
    pub starting: i32,
    #[serde(default)]
    pub running: i32,
    #[serde(default)]
    pub draining: i32,
    #[serde(default)]
    pub total: i32,

    /// `Ready` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_up: Option<LastScaleUp>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastScaleUp {
    pub time: Time,
    /// Nodes started or launched.
    pub nodes: i32,
    /// Pending pods the scale-up was for.
    pub pods: i32,
}

fn default_true() -> bool {
    true
}

fn default_prewarm_timeout() -> Duration {
    Duration::from_secs(15 * 60)
}

fn default_empty_node_ttl() -> Duration {
    Duration::from_secs(5 * 60)
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(5 * 60)
}
