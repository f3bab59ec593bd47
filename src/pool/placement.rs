//! Inter-pod constraints for the scale-up simulation (SPEC §6): required pod affinity and
//! anti-affinity, topology spread with `whenUnsatisfiable: DoNotSchedule`, and host ports,
//! over the topology keys Stratos can place by: the node (`kubernetes.io/hostname`) and
//! the zone (`topology.kubernetes.io/zone`). Terms over other keys are not simulated (such a
//! pod is placed by its other constraints); docs/src/architecture.md lists this.
//!
//! Pure: the controller hands in the pods already bound (with their node and zone), the
//! simulation adds the ones it places, and [`PodPlacement::admits`] answers per candidate.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::core::v1::{PodAffinityTerm, PodSpec, TopologySpreadConstraint},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};

pub const HOSTNAME: &str = "kubernetes.io/hostname";
pub const ZONE: &str = "topology.kubernetes.io/zone";
const LEGACY_ZONE: &str = "failure-domain.beta.kubernetes.io/zone";

/// Where a pod is or would be: the node and its zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spot {
    pub node: String,
    pub zone: Option<String>,
}

impl Spot {
    /// The spot's value for a topology key, or `None` for a key not simulated.
    fn value(&self, key: &str) -> Option<Option<&str>> {
        match key {
            HOSTNAME => Some(Some(self.node.as_str())),
            ZONE | LEGACY_ZONE => Some(self.zone.as_deref()),
            _ => None,
        }
    }
}

/// A pod on a node, as far as other pods' constraints care.
#[derive(Debug, Clone, Default)]
pub struct PlacedPod {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    pub zone: Option<String>,
    /// Its required anti-affinity terms: they keep other pods away.
    pub anti_affinity: Vec<PodAffinityTerm>,
    /// `(protocol, port)` of its host ports.
    pub host_ports: Vec<(String, i32)>,
}

impl PlacedPod {
    fn spot(&self) -> Spot {
        Spot {
            node: self.node.clone(),
            zone: self.zone.clone(),
        }
    }
}

/// Which inter-pod constraint keeps a pod off every node Stratos could bring up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Constraint {
    HostPorts,
    TopologySpread,
    PodAffinity,
    PodAntiAffinity,
}

impl Constraint {
    pub fn describe(self) -> &'static str {
        match self {
            Self::HostPorts => "host ports",
            Self::TopologySpread => "topology spread constraints",
            Self::PodAffinity => "required pod affinity",
            Self::PodAntiAffinity => "required pod anti-affinity",
        }
    }
}

/// `matchLabels` and `matchExpressions`; a missing selector selects nothing.
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return false;
    };
    selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && selector.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// Whether a term declared by a pod in `owner_ns` covers a pod in `ns` with `labels`.
fn term_covers(
    term: &PodAffinityTerm,
    owner_ns: &str,
    ns: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let every_namespace = term
        .namespace_selector
        .as_ref()
        .is_some_and(|s| s.match_labels.is_none() && s.match_expressions.is_none());
    let listed = term.namespaces.as_deref().unwrap_or_default();
    let in_scope = every_namespace
        || if listed.is_empty() {
            ns == owner_ns
        } else {
            listed.iter().any(|n| n == ns)
        };
    in_scope && selects(term.label_selector.as_ref(), labels)
}

/// The zone a PersistentVolume's required node affinity pins it to, if one.
pub fn volume_zone(pv: &k8s_openapi::api::core::v1::PersistentVolume) -> Option<String> {
    const ZONE_KEYS: [&str; 3] = [ZONE, LEGACY_ZONE, "topology.ebs.csi.aws.com/zone"];
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    let zones: BTreeSet<&String> = terms
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .filter(|e| e.operator == "In" && ZONE_KEYS.contains(&e.key.as_str()))
        .flat_map(|e| e.values.iter().flatten())
        .collect();
    // One zone pins; a volume reachable from several zones pins to none of them.
    (zones.len() == 1)
        .then(|| zones.into_iter().next().cloned())
        .flatten()
}

/// Required anti-affinity terms of a pod spec.
pub fn anti_affinity_terms(spec: &PodSpec) -> Vec<PodAffinityTerm> {
    spec.affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .clone()
        })
        .unwrap_or_default()
}

fn affinity_terms(spec: &PodSpec) -> Vec<PodAffinityTerm> {
    spec.affinity
        .as_ref()
        .and_then(|a| a.pod_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .clone()
        })
        .unwrap_or_default()
}

/// `(protocol, port)` of a pod spec's host ports.
pub fn host_ports(spec: &PodSpec) -> Vec<(String, i32)> {
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let port = p.host_port.filter(|p| *p > 0)?;
            Some((p.protocol.clone().unwrap_or_else(|| "TCP".into()), port))
        })
        .collect()
}

/// One pending pod's inter-pod constraints.
#[derive(Debug, Clone, Default)]
pub struct PodPlacement {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    affinity: Vec<PodAffinityTerm>,
    anti_affinity: Vec<PodAffinityTerm>,
    spread: Vec<TopologySpreadConstraint>,
    host_ports: Vec<(String, i32)>,
}

impl PodPlacement {
    pub fn new(namespace: &str, labels: BTreeMap<String, String>, spec: &PodSpec) -> Self {
        let spread = spec
            .topology_spread_constraints
            .iter()
            .flatten()
            .filter(|c| c.when_unsatisfiable == "DoNotSchedule")
            .map(|c| {
                // matchLabelKeys narrows the selector to pods with the pod's own values.
                let mut c = c.clone();
                for key in c.match_label_keys.clone().into_iter().flatten() {
                    if let Some(v) = labels.get(&key) {
                        c.label_selector
                            .get_or_insert_with(Default::default)
                            .match_labels
                            .get_or_insert_with(Default::default)
                            .insert(key, v.clone());
                    }
                }
                c
            })
            .collect();
        PodPlacement {
            namespace: namespace.to_owned(),
            affinity: affinity_terms(spec),
            anti_affinity: anti_affinity_terms(spec),
            host_ports: host_ports(spec),
            labels,
            spread,
        }
    }

    /// Whether the pod has constraints of its own that look at other pods.
    pub fn has_own_constraints(&self) -> bool {
        !(self.affinity.is_empty()
            && self.anti_affinity.is_empty()
            && self.spread.is_empty()
            && self.host_ports.is_empty())
    }

    /// The pod as placed on `spot` (for the pods placed after it in the simulation).
    pub fn placed_at(&self, spot: &Spot) -> PlacedPod {
        PlacedPod {
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            node: spot.node.clone(),
            zone: spot.zone.clone(),
            anti_affinity: self.anti_affinity.clone(),
            host_ports: self.host_ports.clone(),
        }
    }

    /// Whether the pod may go to `spot` given `placed` (bound and simulated pods);
    /// `zones` are the zones where nodes the pod could use exist (spread domains).
    pub fn admits(
        &self,
        spot: &Spot,
        placed: &[PlacedPod],
        zones: &BTreeSet<String>,
    ) -> Result<(), Constraint> {
        // Host ports on the same node.
        let clash = placed
            .iter()
            .filter(|p| p.node == spot.node)
            .any(|p| p.host_ports.iter().any(|hp| self.host_ports.contains(hp)));
        if clash {
            return Err(Constraint::HostPorts);
        }
        for c in &self.spread {
            let Some(value) = spot.value(&c.topology_key) else {
                continue;
            };
            let Some(value) = value else {
                // A node without the key is never a spread domain.
                return Err(Constraint::TopologySpread);
            };
            let matching = |p: &&PlacedPod| {
                p.namespace == self.namespace && selects(c.label_selector.as_ref(), &p.labels)
            };
            let mut counts: BTreeMap<String, i32> = BTreeMap::new();
            if c.topology_key == HOSTNAME {
                // Nodes in standby count as empty domains, so the global minimum is 0
                // whenever one exists; the candidate itself is one.
                counts.insert(spot.node.clone(), 0);
            } else {
                counts.extend(zones.iter().map(|z| (z.clone(), 0)));
            }
            for p in placed.iter().filter(matching) {
                if let Some(Some(v)) = p.spot().value(&c.topology_key) {
                    *counts.entry(v.to_owned()).or_default() += 1;
                }
            }
            let mut min = if c.topology_key == HOSTNAME {
                0
            } else {
                counts.values().copied().min().unwrap_or(0)
            };
            if c.min_domains.is_some_and(|m| (counts.len() as i32) < m) {
                min = 0;
            }
            let here = counts.get(value).copied().unwrap_or(0);
            let own = i32::from(selects(c.label_selector.as_ref(), &self.labels));
            if here + own - min > c.max_skew {
                return Err(Constraint::TopologySpread);
            }
        }
        // Affinity: a matching pod in the same domain, unless this is the first of its
        // group (no matching pod anywhere, and the pod matches its own terms).
        if !self.affinity.is_empty() {
            let covered = |t: &PodAffinityTerm, p: &PlacedPod| {
                term_covers(t, &self.namespace, &p.namespace, &p.labels)
            };
            let anywhere = placed
                .iter()
                .any(|p| self.affinity.iter().all(|t| covered(t, p)));
            let self_match = self
                .affinity
                .iter()
                .all(|t| term_covers(t, &self.namespace, &self.namespace, &self.labels));
            for t in &self.affinity {
                let Some(value) = spot.value(&t.topology_key) else {
                    continue;
                };
                let near = placed.iter().any(|p| {
                    covered(t, p)
                        && value.is_some()
                        && p.spot().value(&t.topology_key) == Some(value)
                });
                let first_of_group = !anywhere && self_match && value.is_some();
                if !near && !first_of_group {
                    return Err(Constraint::PodAffinity);
                }
            }
        }
        // Anti-affinity: the pod's own terms, then those of pods already there.
        for t in &self.anti_affinity {
            let Some(Some(value)) = spot.value(&t.topology_key) else {
                continue;
            };
            let near = placed.iter().any(|p| {
                term_covers(t, &self.namespace, &p.namespace, &p.labels)
                    && p.spot().value(&t.topology_key) == Some(Some(value))
            });
            if near {
                return Err(Constraint::PodAntiAffinity);
            }
        }
        for p in placed {
            for t in &p.anti_affinity {
                let Some(Some(value)) = spot.value(&t.topology_key) else {
                    continue;
                };
                if term_covers(t, &p.namespace, &self.namespace, &self.labels)
                    && p.spot().value(&t.topology_key) == Some(Some(value))
                {
                    return Err(Constraint::PodAntiAffinity);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> PodSpec {
        let mut v = v;
        if v.get("containers").is_none() {
            v["containers"] = json!([{"name": "c", "image": "i"}]);
        }
        serde_json::from_value(v).unwrap()
    }

    fn web() -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_owned(), "web".to_owned())])
    }

    fn spot(node: &str, zone: &str) -> Spot {
        Spot {
            node: node.into(),
            zone: Some(zone.into()),
        }
    }

    fn running(node: &str, zone: &str) -> PlacedPod {
        PlacedPod {
            namespace: "ns".into(),
            labels: web(),
            node: node.into(),
            zone: Some(zone.into()),
            ..Default::default()
        }
    }

    fn anti(key: &str) -> serde_json::Value {
        json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": key}]}}})
    }

    #[test]
    fn each_constraint_alone() {
        let zones: BTreeSet<String> = ["a", "b"].map(String::from).into();
        let placed = [running("n1", "a")];
        let cases: Vec<(&str, serde_json::Value, Spot, Result<(), Constraint>)> = vec![
            (
                "anti hostname, other node",
                anti(HOSTNAME),
                spot("n2", "a"),
                Ok(()),
            ),
            (
                "anti hostname, same node",
                anti(HOSTNAME),
                spot("n1", "a"),
                Err(Constraint::PodAntiAffinity),
            ),
            (
                "anti zone, same zone",
                anti(ZONE),
                spot("n2", "a"),
                Err(Constraint::PodAntiAffinity),
            ),
            ("anti zone, other zone", anti(ZONE), spot("n3", "b"), Ok(())),
            (
                "anti on a key not simulated",
                anti("rack"),
                spot("n1", "a"),
                Ok(()),
            ),
            (
                "affinity zone, matching zone",
                json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": ZONE}]}}}),
                spot("n2", "a"),
                Ok(()),
            ),
            (
                "affinity zone, other zone",
                json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": ZONE}]}}}),
                spot("n3", "b"),
                Err(Constraint::PodAffinity),
            ),
            (
                "spread hostname, a fresh node",
                json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": HOSTNAME, "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}]}),
                spot("n2", "a"),
                Ok(()),
            ),
            (
                "spread hostname, the busy node",
                json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": HOSTNAME, "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}]}),
                spot("n1", "a"),
                Err(Constraint::TopologySpread),
            ),
            (
                "spread zone, the busy zone",
                json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": ZONE, "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}]}),
                spot("n2", "a"),
                Err(Constraint::TopologySpread),
            ),
            (
                "spread zone, the empty zone",
                json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": ZONE, "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}]}),
                spot("n3", "b"),
                Ok(()),
            ),
            (
                "spread ScheduleAnyway is no filter",
                json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": HOSTNAME, "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"app": "web"}}}]}),
                spot("n1", "a"),
                Ok(()),
            ),
        ];
        for (what, s, at, want) in cases {
            let p = PodPlacement::new("ns", web(), &spec(s));
            assert_eq!(p.admits(&at, &placed, &zones), want, "{what}");
        }
    }

    #[test]
    fn existing_anti_affinity_namespaces_and_host_ports() {
        let zones = BTreeSet::new();
        let guard = PlacedPod {
            anti_affinity: anti_affinity_terms(&spec(anti(HOSTNAME))),
            ..running("n1", "a")
        };
        let plain = PodPlacement::new("ns", web(), &spec(json!({})));
        assert_eq!(
            plain.admits(&spot("n1", "a"), std::slice::from_ref(&guard), &zones),
            Err(Constraint::PodAntiAffinity),
            "kept off by the running pod's anti-affinity"
        );
        let elsewhere = PodPlacement::new("other", web(), &spec(json!({})));
        assert_eq!(elsewhere.admits(&spot("n1", "a"), &[guard], &zones), Ok(()));
        let ported = |port: i32| {
            spec(
                json!({"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80, "hostPort": port}]}]}),
            )
        };
        let with_port = PodPlacement::new("ns", web(), &ported(8080));
        let taken = PlacedPod {
            host_ports: vec![("TCP".into(), 8080)],
            ..running("n1", "a")
        };
        assert_eq!(
            with_port.admits(&spot("n1", "a"), std::slice::from_ref(&taken), &zones),
            Err(Constraint::HostPorts)
        );
        assert_eq!(with_port.admits(&spot("n2", "a"), &[taken], &zones), Ok(()));
    }

    #[test]
    fn a_volume_pins_to_its_one_zone() {
        let pv = |zones: serde_json::Value| -> k8s_openapi::api::core::v1::PersistentVolume {
            serde_json::from_value(json!({"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "topology.ebs.csi.aws.com/zone", "operator": "In", "values": zones}]}]}}}}))
            .unwrap()
        };
        assert_eq!(
            volume_zone(&pv(json!(["us-east-1b"]))).as_deref(),
            Some("us-east-1b")
        );
        assert_eq!(volume_zone(&pv(json!(["us-east-1a", "us-east-1b"]))), None);
        assert_eq!(
            volume_zone(&serde_json::from_value(json!({"spec": {}})).unwrap()),
            None
        );
    }

    #[test]
    fn the_first_pod_of_a_self_affine_group_goes_anywhere() {
        let s = spec(
            json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": HOSTNAME}]}}}),
        );
        let p = PodPlacement::new("ns", web(), &s);
        assert_eq!(p.admits(&spot("n9", "a"), &[], &BTreeSet::new()), Ok(()));
        let stranger = PodPlacement::new("ns", BTreeMap::new(), &s);
        assert_eq!(
            stranger.admits(&spot("n9", "a"), &[], &BTreeSet::new()),
            Err(Constraint::PodAffinity)
        );
    }
}
