//! Node-matching rules as kube-scheduler applies them, for the test scheduler and the
//! DaemonSet controller: resource quantities and requests, taints and tolerations,
//! nodeSelector and required node affinity. Written independently of Stratos' own
//! scheduling simulation so the two can catch each other's mistakes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod, Taint, Toleration};

/// Parses a Kubernetes quantity into a float (cores for CPU, bytes for memory).
pub fn quantity(q: &str) -> f64 {
    let q = q.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    for (suffix, factor) in suffixes {
        if let Some(num) = q.strip_suffix(suffix) {
            return num.parse::<f64>().unwrap_or(0.0) * factor;
        }
    }
    q.parse().unwrap_or(0.0)
}

/// Resource amounts by name.
pub type Resources = BTreeMap<String, f64>;

fn add(into: &mut Resources, from: &Resources) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// The scheduler's view of a pod's requests: the larger of the largest init container and
/// the sum of the app containers, per resource, plus overhead; one `pods` slot.
pub fn pod_requests(pod: &Pod) -> Resources {
    let Some(spec) = &pod.spec else {
        return Resources::new();
    };
    let requests = |c: &k8s_openapi::api::core::v1::Container| -> Resources {
        c.resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .map(|r| r.iter().map(|(k, v)| (k.clone(), quantity(&v.0))).collect())
            .unwrap_or_default()
    };
    let mut sum = Resources::new();
    for c in &spec.containers {
        add(&mut sum, &requests(c));
    }
    // Restartable (sidecar) init containers run alongside everything started after them.
    let (mut sidecars, mut init_peak) = (Resources::new(), Resources::new());
    for c in spec.init_containers.iter().flatten() {
        let mut during = requests(c);
        if c.restart_policy.as_deref() == Some("Always") {
            add(&mut sum, &during);
            add(&mut sidecars, &during);
            during = sidecars.clone();
        } else {
            add(&mut during, &sidecars);
        }
        for (k, v) in during {
            let e = init_peak.entry(k).or_default();
            *e = e.max(v);
        }
    }
    for (k, v) in init_peak {
        let e = sum.entry(k).or_default();
        *e = e.max(v);
    }
    if let Some(overhead) = &spec.overhead {
        add(
            &mut sum,
            &overhead
                .iter()
                .map(|(k, v)| (k.clone(), quantity(&v.0)))
                .collect(),
        );
    }
    *sum.entry("pods".into()).or_default() += 1.0;
    sum
}

pub fn allocatable(node: &Node) -> Resources {
    node.status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .map(|a| a.iter().map(|(k, v)| (k.clone(), quantity(&v.0))).collect())
        .unwrap_or_default()
}

pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let key_ok = match t.key.as_deref() {
            None | Some("") => t.operator.as_deref() == Some("Exists"),
            Some(k) => k == taint.key,
        };
        let value_ok = match t.operator.as_deref() {
            Some("Exists") => true,
            _ => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        };
        effect_ok && key_ok && value_ok
    })
}

fn requirement_matches(req: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = req.values.clone().unwrap_or_default();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if req.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

/// nodeSelector and required node affinity.
pub fn selects_node(pod: &Pod, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let Some(spec) = &pod.spec else { return true };
    if let Some(selector) = &spec.node_selector
        && !selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    let Some(required) = required else {
        return true;
    };
    let name = node.metadata.name.clone().unwrap_or_default();
    required.node_selector_terms.iter().any(|term| {
        let exprs_ok = term
            .match_expressions
            .iter()
            .flatten()
            .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)));
        let fields_ok = term.match_fields.iter().flatten().all(|r| {
            let value = (r.key == "metadata.name").then_some(name.as_str());
            requirement_matches(r, value)
        });
        let empty = term.match_expressions.as_ref().is_none_or(Vec::is_empty)
            && term.match_fields.as_ref().is_none_or(Vec::is_empty);
        !empty && exprs_ok && fields_ok
    })
}

pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The first NoSchedule/NoExecute taint the pod does not tolerate. The node lifecycle
/// taints (`not-ready`, `unreachable`) are on the Node itself (admission and the node
/// lifecycle controller put them there); a cordon counts as the `unschedulable` taint, as
/// kube-scheduler's NodeUnschedulable filter reads `spec.unschedulable` directly.
pub fn untolerated_taint(pod: &Pod, node: &Node) -> Option<Taint> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let mut taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    if node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
    {
        taints.insert(
            0,
            Taint {
                key: "node.kubernetes.io/unschedulable".into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            },
        );
    }
    taints
        .into_iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !tolerates(&tolerations, t))
}

/// Why a pod does not fit a node, in kube-scheduler's words.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Misfit {
    Selector,
    Taint(String),
    Unschedulable,
    Insufficient(String),
    HostPorts,
    Spread,
    SpreadMissingLabel,
    Affinity,
    AntiAffinity,
    ExistingAntiAffinity,
}

impl Misfit {
    pub fn message(&self) -> String {
        match self {
            Self::Selector => "node(s) didn't match Pod's node affinity/selector".into(),
            Self::Taint(t) => format!("node(s) had untolerated taint {{{t}}}"),
            Self::Unschedulable => "node(s) were unschedulable".into(),
            Self::Insufficient(r) => format!("Insufficient {r}"),
            Self::HostPorts => "node(s) didn't have free ports for the requested pod ports".into(),
            Self::Spread => "node(s) didn't match pod topology spread constraints".into(),
            Self::SpreadMissingLabel => {
                "node(s) didn't match pod topology spread constraints (missing required label)"
                    .into()
            }
            Self::Affinity => "node(s) didn't match pod affinity rules".into(),
            Self::AntiAffinity => "node(s) didn't match pod anti-affinity rules".into(),
            Self::ExistingAntiAffinity => {
                "node(s) didn't satisfy existing pods anti-affinity rules".into()
            }
        }
    }
}

/// Whether `pod` fits `node` given what is already requested there, by the filters that
/// look at the node alone, in kube-scheduler's order (NodeUnschedulable, TaintToleration,
/// NodeAffinity, NodeResourcesFit): the first that fails names the reason.
pub fn fits(pod: &Pod, node: &Node, used: &Resources) -> Result<(), Misfit> {
    admits(pod, node)?;
    resources_fit(pod, node, used)
}

/// NodeUnschedulable, TaintToleration and NodeAffinity.
pub fn admits(pod: &Pod, node: &Node) -> Result<(), Misfit> {
    if let Some(t) = untolerated_taint(pod, node) {
        if t.key == "node.kubernetes.io/unschedulable" {
            return Err(Misfit::Unschedulable);
        }
        return Err(Misfit::Taint(format!(
            "{}: {}",
            t.key,
            t.value.unwrap_or_default()
        )));
    }
    if !selects_node(pod, node) {
        return Err(Misfit::Selector);
    }
    Ok(())
}

/// NodeResourcesFit: every requested resource (extended ones included) within what is
/// allocatable after `used`.
pub fn resources_fit(pod: &Pod, node: &Node, used: &Resources) -> Result<(), Misfit> {
    let capacity = allocatable(node);
    for (resource, amount) in pod_requests(pod) {
        if amount <= 0.0 {
            continue;
        }
        let have = capacity.get(&resource).copied().unwrap_or(0.0);
        let taken = used.get(&resource).copied().unwrap_or(0.0);
        if taken + amount > have + 1e-9 {
            return Err(Misfit::Insufficient(resource));
        }
    }
    Ok(())
}

/// kube-scheduler's summary: `0/3 nodes are available: 1 Insufficient cpu, 2 node(s)...`.
pub fn unschedulable_message(total: usize, misfits: &[Misfit]) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in misfits {
        *counts.entry(m.message()).or_default() += 1;
    }
    let parts: Vec<String> = counts
        .into_iter()
        .map(|(m, n)| format!("{n} {m}"))
        .collect();
    if parts.is_empty() {
        format!("0/{total} nodes are available.")
    } else {
        format!("0/{total} nodes are available: {}.", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(labels: serde_json::Value, taints: serde_json::Value, ready: bool, cpu: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n1", "labels": labels},
            "spec": {"taints": taints},
            "status": {
                "allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "10"},
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
            }
        }))
        .unwrap()
    }

    fn pod(spec: serde_json::Value) -> Pod {
        let mut spec = spec;
        if spec.get("containers").is_none() {
            spec["containers"] =
                json!([{"name": "c", "image": "i", "resources": {"requests": {"cpu": "500m"}}}]);
        }
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    #[test]
    fn quantities_parse() {
        assert_eq!(quantity("500m"), 0.5);
        assert_eq!(quantity("2"), 2.0);
        assert_eq!(quantity("1Gi"), 1024f64.powi(3));
        assert_eq!(quantity("1G"), 1e9);
        assert_eq!(quantity("128974848"), 128974848.0);
    }

    #[test]
    fn requests_take_the_larger_of_init_and_app_containers_plus_overhead() {
        let p = pod(json!({
            "initContainers": [{"name": "i", "image": "i", "resources": {"requests": {"cpu": "2"}}}],
            "containers": [
                {"name": "a", "image": "a", "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}},
                {"name": "b", "image": "b", "resources": {"requests": {"cpu": "500m"}}}
            ],
            "overhead": {"cpu": "100m"}
        }));
        let r = pod_requests(&p);
        assert!((r["cpu"] - 2.1).abs() < 1e-9);
        // A sidecar adds to the app containers and runs during later init containers.
        let with_sidecar = pod(json!({
            "initContainers": [
                {"name": "proxy", "image": "p", "restartPolicy": "Always", "resources": {"requests": {"cpu": "300m"}}},
                {"name": "migrate", "image": "m", "resources": {"requests": {"cpu": "1"}}}
            ],
            "containers": [{"name": "a", "image": "a", "resources": {"requests": {"cpu": "500m"}}}]
        }));
        assert!((pod_requests(&with_sidecar)["cpu"] - 1.3).abs() < 1e-9);
        assert_eq!(r["memory"], 1024f64.powi(3));
        assert_eq!(r["pods"], 1.0);
    }

    #[test]
    fn fit_checks_selectors_affinity_taints_and_resources() {
        let n = node(
            json!({"pool": "ci", "gen": "5"}),
            json!([{"key": "stratos.sh/standby", "value": "true", "effect": "NoSchedule"}]),
            true,
            "2",
        );
        let none = Resources::new();
        let cases = [
            (
                json!({}),
                Err(Misfit::Taint("stratos.sh/standby: true".into())),
            ),
            (
                json!({"tolerations": [{"key": "stratos.sh/standby", "operator": "Exists"}]}),
                Ok(()),
            ),
            (
                json!({"tolerations": [{"operator": "Exists"}], "nodeSelector": {"pool": "gpu"}}),
                Err(Misfit::Selector),
            ),
            (
                json!({"tolerations": [{"operator": "Exists"}], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "gen", "operator": "Gt", "values": ["4"]}]}]}}}}),
                Ok(()),
            ),
            (
                json!({"tolerations": [{"operator": "Exists"}], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "gen", "operator": "Lt", "values": ["4"]}]}]}}}}),
                Err(Misfit::Selector),
            ),
            (
                json!({"tolerations": [{"operator": "Exists"}], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "NotIn", "values": ["ci"]}]}, {"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}]}}}}),
                Ok(()),
            ),
            (
                json!({"tolerations": [{"operator": "Exists"}], "containers": [{"name": "c", "image": "i", "resources": {"requests": {"cpu": "3"}}}]}),
                Err(Misfit::Insufficient("cpu".into())),
            ),
        ];
        for (spec, expected) in cases {
            assert_eq!(fits(&pod(spec.clone()), &n, &none), expected, "{spec}");
        }
        let used = Resources::from([("cpu".to_owned(), 1.8)]);
        let tolerant = pod(json!({"tolerations": [{"operator": "Exists"}]}));
        assert_eq!(
            fits(&tolerant, &n, &used),
            Err(Misfit::Insufficient("cpu".into()))
        );
        let not_ready = node(
            json!({}),
            json!([{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]),
            false,
            "2",
        );
        assert!(
            matches!(fits(&pod(json!({})), &not_ready, &none), Err(Misfit::Taint(t)) if t.starts_with("node.kubernetes.io/not-ready"))
        );
        assert_eq!(
            unschedulable_message(
                3,
                &[
                    Misfit::Selector,
                    Misfit::Insufficient("cpu".into()),
                    Misfit::Selector
                ]
            ),
            "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) didn't match Pod's node affinity/selector."
        );
    }
}
