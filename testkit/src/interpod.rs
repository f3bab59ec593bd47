//! kube-scheduler's filters that look at other pods: required inter-pod affinity and
//! anti-affinity (the incoming pod's and the existing pods'), topology spread constraints
//! with `whenUnsatisfiable: DoNotSchedule`, and host ports. Written from the scheduler's
//! documented semantics, independently of Stratos' planner.
//!
//! [`PodConstraints::for_pod`] counts the placed pods once per pending pod; each candidate
//! node is then checked against the counts.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::core::v1::{Node, Pod, PodAffinityTerm, TopologySpreadConstraint},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};

use crate::nodematch::{self, Misfit};

/// A pod bound (or assumed bound) to a node.
#[derive(Clone, Copy)]
pub struct Placed<'a> {
    pub pod: &'a Pod,
    pub node: &'a Node,
}

fn labels(node: &Node) -> BTreeMap<String, String> {
    node.metadata.labels.clone().unwrap_or_default()
}

fn namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

/// `matchLabels` and `matchExpressions`; a missing selector matches nothing.
pub fn selector_matches(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> bool {
    let Some(selector) = selector else {
        return false;
    };
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// Whether `term` (declared by a pod in namespace `owner_ns`) selects `pod`. An empty
/// `namespaceSelector` selects every namespace; a non-empty one is not modelled (it would
/// need Namespace labels) and selects none beyond the listed namespaces.
fn term_selects(term: &PodAffinityTerm, owner_ns: &str, pod: &Pod) -> bool {
    let ns = namespace(pod);
    let listed = term.namespaces.clone().unwrap_or_default();
    let all_namespaces = term
        .namespace_selector
        .as_ref()
        .is_some_and(|s| s.match_labels.is_none() && s.match_expressions.is_none());
    let in_namespace = if all_namespaces {
        true
    } else if listed.is_empty() && term.namespace_selector.is_none() {
        ns == owner_ns
    } else {
        listed.iter().any(|n| n == ns)
    };
    let pod_labels = pod.metadata.labels.clone().unwrap_or_default();
    in_namespace && selector_matches(term.label_selector.as_ref(), &pod_labels)
}

fn required_affinity(pod: &Pod) -> Vec<PodAffinityTerm> {
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.pod_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .clone()
        })
        .unwrap_or_default()
}

fn required_anti_affinity(pod: &Pod) -> Vec<PodAffinityTerm> {
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .clone()
        })
        .unwrap_or_default()
}

fn hard_spread(pod: &Pod) -> Vec<TopologySpreadConstraint> {
    pod.spec
        .as_ref()
        .and_then(|s| s.topology_spread_constraints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.when_unsatisfiable == "DoNotSchedule")
        .collect()
}

/// `(protocol, hostIP, hostPort)` of every container port with a host port.
fn host_ports(pod: &Pod) -> Vec<(String, String, i32)> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.unwrap_or(0) > 0)
        .map(|p| {
            (
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                p.host_ip.clone().unwrap_or_else(|| "0.0.0.0".into()),
                p.host_port.unwrap_or(0),
            )
        })
        .collect()
}

/// Whether the pod has inter-pod affinity, anti-affinity, hard spread constraints or host
/// ports of its own (and so must be checked against every placed pod).
pub fn has_own_constraints(pod: &Pod) -> bool {
    !required_affinity(pod).is_empty()
        || !required_anti_affinity(pod).is_empty()
        || !hard_spread(pod).is_empty()
        || !host_ports(pod).is_empty()
}

/// Whether a placed pod can keep others off its node or domain (its anti-affinity, its
/// host ports).
pub fn constrains_others(pod: &Pod) -> bool {
    !required_anti_affinity(pod).is_empty() || !host_ports(pod).is_empty()
}

type TopologyPair = (String, String);

/// One constraint's counts: pods matching its selector per domain of its key.
struct Spread {
    key: String,
    max_skew: i32,
    min_domains: Option<i32>,
    self_match: i32,
    counts: BTreeMap<String, i32>,
}

/// What the placed pods mean for one pending pod.
pub struct PodConstraints {
    affinity: Vec<PodAffinityTerm>,
    /// Pairs where pods matching all of the pod's affinity terms run.
    affinity_counts: BTreeMap<TopologyPair, usize>,
    /// Whether the pod matches its own affinity terms (the first of a group may go anywhere).
    self_affine: bool,
    anti_affinity: Vec<PodAffinityTerm>,
    /// Pairs where pods matching one of the pod's anti-affinity terms run.
    anti_counts: BTreeSet<TopologyPair>,
    /// Pairs where an existing pod's anti-affinity term selects this pod.
    existing_anti: BTreeSet<TopologyPair>,
    spread: Vec<Spread>,
    ports: Vec<(String, String, i32)>,
    /// Host ports in use per node.
    used_ports: BTreeMap<String, Vec<(String, String, i32)>>,
}

impl PodConstraints {
    /// Counts `placed` (non-terminal pods, bound or assumed) for `pod` against `nodes`.
    pub fn for_pod(pod: &Pod, placed: &[Placed<'_>], nodes: &[&Node]) -> PodConstraints {
        let ns = namespace(pod);
        let affinity = required_affinity(pod);
        let anti_affinity = required_anti_affinity(pod);
        let mut affinity_counts = BTreeMap::new();
        let mut anti_counts = BTreeSet::new();
        let mut existing_anti = BTreeSet::new();
        let mut used_ports: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for p in placed {
            let node_labels = labels(p.node);
            let pair = |key: &str| node_labels.get(key).map(|v| (key.to_owned(), v.to_owned()));
            if !affinity.is_empty() && affinity.iter().all(|t| term_selects(t, ns, p.pod)) {
                for t in &affinity {
                    if let Some(pair) = pair(&t.topology_key) {
                        *affinity_counts.entry(pair).or_default() += 1;
                    }
                }
            }
            for t in anti_affinity.iter().filter(|t| term_selects(t, ns, p.pod)) {
                anti_counts.extend(pair(&t.topology_key));
            }
            for t in required_anti_affinity(p.pod)
                .iter()
                .filter(|t| term_selects(t, namespace(p.pod), pod))
            {
                existing_anti.extend(pair(&t.topology_key));
            }
            let ports = host_ports(p.pod);
            if !ports.is_empty() {
                let name = p.node.metadata.name.clone().unwrap_or_default();
                used_ports.entry(name).or_default().extend(ports);
            }
        }
        let self_affine = affinity.iter().all(|t| term_selects(t, ns, pod));
        let pod_labels = pod.metadata.labels.clone().unwrap_or_default();
        let constraints = hard_spread(pod);
        let spread = constraints
            .iter()
            .map(|c| {
                let mut selector = c.label_selector.clone().unwrap_or_default();
                for key in c.match_label_keys.iter().flatten() {
                    if let Some(v) = pod_labels.get(key) {
                        selector
                            .match_labels
                            .get_or_insert_with(Default::default)
                            .insert(key.clone(), v.clone());
                    }
                }
                let honors_affinity = c.node_affinity_policy.as_deref() != Some("Ignore");
                let honors_taints = c.node_taints_policy.as_deref() == Some("Honor");
                // Eligible nodes: carrying every constraint's key, and (by policy) passing
                // the pod's node affinity and taints.
                let eligible: Vec<&Node> = nodes
                    .iter()
                    .copied()
                    .filter(|n| {
                        let l = labels(n);
                        constraints.iter().all(|c| l.contains_key(&c.topology_key))
                            && (!honors_affinity || nodematch::selects_node(pod, n))
                            && (!honors_taints || nodematch::untolerated_taint(pod, n).is_none())
                    })
                    .collect();
                let mut counts: BTreeMap<String, i32> = eligible
                    .iter()
                    .filter_map(|n| labels(n).get(&c.topology_key).cloned())
                    .map(|v| (v, 0))
                    .collect();
                let eligible_names: BTreeSet<String> = eligible
                    .iter()
                    .filter_map(|n| n.metadata.name.clone())
                    .collect();
                for p in placed {
                    let on_eligible = p
                        .node
                        .metadata
                        .name
                        .as_ref()
                        .is_some_and(|n| eligible_names.contains(n));
                    let matches = namespace(p.pod) == ns
                        && p.pod.metadata.deletion_timestamp.is_none()
                        && selector_matches(
                            Some(&selector),
                            &p.pod.metadata.labels.clone().unwrap_or_default(),
                        );
                    if on_eligible
                        && matches
                        && let Some(v) = labels(p.node).get(&c.topology_key)
                    {
                        *counts.entry(v.clone()).or_default() += 1;
                    }
                }
                Spread {
                    key: c.topology_key.clone(),
                    max_skew: c.max_skew,
                    min_domains: c.min_domains,
                    self_match: i32::from(selector_matches(Some(&selector), &pod_labels)),
                    counts,
                }
            })
            .collect();
        PodConstraints {
            affinity,
            affinity_counts,
            self_affine,
            anti_affinity,
            anti_counts,
            existing_anti,
            spread,
            ports: host_ports(pod),
            used_ports,
        }
    }

    /// Host ports: kube-scheduler's NodePorts filter.
    pub fn ports_fit(&self, node: &Node) -> Result<(), Misfit> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let used = self.used_ports.get(&name).map(Vec::as_slice).unwrap_or(&[]);
        let conflict = self.ports.iter().any(|(proto, ip, port)| {
            used.iter().any(|(p, i, n)| {
                p == proto && n == port && (ip == i || ip == "0.0.0.0" || i == "0.0.0.0")
            })
        });
        if conflict {
            Err(Misfit::HostPorts)
        } else {
            Ok(())
        }
    }

    /// PodTopologySpread, then InterPodAffinity, as kube-scheduler orders its filters.
    pub fn placement_fits(&self, node: &Node) -> Result<(), Misfit> {
        let node_labels = labels(node);
        for s in &self.spread {
            let Some(value) = node_labels.get(&s.key) else {
                return Err(Misfit::SpreadMissingLabel);
            };
            let mut min = s.counts.values().copied().min().unwrap_or(0);
            if s.min_domains.is_some_and(|m| (s.counts.len() as i32) < m) {
                min = 0;
            }
            let here = s.counts.get(value).copied().unwrap_or(0);
            if here + s.self_match - min > s.max_skew {
                return Err(Misfit::Spread);
            }
        }
        let has = |key: &str| node_labels.get(key).map(|v| (key.to_owned(), v.clone()));
        // InterPodAffinity: the pod's affinity, its anti-affinity, then existing pods'.
        if !self.affinity.is_empty() {
            let mut pods_exist = true;
            for t in &self.affinity {
                match has(&t.topology_key) {
                    None => return Err(Misfit::Affinity),
                    Some(pair) => {
                        if self.affinity_counts.get(&pair).copied().unwrap_or(0) == 0 {
                            pods_exist = false;
                        }
                    }
                }
            }
            // The first pod of a group with affinity to itself may go anywhere.
            let first_of_group = self.affinity_counts.is_empty() && self.self_affine;
            if !pods_exist && !first_of_group {
                return Err(Misfit::Affinity);
            }
        }
        for t in &self.anti_affinity {
            if has(&t.topology_key).is_some_and(|pair| self.anti_counts.contains(&pair)) {
                return Err(Misfit::AntiAffinity);
            }
        }
        if node_labels
            .iter()
            .any(|(k, v)| self.existing_anti.contains(&(k.clone(), v.clone())))
        {
            return Err(Misfit::ExistingAntiAffinity);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, zone: &str) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone}}}))
        .unwrap()
    }

    fn pod(labels: serde_json::Value, spec: serde_json::Value) -> Pod {
        let mut spec = spec;
        spec["containers"] = json!([{"name": "c", "image": "i"}]);
        serde_json::from_value(
            json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels}, "spec": spec}),
        )
        .unwrap()
    }

    fn anti(key: &str) -> serde_json::Value {
        json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": key}]}}})
    }

    #[test]
    fn anti_affinity_keeps_replicas_apart_by_hostname_and_zone() {
        let (a, b, c) = (node("a", "z1"), node("b", "z1"), node("c", "z2"));
        let nodes = [&a, &b, &c];
        let running = pod(json!({"app": "web"}), json!({}));
        let placed = [Placed {
            pod: &running,
            node: &a,
        }];
        let by_host = PodConstraints::for_pod(
            &pod(json!({"app": "web"}), anti("kubernetes.io/hostname")),
            &placed,
            &nodes,
        );
        assert_eq!(by_host.placement_fits(&a), Err(Misfit::AntiAffinity));
        assert_eq!(by_host.placement_fits(&b), Ok(()));
        let by_zone = PodConstraints::for_pod(
            &pod(json!({"app": "web"}), anti("topology.kubernetes.io/zone")),
            &placed,
            &nodes,
        );
        assert_eq!(by_zone.placement_fits(&b), Err(Misfit::AntiAffinity));
        assert_eq!(by_zone.placement_fits(&c), Ok(()));
        // A pod without anti-affinity of its own is kept off by a running pod's.
        let guarded = pod(json!({"app": "web"}), anti("kubernetes.io/hostname"));
        let placed_guarded = [Placed {
            pod: &guarded,
            node: &a,
        }];
        let plain = PodConstraints::for_pod(
            &pod(json!({"app": "web"}), json!({})),
            &placed_guarded,
            &nodes,
        );
        assert_eq!(plain.placement_fits(&a), Err(Misfit::ExistingAntiAffinity));
        assert_eq!(plain.placement_fits(&b), Ok(()));
        // Another namespace is not selected by default.
        let mut elsewhere = pod(json!({"app": "web"}), json!({}));
        elsewhere.metadata.namespace = Some("other".into());
        let other = PodConstraints::for_pod(&elsewhere, &placed, &nodes);
        assert_eq!(other.placement_fits(&a), Ok(()));
    }

    #[test]
    fn affinity_needs_a_matching_pod_in_the_domain_unless_it_is_the_first() {
        let (a, c) = (node("a", "z1"), node("c", "z2"));
        let nodes = [&a, &c];
        let spec = json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "topology.kubernetes.io/zone"}]}}});
        let first =
            PodConstraints::for_pod(&pod(json!({"app": "cache"}), spec.clone()), &[], &nodes);
        assert_eq!(first.placement_fits(&a), Ok(()), "first of its group");
        let stranger =
            PodConstraints::for_pod(&pod(json!({"app": "web"}), spec.clone()), &[], &nodes);
        assert_eq!(stranger.placement_fits(&a), Err(Misfit::Affinity));
        let cache = pod(json!({"app": "cache"}), json!({}));
        let placed = [Placed {
            pod: &cache,
            node: &c,
        }];
        let follower = PodConstraints::for_pod(&pod(json!({"app": "web"}), spec), &placed, &nodes);
        assert_eq!(follower.placement_fits(&a), Err(Misfit::Affinity));
        assert_eq!(follower.placement_fits(&c), Ok(()));
    }

    #[test]
    fn topology_spread_limits_skew_and_needs_the_key() {
        let (a, b) = (node("a", "z1"), node("b", "z2"));
        let mut bare = node("x", "z1");
        bare.metadata.labels = Some(Default::default());
        let nodes = [&a, &b, &bare];
        let spec = json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}]});
        let running = pod(json!({"app": "web"}), json!({}));
        let placed = [Placed {
            pod: &running,
            node: &a,
        }];
        let c = PodConstraints::for_pod(&pod(json!({"app": "web"}), spec.clone()), &placed, &nodes);
        assert_eq!(c.placement_fits(&a), Err(Misfit::Spread));
        assert_eq!(c.placement_fits(&b), Ok(()));
        assert_eq!(c.placement_fits(&bare), Err(Misfit::SpreadMissingLabel));
        // ScheduleAnyway is a preference, not a filter.
        let soft = json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"app": "web"}}}]});
        let c = PodConstraints::for_pod(&pod(json!({"app": "web"}), soft), &placed, &nodes);
        assert_eq!(c.placement_fits(&a), Ok(()));
    }

    #[test]
    fn host_ports_conflict_on_the_same_protocol_and_port() {
        let a = node("a", "z1");
        let with_port = |port: i32, proto: &str| {
            let mut p = pod(json!({}), json!({}));
            p.spec.as_mut().unwrap().containers[0].ports = Some(vec![
                serde_json::from_value(
                    json!({"containerPort": 80, "hostPort": port, "protocol": proto}),
                )
                .unwrap(),
            ]);
            p
        };
        let running = with_port(8080, "TCP");
        let placed = [Placed {
            pod: &running,
            node: &a,
        }];
        let nodes = [&a];
        let clash = PodConstraints::for_pod(&with_port(8080, "TCP"), &placed, &nodes);
        assert_eq!(clash.ports_fit(&a), Err(Misfit::HostPorts));
        let udp = PodConstraints::for_pod(&with_port(8080, "UDP"), &placed, &nodes);
        assert_eq!(udp.ports_fit(&a), Ok(()));
        let other = PodConstraints::for_pod(&with_port(9090, "TCP"), &placed, &nodes);
        assert_eq!(other.ports_fit(&a), Ok(()));
    }
}
