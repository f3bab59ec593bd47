//! The cloud layer (SPEC §7): the only place that knows AWS.
//!
//! [`CloudProvider`] is what controllers call; [`ec2::Ec2Cloud`] implements it on EC2 and
//! [`fake::FakeCloud`] in memory for tests, the sandbox and benchmarks. Every call acts on
//! many instances at once and reports each id's outcome, so one bad id never hides the others.
//! This module never decides *what* to launch, start or stop; it only does it.

pub mod ec2;
pub mod fake;
pub mod ratelimit;

use std::{collections::BTreeMap, fmt, time::SystemTime};

use async_trait::async_trait;

use crate::api::awsnodeclass::{
    AWSNodeClassSpec, BlockDeviceMapping, HttpEndpoint, HttpTokens, MetadataOptions, ResolvedSubnet,
};

/// Tag and label keys of the instance/node contract (SPEC §4).
pub use crate::contract::tags;

/// At most this many ids go into one Start/Stop/Terminate call (EC2's own limit).
pub const MAX_IDS_PER_CALL: usize = 1000;

/// Typed cloud errors (SPEC §7). The string is the provider's message, for events and logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("throttled: {0}")]
    Throttled(String),
    #[error("insufficient capacity: {0}")]
    InsufficientCapacity(String),
    #[error("invalid state: {0}")]
    InvalidState(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("{0}")]
    Other(String),
}

impl CloudError {
    /// Short label for metrics and condition reasons.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not_found",
            Self::Throttled(_) => "throttled",
            Self::InsufficientCapacity(_) => "insufficient_capacity",
            Self::InvalidState(_) => "invalid_state",
            Self::Unauthorized(_) => "unauthorized",
            Self::Other(_) => "error",
        }
    }
}

/// EC2 instance states, as the lifecycle needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InstanceState {
    Pending,
    Running,
    Stopping,
    Stopped,
    ShuttingDown,
    Terminated,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::ShuttingDown => "shutting-down",
            Self::Terminated => "terminated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "stopping" => Self::Stopping,
            "stopped" => Self::Stopped,
            "shutting-down" => Self::ShuttingDown,
            "terminated" => Self::Terminated,
            _ => return None,
        })
    }

    /// Counts toward `poolSize` (SPEC §3.2: "non-terminated instances, in every state").
    pub fn is_live(self) -> bool {
        !matches!(self, Self::ShuttingDown | Self::Terminated)
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One instance as the provider reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub state: InstanceState,
    pub instance_type: String,
    pub zone: String,
    pub subnet_id: String,
    pub private_dns_name: Option<String>,
    pub private_ip: Option<String>,
    pub launch_time: Option<SystemTime>,
    pub tags: BTreeMap<String, String>,
}

impl Instance {
    /// `aws:///<zone>/<instance-id>`, the Node's `spec.providerID` (SPEC §4).
    pub fn provider_id(&self) -> String {
        format!("aws:///{}/{}", self.zone, self.id)
    }

    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
}

/// Parses `aws:///<zone>/<instance-id>` (also the `aws://<zone>/<id>` variant) into
/// (zone, instance id).
pub fn parse_provider_id(provider_id: &str) -> Option<(&str, &str)> {
    let rest = provider_id.strip_prefix("aws://")?.trim_start_matches('/');
    let (zone, id) = rest.split_once('/')?;
    (id.starts_with("i-") && !id.contains('/')).then_some((zone, id))
}

/// Everything EC2 needs to launch one of a class's instances; derived from the
/// AWSNodeClass spec so the cloud layer does not depend on the CRD's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    pub instance_type: String,
    pub ami: String,
    pub subnet_ids: Vec<String>,
    pub security_group_ids: Vec<String>,
    pub iam_instance_profile: String,
    pub user_data: Option<String>,
    pub block_device_mappings: Vec<BlockDeviceMapping>,
    pub metadata_http_tokens: HttpTokens,
    pub metadata_hop_limit: i32,
    pub metadata_http_endpoint: HttpEndpoint,
}

impl From<&AWSNodeClassSpec> for LaunchSpec {
    fn from(spec: &AWSNodeClassSpec) -> Self {
        let MetadataOptions {
            http_tokens,
            http_put_response_hop_limit,
            http_endpoint,
        } = spec.metadata_options.clone();
        Self {
            instance_type: spec.instance_type.clone(),
            ami: spec.ami.clone(),
            subnet_ids: spec.subnet_ids.clone(),
            security_group_ids: spec.security_group_ids.clone(),
            iam_instance_profile: spec.iam_instance_profile.clone(),
            user_data: spec.user_data.clone(),
            block_device_mappings: spec.block_device_mappings.clone(),
            metadata_http_tokens: http_tokens,
            metadata_hop_limit: http_put_response_hop_limit,
            metadata_http_endpoint: http_endpoint,
        }
    }
}

/// The instance profile field of RunInstances takes either an ARN or a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceProfileRef<'a> {
    Arn(&'a str),
    Name(&'a str),
}

impl LaunchSpec {
    pub fn instance_profile(&self) -> InstanceProfileRef<'_> {
        if self.iam_instance_profile.starts_with("arn:") {
            InstanceProfileRef::Arn(&self.iam_instance_profile)
        } else {
            InstanceProfileRef::Name(&self.iam_instance_profile)
        }
    }
}

/// A batched launch. `existing_per_subnet` is how many live instances of the pool each
/// subnet already holds, so new ones even out the zones; `client_token` must be derived
/// from the same snapshot, so a retry (or a restart that sees the same state) sends the same
/// token and EC2 returns the original instances instead of launching more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    pub spec: LaunchSpec,
    pub count: usize,
    /// Every tag for the instances and their volumes (SPEC §4), `Name` excluded: it needs
    /// the instance id and is set right after launch.
    pub tags: BTreeMap<String, String>,
    pub client_token: String,
    pub existing_per_subnet: BTreeMap<String, usize>,
}

/// What a launch produced: the instances that exist, and what failed for the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchOutcome {
    pub instances: Vec<Instance>,
    pub errors: Vec<CloudError>,
}

/// Per-id result of a Start/Stop/Terminate batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub succeeded: Vec<String>,
    pub failed: Vec<(String, CloudError)>,
}

impl BatchOutcome {
    pub fn all_failed(ids: &[String], error: &CloudError) -> Self {
        Self {
            succeeded: Vec::new(),
            failed: ids.iter().map(|id| (id.clone(), error.clone())).collect(),
        }
    }

    pub fn merge(&mut self, other: BatchOutcome) {
        self.succeeded.extend(other.succeeded);
        self.failed.extend(other.failed);
    }
}

/// The parts of a node class that must exist in the cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeClassRefs {
    pub ami: String,
    pub subnet_ids: Vec<String>,
    pub security_group_ids: Vec<String>,
}

impl From<&AWSNodeClassSpec> for NodeClassRefs {
    fn from(spec: &AWSNodeClassSpec) -> Self {
        Self {
            ami: spec.ami.clone(),
            subnet_ids: spec.subnet_ids.clone(),
            security_group_ids: spec.security_group_ids.clone(),
        }
    }
}

/// Result of checking a node class: what was found, and what is missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeClassCheck {
    /// The class's subnets that exist, in the class's order, with their zones.
    pub subnets: Vec<ResolvedSubnet>,
    /// One human-readable line per missing or unusable reference; empty when the class is
    /// usable.
    pub problems: Vec<String>,
}

impl NodeClassCheck {
    pub fn is_ready(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The operations Stratos needs from a cloud (SPEC §7).
///
/// Implementations are scoped to one cluster: `list_instances` returns only instances
/// carrying that cluster's tag, and callers act only on ids from that listing.
#[async_trait]
pub trait CloudProvider: Send + Sync + 'static {
    /// Launches `count` instances, spread across the spec's subnets.
    async fn launch(&self, request: &LaunchRequest) -> LaunchOutcome;

    async fn start_instances(&self, ids: &[String]) -> BatchOutcome;

    async fn stop_instances(&self, ids: &[String]) -> BatchOutcome;

    async fn terminate_instances(&self, ids: &[String]) -> BatchOutcome;

    /// Every instance of the cluster, terminated ones included while the cloud still
    /// reports them.
    async fn list_instances(&self) -> Result<Vec<Instance>, CloudError>;

    /// Adds or overwrites tags on instances.
    async fn set_tags(
        &self,
        ids: &[String],
        tags: &BTreeMap<String, String>,
    ) -> Result<(), CloudError>;

    /// Checks that the class's AMI, subnets and security groups exist.
    async fn check_node_class(&self, refs: &NodeClassRefs) -> Result<NodeClassCheck, CloudError>;
}

/// Splits `count` new instances across `subnets` so that each subnet's total (existing +
/// new) is as even as possible; ties go to the subnet listed first. Deterministic, so a
/// retried launch computes the same split (and sends the same per-subnet tokens).
pub fn spread_across_subnets(
    subnets: &[String],
    existing: &BTreeMap<String, usize>,
    count: usize,
) -> Vec<(String, usize)> {
    if subnets.is_empty() || count == 0 {
        return Vec::new();
    }
    let mut totals: Vec<usize> = subnets
        .iter()
        .map(|s| existing.get(s).copied().unwrap_or(0))
        .collect();
    let mut added = vec![0usize; subnets.len()];
    for _ in 0..count {
        let (idx, _) = totals
            .iter()
            .enumerate()
            .min_by_key(|(i, total)| (**total, *i))
            .expect("subnets is not empty");
        totals[idx] += 1;
        added[idx] += 1;
    }
    subnets
        .iter()
        .zip(added)
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| (s.clone(), n))
        .collect()
}

/// Splits ids into EC2-sized batches.
pub fn batches(ids: &[String]) -> impl Iterator<Item = &[String]> {
    ids.chunks(MAX_IDS_PER_CALL)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnets(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn spreads_new_instances_to_even_out_subnets() {
        type Counts<'a> = &'a [(&'a str, usize)];
        let cases: &[(&[&str], Counts, usize, Counts)] = &[
            (&["a", "b", "c"], &[], 3, &[("a", 1), ("b", 1), ("c", 1)]),
            (&["a", "b", "c"], &[], 4, &[("a", 2), ("b", 1), ("c", 1)]),
            (&["a", "b"], &[("a", 3)], 3, &[("b", 3)]),
            (&["a", "b"], &[("a", 1)], 3, &[("a", 1), ("b", 2)]),
            (&["a", "b"], &[("a", 5)], 2, &[("b", 2)]),
            (&["a"], &[("a", 2)], 2, &[("a", 2)]),
            (&["a", "b"], &[], 0, &[]),
            (&[], &[], 3, &[]),
            // Instances in a subnet no longer listed do not distort the split.
            (&["a", "b"], &[("z", 9)], 2, &[("a", 1), ("b", 1)]),
        ];
        for (names, existing, count, expected) in cases {
            let existing: BTreeMap<String, usize> =
                existing.iter().map(|(s, n)| (s.to_string(), *n)).collect();
            let got = spread_across_subnets(&subnets(names), &existing, *count);
            let expected: Vec<(String, usize)> =
                expected.iter().map(|(s, n)| (s.to_string(), *n)).collect();
            assert_eq!(got, expected, "{names:?} {existing:?} {count}");
        }
    }

    #[test]
    fn provider_ids_round_trip() {
        let inst = Instance {
            id: "i-0abc".into(),
            state: InstanceState::Running,
            instance_type: "m5.large".into(),
            zone: "us-east-1a".into(),
            subnet_id: "subnet-1".into(),
            private_dns_name: None,
            private_ip: None,
            launch_time: None,
            tags: BTreeMap::new(),
        };
        assert_eq!(inst.provider_id(), "aws:///us-east-1a/i-0abc");
        assert_eq!(
            parse_provider_id(&inst.provider_id()),
            Some(("us-east-1a", "i-0abc"))
        );
        assert_eq!(
            parse_provider_id("aws://us-east-1a/i-1"),
            Some(("us-east-1a", "i-1"))
        );
        assert_eq!(parse_provider_id("gce://p/z/i-1"), None);
        assert_eq!(parse_provider_id("aws:///us-east-1a/"), None);
        assert_eq!(parse_provider_id("aws:///us-east-1a/vol-1"), None);
    }

    #[test]
    fn instance_profile_is_sent_as_arn_or_name() {
        let mut spec = LaunchSpec {
            instance_type: "m5.large".into(),
            ami: "ami-1".into(),
            subnet_ids: vec![],
            security_group_ids: vec![],
            iam_instance_profile: "arn:aws:iam::123456789012:instance-profile/node".into(),
            user_data: None,
            block_device_mappings: vec![],
            metadata_http_tokens: HttpTokens::Required,
            metadata_hop_limit: 2,
            metadata_http_endpoint: HttpEndpoint::Enabled,
        };
        assert!(matches!(
            spec.instance_profile(),
            InstanceProfileRef::Arn(_)
        ));
        spec.iam_instance_profile = "node".into();
        assert_eq!(spec.instance_profile(), InstanceProfileRef::Name("node"));
    }

    #[test]
    fn batches_respect_the_ec2_limit() {
        let ids: Vec<String> = (0..2500).map(|i| format!("i-{i}")).collect();
        let sizes: Vec<usize> = batches(&ids).map(<[String]>::len).collect();
        assert_eq!(sizes, vec![1000, 1000, 500]);
    }

    #[test]
    fn live_states_count_toward_pool_size() {
        use InstanceState::*;
        let live: Vec<_> = [
            Pending,
            Running,
            Stopping,
            Stopped,
            ShuttingDown,
            Terminated,
        ]
        .into_iter()
        .filter(|s| s.is_live())
        .collect();
        assert_eq!(live, vec![Pending, Running, Stopping, Stopped]);
        for s in [
            Pending,
            Running,
            Stopping,
            Stopped,
            ShuttingDown,
            Terminated,
        ] {
            assert_eq!(InstanceState::parse(s.as_str()), Some(s));
        }
    }
}
