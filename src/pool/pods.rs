//! What scale-up reads of a pod: whether kube-scheduler refused it, and what it requests.

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};

use super::quantity::{self, InvalidQuantity, ONE, Resources};

/// Unschedulable (`PodScheduled=False, reason=Unschedulable`), unbound, Pending, not being
/// deleted: kube-scheduler refused it on every node it could use.
pub fn is_pending_unschedulable(pod: &Pod) -> bool {
    let unbound = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_none_or(str::is_empty);
    let pending = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
    let unschedulable = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter().any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
        });
    unbound && pending && unschedulable && pod.metadata.deletion_timestamp.is_none()
}

fn container_requests(c: &Container) -> Result<Resources, InvalidQuantity> {
    quantity::parse_all(
        c.resources
            .iter()
            .flat_map(|r| r.requests.iter().flatten())
            .map(|(k, v)| (k, v.0.as_str())),
    )
}

/// What kube-scheduler reserves for a pod (SPEC §6): the app containers plus the restartable
/// (sidecar) init containers, or the largest moment of the init sequence if larger (an
/// init container runs beside the sidecars started before it), plus overhead and one `pods`
/// slot.
pub fn pod_requests(spec: &PodSpec) -> Result<Resources, InvalidQuantity> {
    let mut total = Resources::new();
    for c in &spec.containers {
        quantity::add(&mut total, &container_requests(c)?);
    }
    let (mut sidecars, mut init_peak) = (Resources::new(), Resources::new());
    for c in spec.init_containers.iter().flatten() {
        let own = container_requests(c)?;
        let during = if c.restart_policy.as_deref() == Some("Always") {
            quantity::add(&mut total, &own);
            quantity::add(&mut sidecars, &own);
            sidecars.clone()
        } else {
            let mut during = own;
            quantity::add(&mut during, &sidecars);
            during
        };
        for (k, v) in during {
            let peak = init_peak.entry(k).or_default();
            *peak = (*peak).max(v);
        }
    }
    for (k, v) in init_peak {
        let e = total.entry(k).or_default();
        *e = (*e).max(v);
    }
    let overhead = quantity::parse_all(
        spec.overhead
            .iter()
            .flatten()
            .map(|(k, v)| (k, v.0.as_str())),
    )?;
    quantity::add(&mut total, &overhead);
    *total.entry("pods".into()).or_default() += ONE;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> PodSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn requests_follow_kube_scheduler() {
        let cases = [
            (
                "app containers add up",
                json!({"containers": [
                    {"name": "a", "image": "a", "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}},
                    {"name": "b", "image": "b", "resources": {"requests": {"cpu": "500m"}}}]}),
                1000,
            ),
            (
                "a larger init container wins, plus overhead",
                json!({"initContainers": [{"name": "i", "image": "i", "resources": {"requests": {"cpu": "2"}}}],
                    "containers": [{"name": "a", "image": "a", "resources": {"requests": {"cpu": "500m"}}}],
                    "overhead": {"cpu": "100m"}}),
                2100,
            ),
            (
                "a sidecar runs beside the app and the later init containers",
                json!({"initContainers": [
                        {"name": "proxy", "image": "p", "restartPolicy": "Always", "resources": {"requests": {"cpu": "300m"}}},
                        {"name": "migrate", "image": "m", "resources": {"requests": {"cpu": "1"}}}],
                    "containers": [{"name": "a", "image": "a", "resources": {"requests": {"cpu": "500m"}}}]}),
                1300,
            ),
            (
                "extended resources count",
                json!({"containers": [{"name": "a", "image": "a", "resources": {"requests": {"cpu": "1", "nvidia.com/gpu": "1"}}}]}),
                1000,
            ),
        ];
        for (what, s, cpu) in cases {
            let r = pod_requests(&spec(s)).unwrap();
            assert_eq!(r["cpu"], cpu, "{what}");
            assert_eq!(r["pods"], ONE, "{what}");
        }
        let gpu = pod_requests(&spec(json!({"containers": [{"name": "a", "image": "a",
            "resources": {"requests": {"nvidia.com/gpu": "1", "ephemeral-storage": "10Gi"}}}]})))
        .unwrap();
        assert_eq!(gpu["nvidia.com/gpu"], ONE);
        assert_eq!(gpu["ephemeral-storage"], 10 * 1024i128.pow(3) * ONE);
    }

    #[test]
    fn a_malformed_request_is_an_error() {
        let bad = spec(json!({"containers": [{"name": "a", "image": "a",
            "resources": {"requests": {"cpu": "lots"}}}]}));
        assert!(pod_requests(&bad).is_err());
    }
}
