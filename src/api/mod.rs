//! The `stratos.sh/v1alpha1` API: CRD types, their schemas and validation rules (SPEC §3).
//!
//! Everything the API server enforces is declared here (schema bounds, patterns, enums and
//! CEL rules), so a bad object is rejected at `kubectl apply`, not discovered by a controller.

pub mod awsnodeclass;
pub mod duration;
pub mod nodepool;
pub mod reference;

pub use awsnodeclass::{AWSNodeClass, AWSNodeClassSpec, AWSNodeClassStatus};
pub use duration::Duration;
pub use nodepool::{NodePool, NodePoolSpec, NodePoolStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every Stratos kind.
pub const GROUP: &str = "stratos.sh";

/// Every CRD Stratos serves, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![AWSNodeClass::crd(), NodePool::crd()]
}

/// One CRD as the YAML committed under `crds/` (and the chart's `crds/`).
pub fn crd_yaml(crd: &CustomResourceDefinition) -> String {
    serde_yaml::to_string(crd).expect("a CRD always serialises to YAML")
}

/// The file name a CRD is committed under: `<plural>.<group>.yaml`.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or_default())
}

/// All CRDs as one multi-document YAML stream, as `stratos crds` prints it.
pub fn crds_yaml() -> String {
    crds()
        .iter()
        .map(crd_yaml)
        .collect::<Vec<_>>()
        .join("---\n")
}
