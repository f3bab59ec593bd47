//! `AWSNodeClass`: how to launch an instance (SPEC §3.1). Pure data and schema; no I/O.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// AWSNodeClass describes the EC2 launch specification of a pool's instances.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "stratos.sh",
    version = "v1alpha1",
    kind = "AWSNodeClass",
    plural = "awsnodeclasses",
    singular = "awsnodeclass",
    shortname = "awsnc",
    category = "stratos",
    status = "AWSNodeClassStatus",
    derive = "PartialEq",
    doc = "AWSNodeClass is the EC2 launch specification shared by the instances of one or more NodePools.",
    printcolumn = r#"{"name":"INSTANCETYPE","type":"string","jsonPath":".spec.instanceType"}"#,
    printcolumn = r#"{"name":"AMI","type":"string","jsonPath":".spec.ami"}"#,
    printcolumn = r#"{"name":"READY","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AWSNodeClassSpec {
    /// EC2 instance type, e.g. `m5.large`.
    #[schemars(regex(pattern = r"^[a-z0-9-]+\.[a-z0-9-]+$"), length(max = 64))]
    pub instance_type: String,

    /// AMI id, e.g. `ami-0123456789abcdef0`.
    #[schemars(regex(pattern = r"^ami-[0-9a-f]+$"))]
    pub ami: String,

    /// Subnets the pool's instances are spread across, balanced by zone.
    #[schemars(
        length(min = 1, max = 64),
        inner(regex(pattern = r"^subnet-[0-9a-f]+$"))
    )]
    pub subnet_ids: Vec<String>,

    /// Security groups attached to every instance.
    #[schemars(length(min = 1, max = 16), inner(regex(pattern = r"^sg-[0-9a-f]+$")))]
    pub security_group_ids: Vec<String>,

    /// Instance profile, as an ARN (`arn:aws:iam::<account>:instance-profile/<name>`) or a name.
    #[schemars(regex(
        pattern = r"^(arn:aws[a-z-]*:iam::[0-9]{12}:instance-profile/[A-Za-z0-9+=,.@/_-]+|[A-Za-z0-9+=,.@_-]{1,128})$"
    ))]
    pub iam_instance_profile: String,

    /// Bootstrap script, passed to EC2 unchanged (base64-encoded on the wire). At most 16 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub user_data: Option<String>,

    /// EBS volumes; every field is sent to EC2.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 24),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["deviceName"])
    )]
    pub block_device_mappings: Vec<BlockDeviceMapping>,

    /// Instance metadata service options; IMDSv2 is required unless set otherwise.
    #[serde(default)]
    pub metadata_options: MetadataOptions,

    /// Extra tags on instances and their volumes. Keys under `stratos.sh/` are reserved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(
        extend("maxProperties" = 40),
        extend("x-kubernetes-validations" = [
            {"rule": "self.all(k, !k.startsWith('stratos.sh/'))", "message": "tags may not use the reserved prefix stratos.sh/"},
            {"rule": "self.all(k, !k.startsWith('aws:'))", "message": "tags may not use the AWS-reserved prefix aws:"},
        ]),
    )]
    pub tags: BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.iops) || (has(self.volumeType) && self.volumeType in ['io1', 'io2', 'gp3'])",
     "message": "iops may only be set for volumeType io1, io2 or gp3", "fieldPath": ".iops"},
    {"rule": "!has(self.volumeType) || !(self.volumeType in ['io1', 'io2']) || has(self.iops)",
     "message": "iops is required for volumeType io1 and io2", "fieldPath": ".iops"},
    {"rule": "!has(self.throughput) || (has(self.volumeType) && self.volumeType == 'gp3')",
     "message": "throughput may only be set for volumeType gp3", "fieldPath": ".throughput"},
    {"rule": "!has(self.kmsKeyId) || (has(self.encrypted) && self.encrypted)",
     "message": "kmsKeyId requires encrypted: true", "fieldPath": ".kmsKeyId"},
]))]
pub struct BlockDeviceMapping {
    /// Device name, e.g. `/dev/xvda`.
    #[schemars(length(min = 1, max = 64))]
    pub device_name: String,

    /// Volume size in GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub volume_size: Option<i32>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_type: Option<VolumeType>,

    /// Provisioned IOPS (io1, io2, gp3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 256000))]
    pub iops: Option<i32>,

    /// Provisioned throughput in MiB/s (gp3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 125, max = 2000))]
    pub throughput: Option<i32>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub kms_key_id: Option<String>,

    #[serde(default = "default_true")]
    pub delete_on_termination: bool,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeType {
    Gp2,
    Gp3,
    Io1,
    Io2,
    St1,
    Sc1,
    Standard,
}

impl VolumeType {
    /// The value EC2 expects on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gp2 => "gp2",
            Self::Gp3 => "gp3",
            Self::Io1 => "io1",
            Self::Io2 => "io2",
            Self::St1 => "st1",
            Self::Sc1 => "sc1",
            Self::Standard => "standard",
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetadataOptions {
    #[serde(default)]
    pub http_tokens: HttpTokens,

    #[serde(default = "default_hop_limit")]
    #[schemars(range(min = 1, max = 64))]
    pub http_put_response_hop_limit: i32,

    #[serde(default)]
    pub http_endpoint: HttpEndpoint,
}

impl Default for MetadataOptions {
    fn default() -> Self {
        Self {
            http_tokens: HttpTokens::default(),
            http_put_response_hop_limit: default_hop_limit(),
            http_endpoint: HttpEndpoint::default(),
        }
    }
}

/// `required` enforces IMDSv2.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HttpTokens {
    #[default]
    Required,
    Optional,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HttpEndpoint {
    #[default]
    Enabled,
    Disabled,
}

/// Observed state of an AWSNodeClass.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AWSNodeClassStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: the AMI, subnets and security groups exist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The subnets as resolved in EC2, with their zones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnets: Vec<ResolvedSubnet>,

    /// NodePools that reference this class; it cannot be deleted while any remain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_pools: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedSubnet {
    pub id: String,
    pub zone: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_id: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_hop_limit() -> i32 {
    2
}
