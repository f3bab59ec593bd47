//! Draining a node: evict its workload pods through the Eviction API (PDBs respected), never
//! deleting a pod directly (SPEC §5.6, invariant 3).

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt, api::EvictParams};

use super::{Context, Error, retry};

/// Why the cluster refused to evict a pod (SPEC §8.2: DrainBlocked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 403: Stratos may not evict (RBAC without `pods/eviction` create, or an admission
    /// policy that answers Forbidden).
    Forbidden(String),
    /// 429: the pod's PodDisruptionBudget allows no disruption now.
    DisruptionBudget { pdb: Option<String> },
    /// Any other refusal (an admission webhook's 4xx, a pod with two budgets, …).
    Rejected(String),
}

impl Refusal {
    /// The reason of the event, condition and counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Forbidden(_) => "EvictionForbidden",
            Self::DisruptionBudget { .. } => "EvictionBlockedByPDB",
            Self::Rejected(_) => "EvictionRejected",
        }
    }

    /// Every reason, for counters that exist at zero.
    pub const REASONS: [&'static str; 3] = [
        "EvictionForbidden",
        "EvictionBlockedByPDB",
        "EvictionRejected",
    ];

    /// What a user reads: what is blocked and what to do.
    pub fn describe(&self, pod: &str, node: &str) -> String {
        match self {
            Self::Forbidden(m) => format!(
                "cannot evict pod {pod} from node {node}: forbidden ({m}); grant Stratos create on pods/eviction or lift the policy that denies it"
            ),
            Self::DisruptionBudget { pdb: Some(pdb) } => format!(
                "cannot evict pod {pod} from node {node}: PodDisruptionBudget {pdb} allows no disruption now"
            ),
            Self::DisruptionBudget { pdb: None } => format!(
                "cannot evict pod {pod} from node {node}: its PodDisruptionBudget allows no disruption now"
            ),
            Self::Rejected(m) => format!("cannot evict pod {pod} from node {node}: {m}"),
        }
    }
}

/// A pod whose eviction was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// `namespace/name`.
    pub pod: String,
    pub refusal: Refusal,
}

/// Where a drain stands after one pass.
#[derive(Debug, Default)]
pub struct Progress {
    /// Pods still on the node: being deleted, or refused.
    pub remaining: usize,
    pub blocked: Vec<Blocked>,
}

/// The PDB named in a 429's causes ("The disruption budget NAME needs …").
fn pdb_of(status: &kube::core::Status) -> Option<String> {
    status
        .details
        .as_ref()?
        .causes
        .iter()
        .filter(|c| c.reason == "DisruptionBudget")
        .find_map(|c| {
            c.message
                .strip_prefix("The disruption budget ")?
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
}

/// What an eviction's error says: `Ok(Some(refusal))` when the cluster refused it,
/// `Ok(None)` when the pod is already gone, `Err` when the API did not answer.
fn refusal_of(e: kube::Error) -> Result<Option<Refusal>, Error> {
    match e {
        kube::Error::Api(s) if s.code == 404 => Ok(None),
        kube::Error::Api(s) if s.code == 429 => {
            Ok(Some(Refusal::DisruptionBudget { pdb: pdb_of(&s) }))
        }
        kube::Error::Api(s) if s.code == 403 => Ok(Some(Refusal::Forbidden(s.message.clone()))),
        e if retry::classify_kube(&e) == retry::ErrorClass::Permanent => {
            Ok(Some(Refusal::Rejected(e.to_string())))
        }
        e => Err(e.into()),
    }
}

/// Asks for the eviction of every workload pod on `node`. Safe to repeat: an eviction of a
/// pod that is already going is a no-op.
pub async fn evict_workload(ctx: &Context, node: &str) -> Result<Progress, Error> {
    let mut progress = Progress::default();
    for pod in ctx.stores.pods.state() {
        if pod.node_name.as_deref() != Some(node) {
            continue;
        }
        if pod.metadata.deletion_timestamp.is_some() && !pod.is_workload() {
            // Evicted and terminating: wait for it to go.
            if !pod.finished() {
                progress.remaining += 1;
            }
            continue;
        }
        if !pod.is_workload() {
            continue;
        }
        let namespace = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(ctx.eviction_client.clone(), &namespace);
        match api.evict(&pod.name_any(), &EvictParams::default()).await {
            Ok(_) => {
                progress.remaining += 1;
                tracing::info!(node, pod = %pod.name_any(), "evicted");
            }
            Err(e) => {
                if let Some(refusal) = refusal_of(e)? {
                    progress.remaining += 1;
                    progress.blocked.push(Blocked {
                        pod: format!("{namespace}/{}", pod.name_any()),
                        refusal,
                    });
                }
            }
        }
    }
    Ok(progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, message: &str, cause: Option<&str>) -> kube::Error {
        let details = cause.map(|m| kube::core::response::StatusDetails {
            causes: vec![kube::core::response::StatusCause {
                reason: "DisruptionBudget".into(),
                message: m.into(),
                field: String::new(),
            }],
            name: String::new(),
            group: String::new(),
            kind: String::new(),
            uid: String::new(),
            retry_after_seconds: 0,
        });
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: message.into(),
            details,
            ..Default::default()
        }))
    }

    #[test]
    fn eviction_errors_say_what_blocks_the_drain() {
        let pdb = refusal_of(status(
            429,
            "Cannot evict pod as it would violate the pod's disruption budget.",
            Some("The disruption budget web-pdb needs 2 healthy pods and has 2 currently"),
        ))
        .unwrap();
        assert_eq!(
            pdb,
            Some(Refusal::DisruptionBudget {
                pdb: Some("web-pdb".into())
            })
        );
        assert_eq!(pdb.unwrap().reason(), "EvictionBlockedByPDB");
        assert_eq!(
            refusal_of(status(429, "too many", None)).unwrap(),
            Some(Refusal::DisruptionBudget { pdb: None })
        );
        let forbidden = refusal_of(status(403, "cannot create pods/eviction", None)).unwrap();
        assert_eq!(forbidden.as_ref().unwrap().reason(), "EvictionForbidden");
        assert!(
            forbidden
                .unwrap()
                .describe("ns/web-1", "ip-1")
                .contains("pods/eviction")
        );
        assert_eq!(refusal_of(status(404, "gone", None)).unwrap(), None);
        assert_eq!(
            refusal_of(status(422, "denied by webhook", None))
                .unwrap()
                .unwrap()
                .reason(),
            "EvictionRejected"
        );
        assert!(
            refusal_of(status(503, "unavailable", None)).is_err(),
            "the API did not answer"
        );
    }
}
