//! Node matching rules the planner's inputs depend on: which DaemonSets run on a node, when
//! a node's network counts as ready, and when startup taints may come off (SPEC §5.1,
//! §5.4). Pure functions over Kubernetes objects.

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, PodSpec, Taint, Toleration};

use crate::api::nodepool::StartupTaintRemoval;

/// The tolerations the DaemonSet controller adds to every DaemonSet pod.
fn daemonset_tolerations() -> Vec<Toleration> {
    [
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ("node.kubernetes.io/memory-pressure", "NoSchedule"),
        ("node.kubernetes.io/pid-pressure", "NoSchedule"),
        ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ]
    .into_iter()
    .map(|(key, effect)| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    })
    .collect()
}

pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect = t.effect.as_deref().unwrap_or("");
        let effect_ok = effect.is_empty() || effect == taint.effect;
        let exists = t.operator.as_deref() == Some("Exists");
        let key_ok = match t.key.as_deref().unwrap_or("") {
            "" => exists,
            k => k == taint.key,
        };
        let value_ok =
            exists || t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("");
        effect_ok && key_ok && value_ok
    })
}

fn requirement_matches(req: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = req.values.as_deref().unwrap_or_default();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => match (
            value.and_then(|v| v.parse::<i64>().ok()),
            values.first().and_then(|b| b.parse::<i64>().ok()),
        ) {
            (Some(v), Some(bound)) => {
                if req.operator == "Gt" {
                    v > bound
                } else {
                    v < bound
                }
            }
            _ => false,
        },
        _ => false,
    }
}

/// nodeSelector and required node affinity of a pod spec against a node's labels and name.
pub fn selector_matches(
    spec: &PodSpec,
    labels: &std::collections::BTreeMap<String, String>,
    name: &str,
) -> bool {
    if let Some(selector) = &spec.node_selector
        && !selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    let Some(terms) = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| &r.node_selector_terms)
    else {
        return true;
    };
    terms.iter().any(|term| {
        let exprs = term.match_expressions.as_deref().unwrap_or_default();
        let fields = term.match_fields.as_deref().unwrap_or_default();
        (!exprs.is_empty() || !fields.is_empty())
            && exprs
                .iter()
                .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
            && fields
                .iter()
                .all(|r| requirement_matches(r, (r.key == "metadata.name").then_some(name)))
    })
}

/// Whether a DaemonSet with this pod template runs a pod on the node, as the DaemonSet
/// controller decides it (selectors, and NoSchedule/NoExecute taints tolerated with the
/// default DaemonSet tolerations). Readiness and cordons do not matter.
pub fn daemonset_runs_on(template: &PodSpec, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let name = node.metadata.name.as_deref().unwrap_or_default();
    if !selector_matches(template, &labels, name) {
        return false;
    }
    let mut tolerations = template.tolerations.clone().unwrap_or_default();
    tolerations.extend(daemonset_tolerations());
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| tolerates(&tolerations, t))
}

fn condition<'a>(node: &'a Node, type_: &str) -> Option<&'a str> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

pub fn node_ready(node: &Node) -> bool {
    condition(node, "Ready") == Some("True")
}

/// SPEC §5.4: the CNI reports the network ready through `NetworkUnavailable=False`
/// (Calico, Cilium, …), `NetworkingReady=True` (EKS), or a Ready `aws-node` pod (VPC CNI).
/// A node with none of these signals has no CNI that reports one; it counts as network-ready
/// once Ready, or warmup could never complete there.
pub fn network_ready(node: &Node, aws_node_pod_ready: Option<bool>) -> bool {
    if condition(node, "NetworkUnavailable") == Some("False")
        || condition(node, "NetworkingReady") == Some("True")
    {
        return true;
    }
    if aws_node_pod_ready == Some(true) {
        return true;
    }
    let has_signal = condition(node, "NetworkUnavailable").is_some()
        || condition(node, "NetworkingReady").is_some()
        || aws_node_pod_ready.is_some();
    !has_signal && node_ready(node)
}

/// Whether the startup taints may be removed now.
pub fn startup_taints_removable(
    policy: StartupTaintRemoval,
    ready: bool,
    network_ready: bool,
) -> bool {
    match policy {
        StartupTaintRemoval::WhenNetworkReady => ready && network_ready,
        StartupTaintRemoval::WhenNodeReady => ready,
        StartupTaintRemoval::Never => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(
        labels: serde_json::Value,
        taints: serde_json::Value,
        conditions: serde_json::Value,
    ) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "n", "labels": labels}, "spec": {"taints": taints}, "status": {"conditions": conditions}}))
            .unwrap()
    }

    fn spec(v: serde_json::Value) -> PodSpec {
        let mut v = v;
        v["containers"] = json!([{"name": "c", "image": "i"}]);
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn daemonset_eligibility() {
        let startup = json!([{"key": "node.eks.amazonaws.com/not-ready", "value": "true", "effect": "NoSchedule"}]);
        let standby = json!([{"key": "stratos.sh/standby", "value": "true", "effect": "NoSchedule"}, {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]);
        let cases = [
            ("plain", json!({}), json!({}), json!([]), true),
            (
                "startup taint not tolerated",
                json!({}),
                json!({}),
                startup.clone(),
                false,
            ),
            (
                "tolerates everything",
                json!({"tolerations": [{"operator": "Exists"}]}),
                json!({}),
                startup,
                true,
            ),
            (
                "selector mismatch",
                json!({"nodeSelector": {"gpu": "true"}}),
                json!({"gpu": "false"}),
                json!([]),
                false,
            ),
            (
                "selector match",
                json!({"nodeSelector": {"gpu": "true"}}),
                json!({"gpu": "true"}),
                json!([]),
                true,
            ),
            (
                "cordon is tolerated, the standby taint is not",
                json!({}),
                json!({}),
                standby,
                false,
            ),
            (
                "affinity NotIn",
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "os", "operator": "NotIn", "values": ["windows"]}]}]}}}}),
                json!({"os": "linux"}),
                json!([]),
                true,
            ),
        ];
        for (what, template, labels, taints, expected) in cases {
            assert_eq!(
                daemonset_runs_on(&spec(template), &node(labels, taints, json!([]))),
                expected,
                "{what}"
            );
        }
    }

    #[test]
    fn network_readiness_signals() {
        let ready = json!({"type": "Ready", "status": "True"});
        let cases = [
            (
                "NetworkUnavailable=False",
                json!([ready, {"type": "NetworkUnavailable", "status": "False"}]),
                None,
                true,
            ),
            (
                "NetworkUnavailable=True",
                json!([ready, {"type": "NetworkUnavailable", "status": "True"}]),
                None,
                false,
            ),
            (
                "NetworkingReady=True",
                json!([ready, {"type": "NetworkingReady", "status": "True"}]),
                None,
                true,
            ),
            ("aws-node pod Ready", json!([ready]), Some(true), true),
            ("aws-node pod not Ready", json!([ready]), Some(false), false),
            (
                "no signal at all: Ready decides",
                json!([ready]),
                None,
                true,
            ),
            (
                "no signal, not Ready",
                json!([{"type": "Ready", "status": "False"}]),
                None,
                false,
            ),
        ];
        for (what, conditions, aws_node, expected) in cases {
            assert_eq!(
                network_ready(&node(json!({}), json!([]), conditions), aws_node),
                expected,
                "{what}"
            );
        }
        assert!(startup_taints_removable(
            StartupTaintRemoval::WhenNetworkReady,
            true,
            true
        ));
        assert!(!startup_taints_removable(
            StartupTaintRemoval::WhenNetworkReady,
            true,
            false
        ));
        assert!(startup_taints_removable(
            StartupTaintRemoval::WhenNodeReady,
            true,
            false
        ));
        assert!(!startup_taints_removable(
            StartupTaintRemoval::Never,
            true,
            true
        ));
    }
}
