//! `FakeCloud`: an in-memory [`CloudProvider`] for tests, the sandbox and benchmarks.
//!
//! Deterministic (sequential ids, no randomness) and driven by tokio's clock, so tests with
//! paused time control every transition. It behaves like EC2 where Stratos depends on it:
//! transitions take configurable time (pending→running, stopping→stopped,
//! shutting-down→terminated); a repeated ClientToken returns the original instances;
//! starting a running or stopping a stopped instance succeeds as a no-op; acting on an
//! instance in a transitional state fails with InvalidState; ids without this cluster's
//! tag are refused as an IAM tag condition would. On top it offers what EC2 cannot: a
//! capacity limit, injected faults per operation, an optional self-stop after first boot
//! (the seeds' `poweroff`), and a call log.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use tokio::time::Instant;

use super::{
    BatchOutcome, CloudError, CloudProvider, Instance, InstanceState, LaunchOutcome, LaunchRequest,
    LaunchSpec, NodeClassCheck, NodeClassRefs, ratelimit::Operation, spread_across_subnets, tags,
};
use crate::api::awsnodeclass::ResolvedSubnet;

/// Transition latencies and behaviour.
#[derive(Debug, Clone)]
pub struct FakeCloudConfig {
    pub cluster: String,
    /// Launch or start until `running`.
    pub pending_to_running: Duration,
    /// Added to `pending_to_running` for a fresh launch (a cold instance boots slower than a
    /// stopped one starts).
    pub launch_extra: Duration,
    pub stopping_to_stopped: Duration,
    pub shutting_down_to_terminated: Duration,
    /// After its first boot reaches `running`, the instance stops itself this much later.
    pub self_stop_after_first_boot: Option<Duration>,
    /// Maximum live (non-terminated) instances; launches beyond it get what fits.
    pub capacity: Option<usize>,
    /// How long terminated instances stay visible in listings (EC2: about an hour).
    pub terminated_visible_for: Duration,
    /// Instance ids count up from this number (`i-` and 17 hex digits): fakes that share
    /// one real cluster use disjoint ranges, so their Nodes' providerIDs never collide.
    pub id_base: u64,
    /// Domain of the private DNS names (`ip-10-0-0-1.<domain>`), which name the Nodes.
    pub dns_domain: String,
    /// How long every API call takes to answer (EC2's StartInstances takes a few hundred
    /// milliseconds); zero: at once.
    pub api_latency: Duration,
    /// EC2's request buckets, as Ec2Cloud applies them (`None`: no limit), for benchmarks
    /// and tests that must see what production sees.
    pub limits: Option<crate::cloud::ratelimit::Limits>,
}

impl Default for FakeCloudConfig {
    fn default() -> Self {
        Self {
            cluster: "test".into(),
            pending_to_running: Duration::from_secs(1),
            launch_extra: Duration::ZERO,
            stopping_to_stopped: Duration::from_secs(1),
            shutting_down_to_terminated: Duration::from_secs(1),
            self_stop_after_first_boot: None,
            capacity: None,
            terminated_visible_for: Duration::from_secs(60),
            id_base: 0,
            dns_domain: "ec2.internal".into(),
            api_latency: Duration::ZERO,
            limits: None,
        }
    }
}

/// A fault to inject into the next calls of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    Throttle,
    InsufficientCapacity,
    ApiError(String),
}

impl Fault {
    fn error(&self, op: Operation) -> CloudError {
        match self {
            Self::Throttle => {
                CloudError::Throttled(format!("RequestLimitExceeded: {}", op.as_str()))
            }
            Self::InsufficientCapacity => CloudError::InsufficientCapacity(format!(
                "InsufficientInstanceCapacity: {}",
                op.as_str()
            )),
            Self::ApiError(msg) => CloudError::Other(msg.clone()),
        }
    }
}

/// A call about to take effect, as an observer sees it (invariant checks in tests).
#[derive(Debug)]
pub enum ObservedCall<'a> {
    /// A launch into a pool that already holds `live_in_pool` non-terminated instances
    /// (shutting-down ones included).
    Launch {
        request: &'a LaunchRequest,
        live_in_pool: usize,
    },
    /// Start, stop or terminate of these instances (unknown ids are left out).
    Act {
        operation: Operation,
        targets: Vec<Instance>,
    },
}

/// Called synchronously, before the call takes effect; it must not block.
pub type CallObserver = std::sync::Arc<dyn Fn(ObservedCall<'_>) + Send + Sync>;

/// One call, as the log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    pub operation: Operation,
    /// Instance ids acted on (Start/Stop/Terminate/CreateTags), or launched.
    pub ids: Vec<String>,
    pub at: Instant,
    pub ok: bool,
}

#[derive(Debug, Clone)]
struct FakeInstance {
    instance: Instance,
    spec: LaunchSpec,
    /// When the current transitional state ends.
    transition_at: Option<Instant>,
    boots: u32,
    self_stop_at: Option<Instant>,
    terminated_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    instances: BTreeMap<String, FakeInstance>,
    next_id: u64,
    tokens: HashMap<String, (LaunchRequestKey, Vec<String>)>,
    faults: HashMap<Operation, VecDeque<Fault>>,
    /// Per-instance faults that stay until cleared (EC2's capacity for one instance type
    /// in one zone running out).
    sticky: HashMap<(Operation, String), Fault>,
    calls: Vec<CallRecord>,
    subnets: BTreeMap<String, String>,
    images: Vec<String>,
    security_groups: Vec<String>,
}

/// What must match for a repeated ClientToken to be the same request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LaunchRequestKey {
    spec: LaunchSpec,
    subnet: String,
    count: usize,
}

pub struct FakeCloud {
    config: Mutex<FakeCloudConfig>,
    state: Mutex<State>,
    epoch: (Instant, SystemTime),
    observer: Mutex<Option<CallObserver>>,
    limiter: Option<crate::cloud::ratelimit::RateLimiter>,
}

impl FakeCloud {
    pub fn new(config: FakeCloudConfig) -> Self {
        let state = State {
            next_id: config.id_base,
            ..State::default()
        };
        Self {
            limiter: config
                .limits
                .clone()
                .map(crate::cloud::ratelimit::RateLimiter::new),
            config: Mutex::new(config),
            state: Mutex::new(state),
            epoch: (Instant::now(), SystemTime::now()),
            observer: Mutex::new(None),
        }
    }

    /// Makes `op` fail for instance `id` (alone in its batch) until [`FakeCloud::clear_sticky`].
    pub fn inject_sticky(&self, op: Operation, id: &str, fault: Fault) {
        self.lock().sticky.insert((op, id.to_owned()), fault);
    }

    pub fn clear_sticky(&self) {
        self.lock().sticky.clear();
    }

    /// What a call waits before it is answered: its bucket's token, then the API latency.
    async fn pace(&self, op: Operation, resources: usize) {
        if let Some(limiter) = &self.limiter {
            limiter.acquire(op, resources).await;
        }
        let latency = self.cfg().api_latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }

    /// Installs an observer that sees every launch and instance action before it happens.
    pub fn set_observer(&self, observer: CallObserver) {
        *self.observer.lock().expect("observer lock") = Some(observer);
    }

    fn observe(&self, call: ObservedCall<'_>) {
        let observer = self.observer.lock().expect("observer lock").clone();
        if let Some(observer) = observer {
            observer(call);
        }
    }

    /// Registers a subnet (and its zone) that launches and class checks accept.
    pub fn add_subnet(&self, id: &str, zone: &str) {
        self.lock().subnets.insert(id.into(), zone.into());
    }

    pub fn add_image(&self, id: &str) {
        self.lock().images.push(id.into());
    }

    pub fn add_security_group(&self, id: &str) {
        self.lock().security_groups.push(id.into());
    }

    /// Makes the next `times` calls of `op` fail with `fault`.
    pub fn inject(&self, op: Operation, fault: Fault, times: usize) {
        let mut state = self.lock();
        let queue = state.faults.entry(op).or_default();
        queue.extend(std::iter::repeat_n(fault, times));
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    pub fn set_capacity(&self, capacity: Option<usize>) {
        self.config.lock().expect("config lock").capacity = capacity;
    }

    pub fn set_self_stop(&self, after_first_boot: Option<Duration>) {
        self.config
            .lock()
            .expect("config lock")
            .self_stop_after_first_boot = after_first_boot;
    }

    pub fn calls(&self) -> Vec<CallRecord> {
        self.lock().calls.clone()
    }

    /// Number of calls of `op` made so far, successful or not.
    pub fn call_count(&self, op: Operation) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.operation == op)
            .count()
    }

    /// The launch spec an instance was created from, as a kubelet simulator needs it.
    pub fn launch_spec(&self, id: &str) -> Option<LaunchSpec> {
        let mut state = self.lock();
        self.advance(&mut state);
        state.instances.get(id).map(|i| i.spec.clone())
    }

    pub fn instance(&self, id: &str) -> Option<Instance> {
        let mut state = self.lock();
        self.advance(&mut state);
        state.instances.get(id).map(|i| i.instance.clone())
    }

    /// Every instance, including ones without the cluster tag (for assertions).
    pub fn all_instances(&self) -> Vec<Instance> {
        let mut state = self.lock();
        self.advance(&mut state);
        state
            .instances
            .values()
            .map(|i| i.instance.clone())
            .collect()
    }

    /// Puts an instance into the fake directly (e.g. one Stratos does not own).
    pub fn insert_foreign_instance(
        &self,
        tags: BTreeMap<String, String>,
        state: InstanceState,
    ) -> String {
        let domain = self.config.lock().expect("config lock").dns_domain.clone();
        let mut st = self.lock();
        let id = Self::next_id(&mut st);
        let instance = Instance {
            id: id.clone(),
            state,
            instance_type: "m5.large".into(),
            zone: "us-east-1a".into(),
            subnet_id: "subnet-foreign".into(),
            private_dns_name: Some(dns_name(&id, &domain)),
            private_ip: None,
            launch_time: Some(self.epoch.1),
            tags,
        };
        let spec = LaunchSpec {
            instance_type: "m5.large".into(),
            ami: "ami-foreign".into(),
            subnet_ids: vec![],
            security_group_ids: vec![],
            iam_instance_profile: String::new(),
            user_data: None,
            block_device_mappings: vec![],
            metadata_http_tokens: Default::default(),
            metadata_hop_limit: 2,
            metadata_http_endpoint: Default::default(),
        };
        st.instances.insert(
            id.clone(),
            FakeInstance {
                instance,
                spec,
                transition_at: None,
                boots: 1,
                self_stop_at: None,
                terminated_at: None,
            },
        );
        id
    }

    /// Stops an instance as if its OS powered off (no API call is logged).
    pub fn power_off(&self, id: &str) {
        let mut state = self.lock();
        self.advance(&mut state);
        // The OS stopping the instance is a stop too, for the invariant checks (SPEC §11 I3:
        // no user-data poweroff under a handed-over workload).
        let targets = state
            .instances
            .get(id)
            .map(|i| vec![i.instance.clone()])
            .unwrap_or_default();
        self.observe(ObservedCall::Act {
            operation: Operation::StopInstances,
            targets,
        });
        let stopping = self.cfg().stopping_to_stopped;
        if let Some(inst) = state.instances.get_mut(id)
            && inst.instance.state == InstanceState::Running
        {
            inst.instance.state = InstanceState::Stopping;
            inst.transition_at = Some(Instant::now() + stopping);
            inst.self_stop_at = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake cloud lock poisoned")
    }

    fn cfg(&self) -> FakeCloudConfig {
        self.config.lock().expect("config lock").clone()
    }

    fn next_id(state: &mut State) -> String {
        state.next_id += 1;
        format!("i-{:017x}", state.next_id)
    }

    fn system_time(&self, at: Instant) -> SystemTime {
        self.epoch.1 + at.saturating_duration_since(self.epoch.0)
    }

    /// Applies every transition due by now. Transitions are evaluated lazily on each access,
    /// which keeps the fake free of background tasks and exact under paused time.
    fn advance(&self, state: &mut State) {
        let cfg = self.cfg();
        let now = Instant::now();
        for inst in state.instances.values_mut() {
            // Loop: one access may cover several transitions (running, then self-stop).
            loop {
                let due = inst.transition_at.is_some_and(|t| t <= now)
                    || inst.self_stop_at.is_some_and(|t| t <= now);
                if !due {
                    break;
                }
                if let Some(at) = inst.transition_at.filter(|t| *t <= now) {
                    inst.transition_at = None;
                    match inst.instance.state {
                        InstanceState::Pending => {
                            inst.instance.state = InstanceState::Running;
                            inst.boots += 1;
                            if inst.boots == 1
                                && let Some(after) = cfg.self_stop_after_first_boot
                            {
                                inst.self_stop_at = Some(at + after);
                            }
                        }
                        InstanceState::Stopping => inst.instance.state = InstanceState::Stopped,
                        InstanceState::ShuttingDown => {
                            inst.instance.state = InstanceState::Terminated;
                            inst.terminated_at = Some(at);
                        }
                        _ => {}
                    }
                    continue;
                }
                if let Some(at) = inst.self_stop_at.filter(|t| *t <= now) {
                    inst.self_stop_at = None;
                    if inst.instance.state == InstanceState::Running {
                        inst.instance.state = InstanceState::Stopping;
                        inst.transition_at = Some(at + cfg.stopping_to_stopped);
                    }
                }
            }
        }
        let visible = cfg.terminated_visible_for;
        state.instances.retain(|_, i| {
            i.terminated_at
                .is_none_or(|t| now.saturating_duration_since(t) < visible)
        });
    }

    fn take_fault(state: &mut State, op: Operation) -> Option<CloudError> {
        state
            .faults
            .get_mut(&op)
            .and_then(VecDeque::pop_front)
            .map(|f| f.error(op))
    }

    fn log(state: &mut State, op: Operation, ids: Vec<String>, ok: bool) {
        state.calls.push(CallRecord {
            operation: op,
            ids,
            at: Instant::now(),
            ok,
        });
    }

    fn owned(&self, inst: &FakeInstance, cluster: &str) -> bool {
        inst.instance.tag(tags::CLUSTER) == Some(cluster)
    }

    /// Shared shape of Start/Stop/Terminate: faults, ownership, per-id transitions.
    fn transition_many(
        &self,
        op: Operation,
        ids: &[String],
        apply: impl Fn(&mut FakeInstance, &FakeCloudConfig, Instant) -> Result<(), CloudError>,
    ) -> BatchOutcome {
        let cfg = self.cfg();
        let mut state = self.lock();
        self.advance(&mut state);
        if let Some(error) = Self::take_fault(&mut state, op) {
            Self::log(&mut state, op, ids.to_vec(), false);
            return BatchOutcome::all_failed(ids, &error);
        }
        let targets = ids
            .iter()
            .filter_map(|id| state.instances.get(id))
            .map(|i| i.instance.clone())
            .collect();
        self.observe(ObservedCall::Act {
            operation: op,
            targets,
        });
        let now = Instant::now();
        let mut outcome = BatchOutcome::default();
        for id in ids {
            let sticky = state.sticky.get(&(op, id.clone())).map(|f| f.error(op));
            let result = match state.instances.get_mut(id) {
                None => Err(CloudError::NotFound(format!(
                    "InvalidInstanceID.NotFound: The instance ID '{id}' does not exist"
                ))),
                Some(inst) if !self.owned(inst, &cfg.cluster) => {
                    Err(CloudError::Unauthorized(format!(
                        "UnauthorizedOperation: {id} is not tagged for cluster {}",
                        cfg.cluster
                    )))
                }
                Some(_) if sticky.is_some() => Err(sticky.expect("checked")),
                Some(inst) => apply(inst, &cfg, now),
            };
            match result {
                Ok(()) => outcome.succeeded.push(id.clone()),
                Err(e) => outcome.failed.push((id.clone(), e)),
            }
        }
        let ok = outcome.failed.is_empty();
        Self::log(&mut state, op, ids.to_vec(), ok);
        outcome
    }

    fn launch_in_subnet(
        &self,
        state: &mut State,
        request: &LaunchRequest,
        subnet: &str,
        count: usize,
        token: String,
        cfg: &FakeCloudConfig,
    ) -> Result<Vec<Instance>, CloudError> {
        let key = LaunchRequestKey {
            spec: request.spec.clone(),
            subnet: subnet.to_owned(),
            count,
        };
        if let Some((previous, ids)) = state.tokens.get(&token) {
            if *previous != key {
                return Err(CloudError::Other(format!(
                    "IdempotentParameterMismatch: token {token} was used for a different request"
                )));
            }
            return Ok(ids
                .iter()
                .filter_map(|id| state.instances.get(id))
                .map(|i| i.instance.clone())
                .collect());
        }
        let zone = state.subnets.get(subnet).cloned().ok_or_else(|| {
            CloudError::NotFound(format!(
                "InvalidSubnetID.NotFound: The subnet ID '{subnet}' does not exist"
            ))
        })?;
        let live = state
            .instances
            .values()
            .filter(|i| i.instance.state.is_live())
            .count();
        let room = cfg
            .capacity
            .map_or(count, |cap| cap.saturating_sub(live).min(count));
        if room == 0 {
            return Err(CloudError::InsufficientCapacity(format!(
                "InsufficientInstanceCapacity: no capacity in {zone}"
            )));
        }
        let now = Instant::now();
        let mut launched = Vec::with_capacity(room);
        for _ in 0..room {
            let id = Self::next_id(state);
            let instance = Instance {
                id: id.clone(),
                state: InstanceState::Pending,
                instance_type: request.spec.instance_type.clone(),
                zone: zone.clone(),
                subnet_id: subnet.to_owned(),
                private_dns_name: Some(dns_name(&id, &cfg.dns_domain)),
                private_ip: Some(private_ip(&id)),
                launch_time: Some(self.system_time(now)),
                tags: request.tags.clone(),
            };
            state.instances.insert(
                id.clone(),
                FakeInstance {
                    instance: instance.clone(),
                    spec: request.spec.clone(),
                    transition_at: Some(now + cfg.pending_to_running + cfg.launch_extra),
                    boots: 0,
                    self_stop_at: None,
                    terminated_at: None,
                },
            );
            launched.push(instance);
        }
        state.tokens.insert(
            token,
            (key, launched.iter().map(|i| i.id.clone()).collect()),
        );
        Ok(launched)
    }
}

/// `ip-10-0-x-y.ec2.internal`, derived from the id so it is stable and unique.
fn dns_name(id: &str, domain: &str) -> String {
    format!("ip-{}.{domain}", private_ip(id).replace('.', "-"))
}

fn private_ip(id: &str) -> String {
    let n = u64::from_str_radix(id.trim_start_matches("i-"), 16).unwrap_or(0);
    format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
}

#[async_trait]
impl CloudProvider for FakeCloud {
    async fn launch(&self, request: &LaunchRequest) -> LaunchOutcome {
        self.pace(Operation::RunInstances, request.count).await;
        let cfg = self.cfg();
        let mut state = self.lock();
        self.advance(&mut state);
        let mut outcome = LaunchOutcome::default();
        if let Some(error) = Self::take_fault(&mut state, Operation::RunInstances) {
            Self::log(&mut state, Operation::RunInstances, vec![], false);
            outcome.errors.push(error);
            return outcome;
        }
        // A replayed ClientToken creates nothing, so only new launches are observed.
        let token_prefix = format!("{}-", request.client_token);
        let replay = state.tokens.keys().any(|t| t.starts_with(&token_prefix));
        if !replay {
            let pool = request.tags.get(tags::POOL);
            let live_in_pool = state
                .instances
                .values()
                .filter(|i| {
                    // I1 counts an instance until it is terminated, shutting-down included.
                    i.instance.state != InstanceState::Terminated
                        && i.instance.tags.get(tags::POOL) == pool
                })
                .count();
            self.observe(ObservedCall::Launch {
                request,
                live_in_pool,
            });
        }
        let split = spread_across_subnets(
            &request.spec.subnet_ids,
            &request.existing_per_subnet,
            request.count,
        );
        for (subnet, count) in split {
            let idx = request
                .spec
                .subnet_ids
                .iter()
                .position(|s| *s == subnet)
                .unwrap_or(0);
            let token = format!("{}-{idx}", request.client_token);
            match self.launch_in_subnet(&mut state, request, &subnet, count, token, &cfg) {
                Ok(instances) => {
                    if instances.len() < count {
                        outcome
                            .errors
                            .push(CloudError::InsufficientCapacity(format!(
                                "{subnet}: launched {} of {count}",
                                instances.len()
                            )));
                    }
                    outcome.instances.extend(instances);
                }
                Err(e) => outcome.errors.push(e),
            }
        }
        // Name tags, as the EC2 implementation sets them after launch.
        if let Some(pool) = request.tags.get(tags::POOL) {
            for inst in &outcome.instances {
                let short = &inst.id[inst.id.len().saturating_sub(8)..];
                if let Some(fake) = state.instances.get_mut(&inst.id) {
                    fake.instance
                        .tags
                        .insert(tags::NAME.into(), format!("{pool}-{short}"));
                }
            }
        }
        let ids = outcome.instances.iter().map(|i| i.id.clone()).collect();
        let ok = outcome.errors.is_empty();
        Self::log(&mut state, Operation::RunInstances, ids, ok);
        outcome
    }

    async fn start_instances(&self, ids: &[String]) -> BatchOutcome {
        self.pace(Operation::StartInstances, ids.len()).await;
        self.transition_many(Operation::StartInstances, ids, |inst, cfg, now| {
            match inst.instance.state {
                InstanceState::Stopped => {
                    inst.instance.state = InstanceState::Pending;
                    inst.transition_at = Some(now + cfg.pending_to_running);
                    Ok(())
                }
                InstanceState::Pending | InstanceState::Running => Ok(()),
                other => Err(CloudError::InvalidState(format!(
                    "IncorrectInstanceState: The instance '{}' is not in a state from which it can be started ({other})",
                    inst.instance.id
                ))),
            }
        })
    }

    async fn stop_instances(&self, ids: &[String]) -> BatchOutcome {
        self.pace(Operation::StopInstances, ids.len()).await;
        self.transition_many(Operation::StopInstances, ids, |inst, cfg, now| {
            match inst.instance.state {
                InstanceState::Running => {
                    inst.instance.state = InstanceState::Stopping;
                    inst.transition_at = Some(now + cfg.stopping_to_stopped);
                    inst.self_stop_at = None;
                    Ok(())
                }
                InstanceState::Stopping | InstanceState::Stopped => Ok(()),
                other => Err(CloudError::InvalidState(format!(
                    "IncorrectInstanceState: The instance '{}' is not in a state from which it can be stopped ({other})",
                    inst.instance.id
                ))),
            }
        })
    }

    async fn terminate_instances(&self, ids: &[String]) -> BatchOutcome {
        self.pace(Operation::TerminateInstances, ids.len()).await;
        self.transition_many(Operation::TerminateInstances, ids, |inst, cfg, now| {
            if inst.instance.state.is_live() {
                inst.instance.state = InstanceState::ShuttingDown;
                inst.transition_at = Some(now + cfg.shutting_down_to_terminated);
                inst.self_stop_at = None;
            }
            Ok(())
        })
    }

    async fn list_instances(&self) -> Result<Vec<Instance>, CloudError> {
        self.pace(Operation::DescribeInstances, 0).await;
        let cluster = self.cfg().cluster;
        let mut state = self.lock();
        self.advance(&mut state);
        if let Some(error) = Self::take_fault(&mut state, Operation::DescribeInstances) {
            Self::log(&mut state, Operation::DescribeInstances, vec![], false);
            return Err(error);
        }
        Self::log(&mut state, Operation::DescribeInstances, vec![], true);
        Ok(state
            .instances
            .values()
            .filter(|i| self.owned(i, &cluster))
            .map(|i| i.instance.clone())
            .collect())
    }

    async fn set_tags(
        &self,
        ids: &[String],
        new_tags: &BTreeMap<String, String>,
    ) -> Result<(), CloudError> {
        self.pace(Operation::CreateTags, ids.len()).await;
        let cluster = self.cfg().cluster;
        let mut state = self.lock();
        self.advance(&mut state);
        if let Some(error) = Self::take_fault(&mut state, Operation::CreateTags) {
            Self::log(&mut state, Operation::CreateTags, ids.to_vec(), false);
            return Err(error);
        }
        for id in ids {
            match state.instances.get(id) {
                None => {
                    Self::log(&mut state, Operation::CreateTags, ids.to_vec(), false);
                    return Err(CloudError::NotFound(format!(
                        "InvalidInstanceID.NotFound: The instance ID '{id}' does not exist"
                    )));
                }
                Some(inst)
                    if !self.owned(inst, &cluster)
                        && new_tags.keys().any(|k| k != tags::CLUSTER) =>
                {
                    Self::log(&mut state, Operation::CreateTags, ids.to_vec(), false);
                    return Err(CloudError::Unauthorized(format!(
                        "UnauthorizedOperation: {id} is not tagged for cluster {cluster}"
                    )));
                }
                Some(_) => {}
            }
        }
        for id in ids {
            if let Some(inst) = state.instances.get_mut(id) {
                inst.instance
                    .tags
                    .extend(new_tags.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        Self::log(&mut state, Operation::CreateTags, ids.to_vec(), true);
        Ok(())
    }

    async fn check_node_class(&self, refs: &NodeClassRefs) -> Result<NodeClassCheck, CloudError> {
        let mut state = self.lock();
        if let Some(error) = Self::take_fault(&mut state, Operation::DescribeSubnets) {
            Self::log(&mut state, Operation::DescribeSubnets, vec![], false);
            return Err(error);
        }
        Self::log(&mut state, Operation::DescribeSubnets, vec![], true);
        let mut check = NodeClassCheck::default();
        if !state.images.contains(&refs.ami) {
            check.problems.push(format!("AMI {} not found", refs.ami));
        }
        for id in &refs.subnet_ids {
            match state.subnets.get(id) {
                Some(zone) => check.subnets.push(ResolvedSubnet {
                    id: id.clone(),
                    zone: zone.clone(),
                    zone_id: None,
                }),
                None => check.problems.push(format!("subnet {id} not found")),
            }
        }
        for id in &refs.security_group_ids {
            if !state.security_groups.contains(id) {
                check
                    .problems
                    .push(format!("security group {id} not found"));
            }
        }
        Ok(check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::awsnodeclass::{HttpEndpoint, HttpTokens};

    fn spec(subnets: &[&str]) -> LaunchSpec {
        LaunchSpec {
            instance_type: "m5.large".into(),
            ami: "ami-0123".into(),
            subnet_ids: subnets.iter().map(|s| s.to_string()).collect(),
            security_group_ids: vec!["sg-1".into()],
            iam_instance_profile: "node".into(),
            user_data: None,
            block_device_mappings: vec![],
            metadata_http_tokens: HttpTokens::Required,
            metadata_hop_limit: 2,
            metadata_http_endpoint: HttpEndpoint::Enabled,
        }
    }

    fn cloud(config: FakeCloudConfig) -> FakeCloud {
        let cloud = FakeCloud::new(config);
        cloud.add_subnet("subnet-a", "us-east-1a");
        cloud.add_subnet("subnet-b", "us-east-1b");
        cloud
    }

    fn request(count: usize, token: &str) -> LaunchRequest {
        LaunchRequest {
            spec: spec(&["subnet-a", "subnet-b"]),
            count,
            tags: BTreeMap::from([
                (tags::CLUSTER.to_owned(), "test".to_owned()),
                (tags::POOL.to_owned(), "workers".to_owned()),
            ]),
            client_token: token.into(),
            existing_per_subnet: BTreeMap::new(),
        }
    }

    fn ids(instances: &[Instance]) -> Vec<String> {
        instances.iter().map(|i| i.id.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn instances_walk_through_their_states_with_the_configured_latencies() {
        let cloud = cloud(FakeCloudConfig {
            pending_to_running: Duration::from_secs(15),
            stopping_to_stopped: Duration::from_secs(5),
            shutting_down_to_terminated: Duration::from_secs(3),
            ..Default::default()
        });
        let launched = cloud.launch(&request(1, "t1")).await;
        assert!(launched.errors.is_empty());
        let id = launched.instances[0].id.clone();
        assert_eq!(launched.instances[0].state, InstanceState::Pending);
        assert_eq!(
            launched.instances[0].tag(tags::NAME),
            None,
            "returned before naming"
        );
        assert!(
            cloud
                .instance(&id)
                .unwrap()
                .tag(tags::NAME)
                .unwrap()
                .starts_with("workers-")
        );

        tokio::time::advance(Duration::from_secs(14)).await;
        assert_eq!(cloud.instance(&id).unwrap().state, InstanceState::Pending);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(cloud.instance(&id).unwrap().state, InstanceState::Running);

        let stop = cloud.stop_instances(std::slice::from_ref(&id)).await;
        assert_eq!(stop.succeeded, vec![id.clone()]);
        assert_eq!(cloud.instance(&id).unwrap().state, InstanceState::Stopping);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(cloud.instance(&id).unwrap().state, InstanceState::Stopped);

        cloud.start_instances(std::slice::from_ref(&id)).await;
        assert_eq!(cloud.instance(&id).unwrap().state, InstanceState::Pending);
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(cloud.instance(&id).unwrap().state, InstanceState::Running);

        cloud.terminate_instances(std::slice::from_ref(&id)).await;
        assert_eq!(
            cloud.instance(&id).unwrap().state,
            InstanceState::ShuttingDown
        );
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            cloud.instance(&id).unwrap().state,
            InstanceState::Terminated
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(
            cloud.instance(&id).is_none(),
            "terminated instances disappear eventually"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn self_stop_happens_once_after_first_boot() {
        let cloud = cloud(FakeCloudConfig {
            pending_to_running: Duration::from_secs(10),
            stopping_to_stopped: Duration::from_secs(2),
            self_stop_after_first_boot: Some(Duration::from_secs(30)),
            ..Default::default()
        });
        let id = cloud.launch(&request(1, "t")).await.instances[0].id.clone();
        tokio::time::advance(Duration::from_secs(39)).await;
        assert_eq!(cloud.instance(&id).unwrap().state, InstanceState::Running);
        // A single late look still applies running → stopping → stopped in order.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(cloud.instance(&id).unwrap().state, InstanceState::Stopped);
        assert_eq!(
            cloud.call_count(Operation::StopInstances),
            0,
            "no API call: the OS powered off"
        );

        cloud.start_instances(std::slice::from_ref(&id)).await;
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_eq!(
            cloud.instance(&id).unwrap().state,
            InstanceState::Running,
            "second boot stays up"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_client_token_returns_the_same_instances() {
        let cloud = cloud(FakeCloudConfig::default());
        let first = cloud.launch(&request(3, "slot-7")).await;
        let again = cloud.launch(&request(3, "slot-7")).await;
        assert_eq!(ids(&first.instances), ids(&again.instances));
        assert_eq!(cloud.all_instances().len(), 3);
        let zones: Vec<&str> = first.instances.iter().map(|i| i.zone.as_str()).collect();
        assert_eq!(
            zones,
            vec!["us-east-1a", "us-east-1a", "us-east-1b"],
            "spread across zones"
        );

        let mut different = request(2, "slot-7");
        different.spec.instance_type = "m5.xlarge".into();
        let mismatch = cloud.launch(&different).await;
        assert!(mismatch.instances.is_empty());
        assert!(
            matches!(mismatch.errors[0], CloudError::Other(ref m) if m.contains("IdempotentParameterMismatch"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_limits_launches_to_what_fits() {
        let cloud = cloud(FakeCloudConfig {
            capacity: Some(2),
            ..Default::default()
        });
        let out = cloud.launch(&request(3, "t")).await;
        assert_eq!(out.instances.len(), 2);
        assert!(
            out.errors
                .iter()
                .all(|e| matches!(e, CloudError::InsufficientCapacity(_)))
        );
        assert!(!out.errors.is_empty());
        let none = cloud.launch(&request(1, "t2")).await;
        assert!(none.instances.is_empty());
        assert!(matches!(
            none.errors[..],
            [CloudError::InsufficientCapacity(_)]
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn injected_faults_fail_the_next_calls_and_are_logged() {
        let cloud = cloud(FakeCloudConfig::default());
        let id = cloud.launch(&request(1, "t")).await.instances[0].id.clone();
        tokio::time::advance(Duration::from_secs(2)).await;
        cloud.inject(Operation::StopInstances, Fault::Throttle, 2);
        for _ in 0..2 {
            let out = cloud.stop_instances(std::slice::from_ref(&id)).await;
            assert!(matches!(out.failed[..], [(_, CloudError::Throttled(_))]));
        }
        let out = cloud.stop_instances(std::slice::from_ref(&id)).await;
        assert_eq!(out.succeeded, vec![id.clone()]);
        assert_eq!(cloud.call_count(Operation::StopInstances), 3);
        assert_eq!(cloud.calls().iter().filter(|c| !c.ok).count(), 2);

        cloud.inject(Operation::RunInstances, Fault::InsufficientCapacity, 1);
        let out = cloud.launch(&request(1, "t9")).await;
        assert!(matches!(
            out.errors[..],
            [CloudError::InsufficientCapacity(_)]
        ));
        cloud.inject(
            Operation::DescribeInstances,
            Fault::ApiError("boom".into()),
            1,
        );
        assert_eq!(
            cloud.list_instances().await,
            Err(CloudError::Other("boom".into()))
        );
        assert_eq!(cloud.list_instances().await.unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn batches_report_each_id_and_refuse_foreign_instances() {
        let cloud = cloud(FakeCloudConfig::default());
        let mine = ids(&cloud.launch(&request(2, "t")).await.instances);
        let foreign = cloud.insert_foreign_instance(
            BTreeMap::from([(tags::CLUSTER.to_owned(), "other".to_owned())]),
            InstanceState::Running,
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let mut batch = mine.clone();
        batch.push(foreign.clone());
        batch.push("i-doesnotexist".into());
        let out = cloud.stop_instances(&batch).await;
        assert_eq!(out.succeeded, mine);
        assert!(matches!(out.failed[0], (ref id, CloudError::Unauthorized(_)) if *id == foreign));
        assert!(
            matches!(out.failed[1], (ref id, CloudError::NotFound(_)) if id == "i-doesnotexist")
        );
        assert_eq!(
            cloud.instance(&foreign).unwrap().state,
            InstanceState::Running,
            "foreign untouched"
        );
        let listed = ids(&cloud.list_instances().await.unwrap());
        assert_eq!(listed, mine, "listings hold only this cluster's instances");

        // A starting instance cannot be stopped; a stopped one restarts; both idempotent.
        tokio::time::advance(Duration::from_secs(2)).await;
        let out = cloud.start_instances(&mine).await;
        assert_eq!(out.succeeded, mine);
        let out = cloud.stop_instances(&mine).await;
        assert!(
            out.failed
                .iter()
                .all(|(_, e)| matches!(e, CloudError::InvalidState(_)))
        );
        let out = cloud.start_instances(&mine).await;
        assert_eq!(
            out.succeeded, mine,
            "starting a pending instance is a no-op"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn node_class_check_names_what_is_missing() {
        let cloud = cloud(FakeCloudConfig::default());
        cloud.add_image("ami-0123");
        cloud.add_security_group("sg-1");
        let ok = cloud
            .check_node_class(&NodeClassRefs {
                ami: "ami-0123".into(),
                subnet_ids: vec!["subnet-b".into()],
                security_group_ids: vec!["sg-1".into()],
            })
            .await
            .unwrap();
        assert!(ok.is_ready());
        assert_eq!(ok.subnets[0].zone, "us-east-1b");
        let bad = cloud
            .check_node_class(&NodeClassRefs {
                ami: "ami-9".into(),
                subnet_ids: vec!["subnet-a".into(), "subnet-x".into()],
                security_group_ids: vec!["sg-2".into()],
            })
            .await
            .unwrap();
        assert_eq!(
            bad.problems,
            vec![
                "AMI ami-9 not found",
                "subnet subnet-x not found",
                "security group sg-2 not found"
            ]
        );
    }
}
