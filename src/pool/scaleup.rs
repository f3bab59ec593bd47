//! The scale-up decision (SPEC §6), one pure function for every pool at once: which
//! standby nodes to start, how many instances each pool launches, which warming nodes are
//! handed to pods, and which pods no pool can serve, with the reason.
//!
//! It trusts kube-scheduler: a pending pod here was refused by every node it could use, so
//! the only room is what Stratos brings up — nodes already starting, warming nodes, standby
//! nodes, and new launches within `poolSize`. Running nodes are never room.
//!
//! Pods are placed largest first (first-fit decreasing) against concrete candidates: a
//! standby node with its real labels, zone, free capacity and images; a launch as a node of
//! the pool's template in one of its class's zones. Each pod is served by at most one pool.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::SystemTime,
};

use k8s_openapi::api::core::v1::{PodSpec, Taint};

use super::{
    placement::{Constraint, PlacedPod, PodPlacement, Spot},
    quantity::{Resources, fits, take},
    scheduling::{selector_matches, tolerates},
};

/// A pod waiting for capacity.
#[derive(Debug, Clone)]
pub struct PendingPod {
    /// `namespace/name`.
    pub key: String,
    /// Its scheduling constraints (selectors, affinity, tolerations, spread, ports).
    pub spec: PodSpec,
    pub placement: PodPlacement,
    /// What the scheduler reserves (SPEC §6); `None`: a request could not be parsed.
    pub requests: Option<Resources>,
    pub images: BTreeSet<String>,
    /// The zone a bound zonal PersistentVolume pins it to.
    pub volume_zone: Option<String>,
}

/// A node a pool can put pods on.
#[derive(Debug, Clone)]
pub struct CandidateNode {
    pub instance_id: String,
    pub node_name: String,
    pub zone: String,
    /// The node's labels (with the pool's template labels, which Stratos converges).
    pub labels: BTreeMap<String, String>,
    /// Allocatable less what is on it or promised to it; `None`: not known yet (a launched
    /// instance without a Node and no node of its type to copy): room for one pod.
    pub free: Option<Resources>,
    pub images: BTreeSet<String>,
    /// When it last ran (for most-recently-used ordering).
    pub last_used: Option<SystemTime>,
    /// A standby instance still stopping: it is room (nothing is launched for pods it can
    /// take), but EC2 starts it only once stopped, in a later round.
    pub stopping: bool,
}

/// A pool as the decision sees it.
#[derive(Debug, Clone, Default)]
pub struct PoolCandidate {
    pub name: String,
    /// Template labels and `stratos.sh/pool`: what every node of the pool carries.
    pub labels: BTreeMap<String, String>,
    /// Taints every node keeps once started (the template's).
    pub taints: Vec<Taint>,
    /// Started, not yet Ready: capacity on its way.
    pub starting: Vec<CandidateNode>,
    /// Launched and warming: capacity on its way, handed to pods if they need it and the
    /// pool hands warm nodes over (SPEC §5.5).
    pub warming: Vec<CandidateNode>,
    /// Whether warm nodes may go straight to pods: not when the user data powers the
    /// instance off on its first boot (they go through standby and a start instead).
    pub hands_over: bool,
    /// Stopped and startable (instances in start back-off are left out).
    pub standby: Vec<CandidateNode>,
    /// Instances the pool may still launch (`poolSize` less its live instances).
    pub launch_room: usize,
    /// What one new node offers (allocatable less DaemonSet requests), if known.
    pub node_size: Option<Resources>,
    /// The zones of its class's subnets.
    pub zones: Vec<String>,
}

/// The pods already on nodes that constraints look at, and the zones nodes exist in.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub placed: Vec<PlacedPod>,
    pub zones: BTreeSet<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolScaleUp {
    pub pool: String,
    /// Standby instances to start.
    pub start: Vec<String>,
    /// Instances to launch for pods no existing node can take.
    pub launch: usize,
    /// Warming nodes to hand to pods.
    pub handoff: usize,
    /// Pods this pool serves (by starting, warming or new nodes).
    pub pods: Vec<String>,
}

/// Why a pending pod gets no node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unserved {
    /// No pool's labels, taints and node affinity admit it.
    NoMatchingPool,
    /// Larger than one node of any matching pool.
    TooLarge,
    /// It would fit, but no standby node or launch is left within `poolSize`.
    Exhausted,
    /// Every node a matching pool could bring up is refused by this constraint.
    Constraint(Constraint),
    /// A resource request is not a valid quantity.
    InvalidRequests,
}

impl Unserved {
    /// The event reason (SPEC §8.2).
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoMatchingPool => "NoMatchingPool",
            Self::TooLarge => "PodTooLarge",
            Self::Exhausted => "PoolExhausted",
            Self::Constraint(_) => "UnschedulableBySimulation",
            Self::InvalidRequests => "InvalidRequests",
        }
    }

    pub fn message(self) -> String {
        match self {
            Self::NoMatchingPool => {
                "no NodePool matches this pod's node selector, affinity and tolerations".into()
            }
            Self::TooLarge => {
                "the pod's requests exceed what one node of any matching pool can hold".into()
            }
            Self::Exhausted => "no standby node left and every matching pool is at poolSize".into(),
            Self::Constraint(c) => format!(
                "no node a matching pool can bring up satisfies the pod's {}",
                c.describe()
            ),
            Self::InvalidRequests => {
                "a resource request of this pod is not a valid quantity".into()
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScaleUp {
    /// Per pool, pools with something to do only, by name.
    pub pools: Vec<PoolScaleUp>,
    /// Pods no pool can serve, and why.
    pub unserved: Vec<(String, Unserved)>,
    /// Pools some pending pod matches (their empty nodes are not scaled down).
    pub wanted: BTreeSet<String>,
    /// Each served pod and the node it was placed on: a starting or started node's name,
    /// a warming node's name, or `<pool>/launch-<n>` for a launch.
    pub placements: Vec<(String, String)>,
    /// Standby instances chosen while still stopping: started in a later round.
    pub awaiting_stop: Vec<String>,
}

impl ScaleUp {
    /// Every instance to start, across pools (one StartInstances).
    pub fn starts(&self) -> Vec<String> {
        self.pools.iter().flat_map(|p| p.start.clone()).collect()
    }
}

/// Whether the pod tolerates the pool's permanent taints and selects its labels.
pub fn pool_admits(pool: &PoolCandidate, spec: &PodSpec) -> bool {
    let tolerations = spec.tolerations.clone().unwrap_or_default();
    pool.taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| tolerates(&tolerations, t))
        && selector_matches(spec, &pool.labels, "")
}

/// A node opened in this decision (or already in flight) and what is left on it.
struct Bin {
    pool: usize,
    kind: BinKind,
    node: CandidateNode,
    /// Unknown size: takes exactly one pod.
    taken: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BinKind {
    Starting,
    Warming,
    Started,
    Launched,
}

enum Verdict {
    Fits,
    Resources,
    Constraint(Constraint),
    Elsewhere,
}

fn check(
    pod: &PendingPod,
    requests: &Resources,
    node: &CandidateNode,
    taken: usize,
    cluster: &[PlacedPod],
    zones: &BTreeSet<String>,
) -> Verdict {
    if !selector_matches(&pod.spec, &node.labels, &node.node_name)
        || pod.volume_zone.as_ref().is_some_and(|z| *z != node.zone)
    {
        return Verdict::Elsewhere;
    }
    let room = match &node.free {
        Some(free) => fits(free, requests),
        None => taken == 0,
    };
    if !room {
        return Verdict::Resources;
    }
    let spot = Spot {
        node: node.node_name.clone(),
        zone: Some(node.zone.clone()),
    };
    match pod.placement.admits(&spot, cluster, zones) {
        Ok(()) => Verdict::Fits,
        Err(c) => Verdict::Constraint(c),
    }
}

/// Decides, for a batch of pending pods, what every pool brings up.
pub fn plan_scale_up(pods: &[PendingPod], pools: &[PoolCandidate], cluster: &Cluster) -> ScaleUp {
    let mut pools: Vec<PoolCandidate> = pools.to_vec();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    let cpu = |p: &PendingPod| {
        p.requests
            .as_ref()
            .and_then(|r| r.get("cpu").copied())
            .unwrap_or(0)
    };
    let mem = |p: &PendingPod| {
        p.requests
            .as_ref()
            .and_then(|r| r.get("memory").copied())
            .unwrap_or(0)
    };
    let mut order: Vec<&PendingPod> = pods.iter().collect();
    order.sort_by(|a, b| {
        cpu(b)
            .cmp(&cpu(a))
            .then(mem(b).cmp(&mem(a)))
            .then(a.key.cmp(&b.key))
    });

    let mut bins: Vec<Bin> = Vec::new();
    for (i, pool) in pools.iter().enumerate() {
        bins.extend(pool.starting.iter().map(|n| Bin {
            pool: i,
            kind: BinKind::Starting,
            node: n.clone(),
            taken: 0,
        }));
    }
    let mut warming: Vec<Vec<CandidateNode>> = pools.iter().map(|p| p.warming.clone()).collect();
    let mut closed: Vec<Vec<CandidateNode>> = pools.iter().map(|p| p.standby.clone()).collect();
    let mut launch_left: Vec<usize> = pools.iter().map(|p| p.launch_room).collect();
    let mut placed = cluster.placed.clone();
    let mut result: Vec<PoolScaleUp> = pools
        .iter()
        .map(|p| PoolScaleUp {
            pool: p.name.clone(),
            ..Default::default()
        })
        .collect();
    let mut handed: BTreeSet<(usize, String)> = BTreeSet::new();
    let mut unserved = Vec::new();
    let mut wanted = BTreeSet::new();
    let mut placements = Vec::new();
    let mut awaiting_stop = Vec::new();

    for pod in order {
        let eligible: Vec<usize> = (0..pools.len())
            .filter(|&i| pool_admits(&pools[i], &pod.spec))
            .collect();
        if eligible.is_empty() {
            unserved.push((pod.key.clone(), Unserved::NoMatchingPool));
            continue;
        }
        wanted.extend(eligible.iter().map(|&i| pools[i].name.clone()));
        let Some(requests) = pod.requests.as_ref() else {
            unserved.push((pod.key.clone(), Unserved::InvalidRequests));
            continue;
        };
        // What kept the pod off the nodes that were otherwise right for it.
        let mut blocked: Option<Constraint> = None;
        let mut fit_somewhere = false;
        let mut note = |v: &Verdict, fit: &mut bool| match v {
            Verdict::Constraint(c) => {
                *fit = true;
                blocked = Some(blocked.map_or(*c, |b| b.min(*c)));
            }
            Verdict::Fits => *fit = true,
            _ => {}
        };
        let mut chosen: Option<usize> = None;
        // 1. Room already coming: starting nodes, and nodes this decision opened for an
        // earlier pod (started, handed over or launched).
        for (b, bin) in bins.iter().enumerate() {
            if !eligible.contains(&bin.pool) {
                continue;
            }
            let v = check(pod, requests, &bin.node, bin.taken, &placed, &cluster.zones);
            note(&v, &mut fit_somewhere);
            if matches!(v, Verdict::Fits) {
                chosen = Some(b);
                break;
            }
        }
        // 2. A standby node: in pool order, the pod's images first, then the least used
        // zone, then the most recently used node.
        if chosen.is_none() {
            'pools: for &i in &eligible {
                let mut zone_use: BTreeMap<String, usize> = BTreeMap::new();
                for bin in bins.iter().filter(|b| b.pool == i) {
                    *zone_use.entry(bin.node.zone.clone()).or_default() += 1;
                }
                let mut fitting: Vec<usize> = Vec::new();
                for (idx, n) in closed[i].iter().enumerate() {
                    let v = check(pod, requests, n, 0, &placed, &cluster.zones);
                    note(&v, &mut fit_somewhere);
                    if matches!(v, Verdict::Fits) {
                        fitting.push(idx);
                    }
                }
                let warm = |n: &CandidateNode| {
                    pod.images
                        .iter()
                        .filter(|img| n.images.contains(*img))
                        .count()
                };
                let best = fitting.into_iter().max_by(|&a, &b| {
                    let (a, b) = (&closed[i][a], &closed[i][b]);
                    let zone = |n: &CandidateNode| {
                        std::cmp::Reverse(zone_use.get(&n.zone).copied().unwrap_or(0))
                    };
                    (!a.stopping)
                        .cmp(&!b.stopping)
                        .then(warm(a).cmp(&warm(b)))
                        .then(zone(a).cmp(&zone(b)))
                        .then(a.last_used.cmp(&b.last_used))
                        .then(b.instance_id.cmp(&a.instance_id))
                });
                if let Some(idx) = best {
                    let node = closed[i].remove(idx);
                    if node.stopping {
                        awaiting_stop.push(node.instance_id.clone());
                    } else {
                        result[i].start.push(node.instance_id.clone());
                    }
                    bins.push(Bin {
                        pool: i,
                        kind: BinKind::Started,
                        node,
                        taken: 0,
                    });
                    chosen = Some(bins.len() - 1);
                    break 'pools;
                }
            }
        }
        // 3. A warming node, handed over (slower than a start: it must finish warmup).
        if chosen.is_none() {
            'warming: for &i in &eligible {
                for idx in 0..warming[i].len() {
                    let v = check(pod, requests, &warming[i][idx], 0, &placed, &cluster.zones);
                    note(&v, &mut fit_somewhere);
                    if matches!(v, Verdict::Fits) {
                        let node = warming[i].remove(idx);
                        bins.push(Bin {
                            pool: i,
                            kind: BinKind::Warming,
                            node,
                            taken: 0,
                        });
                        chosen = Some(bins.len() - 1);
                        break 'warming;
                    }
                }
            }
        }
        // 4. A launch: a node of the pool's template, in the first of its zones that the
        // pod's constraints allow.
        if chosen.is_none() {
            'launch: for &i in &eligible {
                if launch_left[i] == 0 {
                    continue;
                }
                let pool = &pools[i];
                for zone in &pool.zones {
                    let mut labels = pool.labels.clone();
                    labels.insert(super::placement::ZONE.into(), zone.clone());
                    let node = CandidateNode {
                        instance_id: String::new(),
                        node_name: format!("{}/launch-{}", pool.name, result[i].launch),
                        zone: zone.clone(),
                        labels,
                        free: pool.node_size.clone(),
                        images: BTreeSet::new(),
                        last_used: None,
                        stopping: false,
                    };
                    let v = check(pod, requests, &node, 0, &placed, &cluster.zones);
                    note(&v, &mut fit_somewhere);
                    if matches!(v, Verdict::Fits) {
                        launch_left[i] -= 1;
                        result[i].launch += 1;
                        bins.push(Bin {
                            pool: i,
                            kind: BinKind::Launched,
                            node,
                            taken: 0,
                        });
                        chosen = Some(bins.len() - 1);
                        break 'launch;
                    }
                }
            }
        }
        match chosen {
            Some(b) => {
                let bin = &mut bins[b];
                if let Some(free) = bin.node.free.as_mut() {
                    take(free, requests);
                }
                bin.taken += 1;
                if bin.kind == BinKind::Warming && pools[bin.pool].hands_over {
                    handed.insert((bin.pool, bin.node.instance_id.clone()));
                }
                result[bin.pool].pods.push(pod.key.clone());
                placements.push((pod.key.clone(), bin.node.node_name.clone()));
                placed.push(pod.placement.placed_at(&Spot {
                    node: bin.node.node_name.clone(),
                    zone: Some(bin.node.zone.clone()),
                }));
            }
            None => {
                let too_large = eligible.iter().all(|&i| {
                    let pool = &pools[i];
                    let sizes = pool.node_size.iter().chain(
                        pool.standby
                            .iter()
                            .chain(&pool.starting)
                            .filter_map(|n| n.free.as_ref()),
                    );
                    let mut sizes = sizes.peekable();
                    sizes.peek().is_some() && sizes.all(|s| !fits(s, requests))
                });
                let reason = match blocked {
                    Some(c) if !too_large => Unserved::Constraint(c),
                    _ if too_large && !fit_somewhere => Unserved::TooLarge,
                    _ => Unserved::Exhausted,
                };
                unserved.push((pod.key.clone(), reason));
            }
        }
    }
    for (pool, _) in handed {
        result[pool].handoff += 1;
    }
    ScaleUp {
        pools: result
            .into_iter()
            .filter(|p| !p.start.is_empty() || p.launch > 0 || p.handoff > 0 || !p.pods.is_empty())
            .collect(),
        unserved,
        wanted,
        placements,
        awaiting_stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{
        placement::{HOSTNAME, PlacedPod},
        quantity::ONE,
    };
    use serde_json::json;

    fn res(cpu_milli: i128) -> Resources {
        Resources::from([
            ("cpu".to_owned(), cpu_milli),
            ("memory".to_owned(), 1024i128.pow(3) * ONE),
            ("pods".to_owned(), ONE),
        ])
    }

    fn pod(key: &str, cpu_milli: i128, spec: serde_json::Value) -> PendingPod {
        let mut spec = spec;
        if spec.get("containers").is_none() {
            spec["containers"] = json!([{"name": "c", "image": "app:1"}]);
        }
        let spec: PodSpec = serde_json::from_value(spec).unwrap();
        let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        PendingPod {
            key: key.into(),
            placement: PodPlacement::new("ns", labels, &spec),
            spec,
            requests: Some(res(cpu_milli)),
            images: BTreeSet::new(),
            volume_zone: None,
        }
    }

    fn node(id: &str, zone: &str, cpu_milli: i128) -> CandidateNode {
        let mut free = res(cpu_milli);
        free.insert("memory".into(), 30 * 1024i128.pow(3) * ONE);
        free.insert("pods".into(), 29 * ONE);
        CandidateNode {
            instance_id: id.into(),
            node_name: format!("ip-{id}"),
            zone: zone.into(),
            labels: BTreeMap::from([("pool".to_owned(), "ci".to_owned())]),
            free: Some(free),
            images: BTreeSet::new(),
            last_used: None,
            stopping: false,
        }
    }

    fn pool(name: &str, standby: Vec<CandidateNode>) -> PoolCandidate {
        PoolCandidate {
            name: name.into(),
            labels: BTreeMap::from([("pool".to_owned(), "ci".to_owned())]),
            standby,
            zones: vec!["a".into(), "b".into()],
            node_size: Some(node("size", "a", 8000).free.unwrap()),
            hands_over: true,
            ..Default::default()
        }
    }

    fn nodes(n: usize) -> Vec<CandidateNode> {
        (0..n)
            .map(|i| node(&format!("i-{i}"), ["a", "b"][i % 2], 8000))
            .collect()
    }

    fn decide(pods: &[PendingPod], pools: &[PoolCandidate]) -> ScaleUp {
        plan_scale_up(pods, pools, &Cluster::default())
    }

    fn anti_hostname() -> serde_json::Value {
        json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": HOSTNAME}]}}})
    }

    #[test]
    fn a_burst_starts_exactly_the_bin_packed_number_of_nodes_in_one_list() {
        // 40 pods of 1.5 CPU on 8-CPU nodes: 5 per node, so 8 nodes.
        let pods: Vec<PendingPod> = (0..40)
            .map(|i| pod(&format!("ci/job-{i:02}"), 1500, json!({})))
            .collect();
        let plan = decide(&pods, &[pool("ci", nodes(20))]);
        assert_eq!(plan.starts().len(), 8);
        assert_eq!(plan.pools[0].pods.len(), 40);
        assert_eq!(plan.pools[0].launch, 0);
        assert!(plan.unserved.is_empty());
        // First-fit decreasing: mixed sizes pack tighter than arrival order would.
        let mixed: Vec<PendingPod> = [1000, 7000, 1000, 7000, 1000]
            .iter()
            .enumerate()
            .map(|(i, c)| pod(&format!("p{i}"), *c, json!({})))
            .collect();
        assert_eq!(decide(&mixed, &[pool("ci", nodes(5))]).starts().len(), 3);
    }

    #[test]
    fn starting_nodes_cover_pods_first_and_running_nodes_are_not_room() {
        let pods: Vec<PendingPod> = (0..5)
            .map(|i| pod(&format!("p{i}"), 1500, json!({})))
            .collect();
        let mut p = pool("ci", nodes(3));
        p.starting = vec![node("i-starting", "a", 8000)];
        let plan = decide(&pods, &[p]);
        assert!(plan.starts().is_empty(), "{plan:?}");
        assert_eq!(plan.pools[0].pods.len(), 5);
        assert!(plan.placements.iter().all(|(_, n)| n == "ip-i-starting"));
    }

    #[test]
    fn standby_choice_images_then_zone_then_most_recently_used() {
        let mut llm = pod("llm/serve", 4000, json!({}));
        llm.images = BTreeSet::from(["llama-3:70b".to_owned()]);
        let mut warm = node("i-warm", "a", 8000);
        warm.images = llm.images.clone();
        let mut cold = node("i-cold", "a", 8000);
        cold.last_used = Some(SystemTime::now());
        assert_eq!(
            decide(&[llm], &[pool("p", vec![cold, warm])]).starts(),
            ["i-warm"]
        );

        let two: Vec<PendingPod> = (0..2)
            .map(|i| pod(&format!("p{i}"), 6000, json!({})))
            .collect();
        let at = |s: u64| Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s));
        let mut a_old = node("i-a-old", "a", 8000);
        a_old.last_used = at(1);
        let mut a_new = node("i-a-new", "a", 8000);
        a_new.last_used = at(50);
        let mut b_old = node("i-b-old", "b", 8000);
        b_old.last_used = at(2);
        assert_eq!(
            decide(&two, &[pool("p", vec![a_old, a_new, b_old])]).starts(),
            ["i-a-new", "i-b-old"]
        );
    }

    #[test]
    fn a_pod_two_pools_could_serve_is_served_by_one() {
        let one = [pod("p0", 1000, json!({"nodeSelector": {"pool": "ci"}}))];
        // Both have standby: the first by name starts one node, the other nothing.
        let plan = decide(&one, &[pool("b", nodes(2)), pool("a", nodes(2))]);
        assert_eq!(plan.starts().len(), 1);
        assert_eq!(plan.pools.len(), 1);
        assert_eq!(plan.pools[0].pool, "a");
        assert_eq!(
            plan.wanted,
            BTreeSet::from(["a".to_owned(), "b".to_owned()])
        );
        // Standby exhausted in both: exactly one launch, in one pool.
        let mut a = pool("a", vec![]);
        a.launch_room = 3;
        let mut b = pool("b", vec![]);
        b.launch_room = 3;
        let plan = decide(&one, &[a, b]);
        let launches: Vec<(String, usize)> = plan
            .pools
            .iter()
            .map(|p| (p.pool.clone(), p.launch))
            .collect();
        assert_eq!(launches, [("a".to_owned(), 1)]);
        // A pool with standby room wins over launching in the first.
        let mut a = pool("a", vec![]);
        a.launch_room = 3;
        let plan = decide(&one, &[a, pool("b", nodes(1))]);
        assert_eq!(plan.starts(), ["i-0"]);
        assert!(plan.pools.iter().all(|p| p.launch == 0));
    }

    #[test]
    fn selectors_and_taints_pick_the_pool() {
        let gpu_taint: Taint =
            serde_json::from_value(json!({"key": "gpu", "value": "true", "effect": "NoSchedule"}))
                .unwrap();
        let mut gpu = pool("gpu", vec![node("i-g", "a", 8000)]);
        gpu.taints = vec![gpu_taint];
        gpu.labels.insert("pool".into(), "gpu".into());
        gpu.standby[0].labels.insert("pool".into(), "gpu".into());
        let pools = [gpu, pool("ci", nodes(1))];
        let plain = pod("plain", 1000, json!({}));
        let tolerant = pod(
            "tolerant",
            1000,
            json!({"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]}),
        );
        let intolerant = pod("intolerant", 1000, json!({"nodeSelector": {"pool": "gpu"}}));
        let plan = decide(&[plain, tolerant, intolerant], &pools);
        let served: BTreeMap<&str, &str> = plan
            .placements
            .iter()
            .map(|(p, n)| (p.as_str(), n.as_str()))
            .collect();
        assert_eq!(served["plain"], "ip-i-0");
        assert_eq!(served["tolerant"], "ip-i-g");
        assert_eq!(
            plan.unserved,
            [("intolerant".to_owned(), Unserved::NoMatchingPool)]
        );
    }

    #[test]
    fn anti_affinity_opens_a_node_per_replica_counting_earlier_placements() {
        // Three replicas, hostname anti-affinity, one already running: two standby nodes,
        // not one with room for all.
        let replicas: Vec<PendingPod> = (1..3)
            .map(|i| pod(&format!("web-{i}"), 500, anti_hostname()))
            .collect();
        let cluster = Cluster {
            placed: vec![PlacedPod {
                namespace: "ns".into(),
                labels: BTreeMap::from([("app".to_owned(), "web".to_owned())]),
                node: "running-1".into(),
                zone: Some("a".into()),
                anti_affinity: replicas[0]
                    .placement
                    .placed_at(&Spot {
                        node: String::new(),
                        zone: None,
                    })
                    .anti_affinity,
                host_ports: vec![],
            }],
            zones: BTreeSet::from(["a".to_owned(), "b".to_owned()]),
        };
        let plan = plan_scale_up(&replicas, &[pool("web", nodes(3))], &cluster);
        assert_eq!(plan.starts().len(), 2);
        // Against a pod on a starting node: that node is no room for a second replica.
        let mut p = pool("web", nodes(1));
        p.starting = vec![node("i-starting", "a", 8000)];
        let cluster = Cluster {
            placed: vec![PlacedPod {
                node: "ip-i-starting".into(),
                ..cluster.placed[0].clone()
            }],
            ..cluster
        };
        let plan = plan_scale_up(&replicas[..1], &[p], &cluster);
        assert_eq!(plan.starts(), ["i-0"]);
    }

    #[test]
    fn a_zonal_volume_needs_a_node_of_its_zone() {
        let mut pinned = pod("db", 1000, json!({}));
        pinned.volume_zone = Some("b".into());
        let plan = decide(
            std::slice::from_ref(&pinned),
            &[pool(
                "p",
                vec![node("i-a", "a", 8000), node("i-b", "b", 8000)],
            )],
        );
        assert_eq!(plan.starts(), ["i-b"]);
        // Standby only in the wrong zone: a launch, in the volume's zone.
        let mut p = pool("p", vec![node("i-a", "a", 8000)]);
        p.launch_room = 1;
        let plan = decide(&[pinned.clone()], &[p]);
        assert!(plan.starts().is_empty());
        assert_eq!(plan.pools[0].launch, 1);
        assert_eq!(plan.placements[0].1, "p/launch-0");
        // No zone of the pool's: nothing to do but say why.
        let mut p = pool("p", vec![node("i-a", "a", 8000)]);
        p.zones = vec!["a".into()];
        p.launch_room = 1;
        let plan = decide(&[pinned], &[p]);
        assert_eq!(plan.unserved.len(), 1);
    }

    #[test]
    fn warming_nodes_are_handed_over_only_after_standby_and_launches_fill_the_rest() {
        let pods: Vec<PendingPod> = (0..3)
            .map(|i| pod(&format!("p{i}"), 6000, json!({})))
            .collect();
        let mut p = pool("p", vec![node("i-standby", "a", 8000)]);
        p.warming = vec![node("i-warming", "a", 8000)];
        p.launch_room = 5;
        let plan = decide(&pods, &[p]);
        let scale = &plan.pools[0];
        assert_eq!(scale.start, ["i-standby"]);
        assert_eq!(scale.handoff, 1);
        assert_eq!(scale.launch, 1);
        // A launched instance not registered yet (size unknown) takes one pod.
        let mut p = pool("p", vec![]);
        p.warming = vec![CandidateNode {
            free: None,
            ..node("i-new", "a", 8000)
        }];
        p.launch_room = 5;
        let plan = decide(&pods, &[p]);
        assert_eq!((plan.pools[0].handoff, plan.pools[0].launch), (1, 2));
        // A pool whose user data powers off: the warming node is room on its way (nothing
        // launched for it) but goes through standby, never straight to the pods.
        let mut p = pool("p", vec![]);
        p.warming = vec![node("i-warming", "a", 8000)];
        p.hands_over = false;
        let plan = decide(&pods[..1], &[p]);
        assert_eq!((plan.pools[0].handoff, plan.pools[0].launch), (0, 0));
    }

    #[test]
    fn a_stopping_standby_node_is_room_but_starts_later() {
        let mut n = node("i-stopping", "a", 8000);
        n.stopping = true;
        let mut p = pool("p", vec![n]);
        p.launch_room = 3;
        let plan = decide(&[pod("p0", 1000, json!({}))], &[p]);
        assert!(plan.starts().is_empty());
        assert_eq!(plan.awaiting_stop, ["i-stopping"]);
        assert_eq!(plan.pools[0].launch, 0, "nothing launched for it");
    }

    #[test]
    fn unserved_pods_say_why() {
        let mut small = pool("p", nodes(1));
        small.launch_room = 0;
        let huge = pod("huge", 64_000, json!({}));
        let extra = pod("extra", 6000, json!({}));
        let first = pod("first", 7000, json!({}));
        let mut bad = pod("bad", 1000, json!({}));
        bad.requests = None;
        let ported = pod(
            "ported",
            100,
            json!({"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80, "hostPort": 80}]}]}),
        );
        let cluster = Cluster {
            placed: vec![PlacedPod {
                node: "ip-i-0".into(),
                host_ports: vec![("TCP".into(), 80)],
                ..Default::default()
            }],
            zones: BTreeSet::new(),
        };
        let plan = plan_scale_up(&[huge, first, extra, bad, ported], &[small], &cluster);
        let reasons: BTreeMap<&str, Unserved> = plan
            .unserved
            .iter()
            .map(|(k, r)| (k.as_str(), *r))
            .collect();
        assert_eq!(reasons["huge"], Unserved::TooLarge);
        assert_eq!(reasons["extra"], Unserved::Exhausted);
        assert_eq!(reasons["bad"], Unserved::InvalidRequests);
        assert_eq!(
            reasons["ported"],
            Unserved::Constraint(Constraint::HostPorts)
        );
        assert!(!reasons.contains_key("first"));
    }
}
