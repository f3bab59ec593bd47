//! The scale-up decision (SPEC §6): which pool serves each pending pod, and how many of its
//! standby nodes to start (first-fit-decreasing bin-packing), preferring nodes whose disks
//! already hold the pods' images, then balancing zones, then the most recently used.
//! A pure function of the pending pods and the pools' nodes.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::SystemTime,
};

use k8s_openapi::api::core::v1::{PodSpec, Taint};

use super::scheduling::{selector_matches, tolerates};

/// Amounts by resource name (cores for CPU, bytes for memory, a count for pods).
pub type Resources = BTreeMap<String, f64>;

fn fits(free: &Resources, want: &Resources) -> bool {
    want.iter()
        .all(|(k, v)| *v <= 0.0 || free.get(k).copied().unwrap_or(0.0) + 1e-9 >= *v)
}

fn take(free: &mut Resources, want: &Resources) {
    for (k, v) in want {
        *free.entry(k.clone()).or_default() -= v;
    }
}

/// A pod waiting for capacity.
#[derive(Debug, Clone)]
pub struct PendingPod {
    /// `namespace/name`.
    pub key: String,
    pub spec: PodSpec,
    /// What the scheduler will reserve: max(init) vs sum(containers), plus overhead and one
    /// `pods` slot.
    pub requests: Resources,
    pub images: BTreeSet<String>,
}

/// A node a pool can put pods on.
#[derive(Debug, Clone)]
pub struct CandidateNode {
    pub instance_id: String,
    pub node_name: String,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    /// Allocatable minus what DaemonSets and already-bound pods request.
    pub free: Resources,
    pub images: BTreeSet<String>,
    /// When it last ran (for most-recently-used ordering).
    pub last_used: Option<SystemTime>,
}

/// A pool as the scale-up decision sees it.
#[derive(Debug, Clone)]
pub struct PoolCandidate {
    pub name: String,
    /// The template's labels: what every node of the pool carries, for telling a pod that
    /// no pool matches from one that waits for capacity when no node is left to look at.
    pub labels: BTreeMap<String, String>,
    /// Taints every node of the pool carries permanently.
    pub taints: Vec<Taint>,
    /// Started and not yet Ready: capacity already on its way.
    pub starting: Vec<CandidateNode>,
    pub standby: Vec<CandidateNode>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolScaleUp {
    pub pool: String,
    /// Standby instances to start, in one batch.
    pub start: Vec<String>,
    /// Pods this start (or starting capacity) serves.
    pub pods: Vec<String>,
}

/// Why a pending pod gets no node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unserved {
    /// No pool's labels, taints and affinity admit it.
    NoMatchingPool,
    /// No node of any matching pool could hold it.
    TooLarge,
    /// It would fit, but no standby node is left.
    Exhausted,
}

impl Unserved {
    /// The event reason (SPEC §8.2).
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoMatchingPool => "NoMatchingPool",
            Self::TooLarge => "PodTooLarge",
            Self::Exhausted => "PoolExhausted",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::NoMatchingPool => {
                "no NodePool matches this pod's node selector, affinity and tolerations"
            }
            Self::TooLarge => {
                "the pod's requests exceed what one node of any matching pool can hold"
            }
            Self::Exhausted => {
                "no standby capacity left in a matching pool; new nodes are launched while the pool is below poolSize"
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScaleUp {
    pub pools: Vec<PoolScaleUp>,
    /// Pods no pool can serve, and why.
    pub unserved: Vec<(String, Unserved)>,
}

fn pool_accepts(pool: &PoolCandidate, pod: &PendingPod) -> bool {
    let tolerations = pod.spec.tolerations.clone().unwrap_or_default();
    pool.taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| tolerates(&tolerations, t))
}

fn node_accepts(node: &CandidateNode, pod: &PendingPod) -> bool {
    selector_matches(&pod.spec, &node.labels, &node.node_name)
}

/// Decides the starts for a batch of pending pods.
pub fn plan_scale_up(pods: &[PendingPod], pools: &[PoolCandidate]) -> ScaleUp {
    let mut pools: Vec<PoolCandidate> = pools.to_vec();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    // First-fit decreasing: largest CPU, then memory, first; the key breaks ties.
    let mut order: Vec<&PendingPod> = pods.iter().collect();
    order.sort_by(|a, b| {
        let cpu = |p: &PendingPod| p.requests.get("cpu").copied().unwrap_or(0.0);
        let mem = |p: &PendingPod| p.requests.get("memory").copied().unwrap_or(0.0);
        cpu(b)
            .total_cmp(&cpu(a))
            .then(mem(b).total_cmp(&mem(a)))
            .then(a.key.cmp(&b.key))
    });
    // Per pool: free capacity of starting nodes, of standby nodes opened in this decision,
    // and the standby nodes still closed.
    let mut starting: Vec<Vec<CandidateNode>> = pools.iter().map(|p| p.starting.clone()).collect();
    let mut opened: Vec<Vec<CandidateNode>> = vec![Vec::new(); pools.len()];
    let mut closed: Vec<Vec<CandidateNode>> = pools.iter().map(|p| p.standby.clone()).collect();
    let mut result: Vec<PoolScaleUp> = pools
        .iter()
        .map(|p| PoolScaleUp {
            pool: p.name.clone(),
            ..Default::default()
        })
        .collect();
    let mut unserved = Vec::new();

    for pod in order {
        let mut placed = false;
        let mut too_large_everywhere = true;
        let mut matched = false;
        for (i, pool) in pools.iter().enumerate() {
            if !pool_accepts(pool, pod) {
                continue;
            }
            // Nodes carry the well-known labels too, so they are the better judge; the
            // template's labels serve when no candidate node is left.
            let mut candidates = starting[i]
                .iter()
                .chain(opened[i].iter())
                .chain(closed[i].iter())
                .peekable();
            let matches = match candidates.peek() {
                Some(_) => candidates.any(|n| node_accepts(n, pod)),
                None => selector_matches(&pod.spec, &pool.labels, ""),
            };
            if !matches {
                continue;
            }
            matched = true;
            // Capacity already on its way (in flight) or opened for an earlier pod.
            for node in starting[i].iter_mut().chain(opened[i].iter_mut()) {
                if node_accepts(node, pod) && fits(&node.free, &pod.requests) {
                    take(&mut node.free, &pod.requests);
                    result[i].pods.push(pod.key.clone());
                    placed = true;
                    break;
                }
            }
            if placed {
                break;
            }
            // Open a standby node: warm images first, then the least used zone, then the
            // most recently used node.
            let mut zone_use: BTreeMap<&str, usize> = BTreeMap::new();
            for n in starting[i].iter().chain(opened[i].iter()) {
                *zone_use.entry(n.zone.as_str()).or_default() += 1;
            }
            let best = closed[i]
                .iter()
                .enumerate()
                .filter(|(_, n)| node_accepts(n, pod))
                .filter(|(_, n)| {
                    let fit = fits(&n.free, &pod.requests);
                    if fit {
                        too_large_everywhere = false;
                    }
                    fit
                })
                .max_by(|(_, a), (_, b)| {
                    let warm = |n: &CandidateNode| {
                        pod.images
                            .iter()
                            .filter(|img| n.images.contains(*img))
                            .count()
                    };
                    let zone = |n: &CandidateNode| {
                        std::cmp::Reverse(zone_use.get(n.zone.as_str()).copied().unwrap_or(0))
                    };
                    warm(a)
                        .cmp(&warm(b))
                        .then(zone(a).cmp(&zone(b)))
                        .then(a.last_used.cmp(&b.last_used))
                        .then(b.instance_id.cmp(&a.instance_id))
                })
                .map(|(idx, _)| idx);
            if let Some(idx) = best {
                let mut node = closed[i].remove(idx);
                take(&mut node.free, &pod.requests);
                result[i].start.push(node.instance_id.clone());
                result[i].pods.push(pod.key.clone());
                opened[i].push(node);
                placed = true;
                break;
            }
            if starting[i]
                .iter()
                .chain(opened[i].iter())
                .any(|n| node_accepts(n, pod))
            {
                too_large_everywhere = false;
            }
        }
        if !placed {
            let reason = if !matched {
                Unserved::NoMatchingPool
            } else if too_large_everywhere
                && pools
                    .iter()
                    .any(|p| !p.standby.is_empty() || !p.starting.is_empty())
            {
                Unserved::TooLarge
            } else {
                Unserved::Exhausted
            };
            unserved.push((pod.key.clone(), reason));
        }
    }
    ScaleUp {
        pools: result.into_iter().filter(|p| !p.pods.is_empty()).collect(),
        unserved,
    }
}

/// How many new nodes `pods` need beyond what `pool` holds (SPEC §6, standby exhausted):
/// the pods no node of the pool takes, first-fit-decreasing into nodes of `node_size`.
/// Pods larger than a node are not counted. Without a known node size, one node per pod,
/// less the `unknown` members whose size is not known either (launched, not registered).
pub fn nodes_to_launch(
    pods: &[PendingPod],
    pool: PoolCandidate,
    node_size: Option<&Resources>,
    unknown: usize,
) -> usize {
    let decision = plan_scale_up(pods, &[pool]);
    let Some(size) = node_size else {
        return decision.unserved.len().saturating_sub(unknown);
    };
    let mut left: Vec<&PendingPod> = pods
        .iter()
        .filter(|p| decision.unserved.iter().any(|(k, _)| *k == p.key))
        .filter(|p| fits(size, &p.requests))
        .collect();
    let cpu = |p: &PendingPod| p.requests.get("cpu").copied().unwrap_or(0.0);
    left.sort_by(|a, b| cpu(b).total_cmp(&cpu(a)));
    let mut bins: Vec<Resources> = Vec::new();
    for pod in left {
        let slot = match bins.iter().position(|b| fits(b, &pod.requests)) {
            Some(i) => i,
            None => {
                bins.push(size.clone());
                bins.len() - 1
            }
        };
        take(&mut bins[slot], &pod.requests);
    }
    bins.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn res(cpu: f64, mem_gib: f64) -> Resources {
        Resources::from([
            ("cpu".to_owned(), cpu),
            ("memory".to_owned(), mem_gib * 1024f64.powi(3)),
            ("pods".to_owned(), 1.0),
        ])
    }

    fn pod(key: &str, cpu: f64, spec: serde_json::Value, images: &[&str]) -> PendingPod {
        let mut spec = spec;
        spec["containers"] =
            json!([{"name": "c", "image": images.first().copied().unwrap_or("app:1")}]);
        PendingPod {
            key: key.into(),
            spec: serde_json::from_value(spec).unwrap(),
            requests: res(cpu, 1.0),
            images: images.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn node(
        id: &str,
        zone: &str,
        cpu: f64,
        images: &[&str],
        last_used: u64,
        labels: serde_json::Value,
    ) -> CandidateNode {
        let mut free = res(cpu, 30.0);
        free.insert("pods".into(), 29.0);
        CandidateNode {
            instance_id: id.into(),
            node_name: format!("ip-{id}"),
            zone: zone.into(),
            labels: serde_json::from_value(labels).unwrap(),
            free,
            images: images.iter().map(|s| s.to_string()).collect(),
            last_used: Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(last_used)),
        }
    }

    fn pool(
        name: &str,
        standby: Vec<CandidateNode>,
        starting: Vec<CandidateNode>,
    ) -> PoolCandidate {
        PoolCandidate {
            name: name.into(),
            labels: BTreeMap::new(),
            taints: vec![],
            starting,
            standby,
        }
    }

    fn ci_nodes(n: usize) -> Vec<CandidateNode> {
        (0..n)
            .map(|i| {
                node(
                    &format!("i-{i}"),
                    ["a", "b"][i % 2],
                    8.0,
                    &[],
                    i as u64,
                    json!({"pool": "ci"}),
                )
            })
            .collect()
    }

    #[test]
    fn a_burst_starts_exactly_the_bin_packed_number_of_nodes() {
        // 40 pods of 1.5 CPU on 8-CPU nodes: 5 fit per node, so 8 nodes.
        let pods: Vec<PendingPod> = (0..40)
            .map(|i| pod(&format!("ci/job-{i:02}"), 1.5, json!({}), &[]))
            .collect();
        let plan = plan_scale_up(&pods, &[pool("ci", ci_nodes(20), vec![])]);
        assert_eq!(plan.pools.len(), 1);
        assert_eq!(plan.pools[0].start.len(), 8);
        assert_eq!(plan.pools[0].pods.len(), 40);
        assert!(plan.unserved.is_empty());
        // FFD: mixed sizes pack tighter than arrival order would.
        let mixed: Vec<PendingPod> = [1.0, 7.0, 1.0, 7.0, 1.0]
            .iter()
            .enumerate()
            .map(|(i, c)| pod(&format!("p{i}"), *c, json!({}), &[]))
            .collect();
        assert_eq!(
            plan_scale_up(&mixed, &[pool("ci", ci_nodes(5), vec![])]).pools[0]
                .start
                .len(),
            3
        );
    }

    #[test]
    fn starting_nodes_cover_pods_first_so_nothing_starts_twice() {
        let pods: Vec<PendingPod> = (0..5)
            .map(|i| pod(&format!("p{i}"), 1.5, json!({}), &[]))
            .collect();
        let in_flight = vec![node("i-starting", "a", 8.0, &[], 0, json!({"pool": "ci"}))];
        let plan = plan_scale_up(&pods, &[pool("ci", ci_nodes(3), in_flight)]);
        assert!(plan.pools[0].start.is_empty(), "{plan:?}");
        assert_eq!(plan.pools[0].pods.len(), 5);
    }

    #[test]
    fn the_node_with_the_model_image_is_chosen() {
        let pods = vec![pod("llm/serve", 4.0, json!({}), &["llama-3:70b"])];
        let nodes = vec![
            node("i-cold", "a", 8.0, &["other:1"], 100, json!({})),
            node("i-warm", "a", 8.0, &["llama-3:70b"], 1, json!({})),
        ];
        assert_eq!(
            plan_scale_up(&pods, &[pool("inference", nodes, vec![])]).pools[0].start,
            vec!["i-warm"]
        );
    }

    #[test]
    fn zones_balance_then_most_recently_used_wins() {
        let pods: Vec<PendingPod> = (0..2)
            .map(|i| pod(&format!("p{i}"), 6.0, json!({}), &[]))
            .collect();
        let nodes = vec![
            node("i-a-old", "a", 8.0, &[], 1, json!({})),
            node("i-a-new", "a", 8.0, &[], 50, json!({})),
            node("i-b-old", "b", 8.0, &[], 2, json!({})),
        ];
        let start = &plan_scale_up(&pods, &[pool("p", nodes, vec![])]).pools[0].start;
        assert_eq!(start, &vec!["i-a-new".to_owned(), "i-b-old".to_owned()]);
    }

    #[test]
    fn selectors_taints_and_competing_pools() {
        let gpu_taint = Taint {
            key: "gpu".into(),
            value: Some("true".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        };
        let pools = vec![
            PoolCandidate {
                name: "b-gpu".into(),
                labels: BTreeMap::new(),
                taints: vec![gpu_taint],
                starting: vec![],
                standby: vec![node("i-g", "a", 8.0, &[], 0, json!({"pool": "gpu"}))],
            },
            pool(
                "a-ci",
                vec![
                    node("i-c1", "a", 8.0, &[], 0, json!({"pool": "ci"})),
                    node("i-c2", "a", 8.0, &[], 0, json!({"pool": "ci"})),
                ],
                vec![],
            ),
            pool(
                "c-ci2",
                vec![node("i-d", "a", 8.0, &[], 0, json!({"pool": "ci"}))],
                vec![],
            ),
        ];
        let pods = vec![
            pod(
                "gpu-job",
                1.0,
                json!({"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]}),
                &[],
            ),
            pod(
                "gpu-intolerant",
                1.0,
                json!({"nodeSelector": {"pool": "gpu"}}),
                &[],
            ),
            pod(
                "ci-job",
                1.0,
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ci"]}]}]}}}}),
                &[],
            ),
            pod(
                "nowhere",
                1.0,
                json!({"nodeSelector": {"pool": "tpu"}}),
                &[],
            ),
            pod("huge", 64.0, json!({}), &[]),
        ];
        let plan = plan_scale_up(&pods, &pools);
        let by_pool: BTreeMap<String, Vec<String>> = plan
            .pools
            .iter()
            .map(|p| (p.pool.clone(), p.pods.clone()))
            .collect();
        assert_eq!(by_pool.get("b-gpu"), Some(&vec!["gpu-job".to_owned()]));
        assert_eq!(
            by_pool.get("a-ci"),
            Some(&vec!["ci-job".to_owned()]),
            "one pool per pod, chosen by name"
        );
        assert!(!by_pool.contains_key("c-ci2"));
        let unserved: Vec<(&str, &str)> = plan
            .unserved
            .iter()
            .map(|(k, why)| (k.as_str(), why.reason()))
            .collect();
        assert_eq!(
            unserved,
            vec![
                ("huge", "PodTooLarge"),
                ("gpu-intolerant", "NoMatchingPool"),
                ("nowhere", "NoMatchingPool")
            ]
        );
    }

    #[test]
    fn a_pool_without_nodes_left_tells_a_misfit_from_a_wait() {
        let mut empty = pool("ci", vec![], vec![]);
        empty.labels = BTreeMap::from([("pool".to_owned(), "ci".to_owned())]);
        let pods = [
            pod("waits", 1.0, json!({"nodeSelector": {"pool": "ci"}}), &[]),
            pod("misfit", 1.0, json!({"nodeSelector": {"pool": "tpu"}}), &[]),
        ];
        let plan = plan_scale_up(&pods, &[empty]);
        let reasons: BTreeMap<&str, &str> = plan
            .unserved
            .iter()
            .map(|(k, why)| (k.as_str(), why.reason()))
            .collect();
        assert_eq!(reasons["waits"], "PoolExhausted");
        assert_eq!(reasons["misfit"], "NoMatchingPool");
    }

    #[test]
    fn launches_pack_what_no_node_takes_into_nodes_of_the_known_size() {
        // An m5.large: 1920m, 7 GiB, 29 pods.
        let mut size = res(1.92, 7.0);
        size.insert("pods".to_owned(), 29.0);
        let pods = |n: usize, cpu: f64| -> Vec<PendingPod> {
            (0..n)
                .map(|i| pod(&format!("p{i}"), cpu, json!({}), &[]))
                .collect()
        };
        let empty = || pool("a", vec![], vec![]);
        let with_standby = || pool("a", vec![node("i-1", "a", 1.92, &[], 0, json!({}))], vec![]);
        type Case<'a> = (
            &'a str,
            Vec<PendingPod>,
            PoolCandidate,
            Option<&'a Resources>,
            usize,
            usize,
        );
        let table: Vec<Case> = vec![
            (
                "one 1.5 CPU pod per node",
                pods(4, 1.5),
                empty(),
                Some(&size),
                0,
                4,
            ),
            (
                "two 0.9 CPU pods per node",
                pods(8, 0.9),
                empty(),
                Some(&size),
                0,
                4,
            ),
            (
                "a standby node takes two first",
                pods(8, 0.9),
                with_standby(),
                Some(&size),
                0,
                3,
            ),
            (
                "larger than a node: not counted",
                pods(2, 3.0),
                empty(),
                Some(&size),
                0,
                0,
            ),
            (
                "size unknown: one per pod",
                pods(3, 0.1),
                empty(),
                None,
                0,
                3,
            ),
            (
                "size unknown, two launched already",
                pods(3, 0.1),
                empty(),
                None,
                2,
                1,
            ),
        ];
        for (what, pods, pool, size, unknown, want) in table {
            assert_eq!(nodes_to_launch(&pods, pool, size, unknown), want, "{what}");
        }
    }
}
