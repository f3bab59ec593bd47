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
    /// Launched and warming, handed to pods if they need it (SPEC §5.5).
    pub warming: Vec<CandidateNode>,
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
                if bin.kind == BinKind::Warming {
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
