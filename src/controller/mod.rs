//! The imperative shell (SPEC §2): watches gather snapshots, `pool::plan` decides, and the
//! controllers here execute the decisions idempotently and record status, events and
//! metrics. Nothing here decides what a pool needs.

pub mod drain;
pub mod gc;
pub mod instances;
pub mod nodeclass;
pub mod nodepool;
pub mod podcache;
pub mod reflect;
pub mod retry;
pub mod scaleup;
mod trim;

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::FutureExt;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod},
};
use kube::{
    Client, Resource,
    runtime::{
        events::{Recorder, Reporter},
        reflector::Store,
        watcher,
    },
};
use tokio::sync::Notify;

use crate::{api::AWSNodeClass, cloud::CloudProvider, metrics::PoolMetrics};

pub use instances::InstanceCache;
pub use podcache::CachedPod;
use reflect::Wake;

/// Settings of a running operator.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Value of the `stratos.sh/cluster` tag on every instance Stratos owns.
    pub cluster: String,
    /// Namespace of the image pre-pull pods.
    pub prepull_namespace: String,
    /// Image of the pre-pull pods' helper (Stratos' own image, carrying its static binary).
    pub prepull_image: String,
    /// Periodic resync of every pool.
    pub resync: Duration,
    /// How long one instance listing is shared.
    pub listing_ttl: Duration,
    /// How often orphaned instances and nodes are collected.
    pub gc_interval: Duration,
    /// A node whose instance is missing from a listing is deleted only when it is older than
    /// this: it may have registered from an instance launched after the listing.
    pub node_gc_grace: Duration,
    /// A label selector on NodePools and AWSNodeClasses: this operator manages only those
    /// that match, and only the Nodes of its own pools. Lets several operators (shards, a
    /// canary, or isolated end-to-end tests) share one cluster. `None`: every pool.
    pub pool_selector: Option<String>,
}

impl OperatorConfig {
    /// The watch of the kinds [`OperatorConfig::pool_selector`] scopes.
    pub fn scoped_watch(&self) -> watcher::Config {
        match &self.pool_selector {
            Some(selector) => watcher::Config::default().labels(selector),
            None => watcher::Config::default(),
        }
    }

    /// Whether a node labelled with `pool` (`stratos.sh/pool`) is this operator's to manage,
    /// given the pools it manages. Without a selector every pool-labelled node is; with one,
    /// only the nodes of its own pools (another operator may own the rest).
    pub fn manages_node_of(&self, pool: &str, own_pools: &[String]) -> bool {
        self.pool_selector.is_none() || own_pools.iter().any(|p| p == pool)
    }

    pub fn new(cluster: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            prepull_namespace: "default".into(),
            prepull_image: format!("ghcr.io/stratos-sh/stratos:{}", crate::config::VERSION),
            resync: Duration::from_secs(15),
            listing_ttl: Duration::from_secs(2),
            gc_interval: Duration::from_secs(30),
            node_gc_grace: Duration::from_secs(120),
            pool_selector: None,
        }
    }
}

/// Caches every controller reads from.
#[derive(Clone)]
pub struct Stores {
    pub nodes: Store<Node>,
    pub pods: Store<CachedPod>,
    pub daemonsets: Store<DaemonSet>,
    pub classes: Store<AWSNodeClass>,
    /// Claims and volumes: a pending pod's bound zonal volume pins it to a zone (SPEC §6).
    pub claims: Store<PersistentVolumeClaim>,
    pub volumes: Store<PersistentVolume>,
    /// Whether the caches a pool's decision reads (nodes, pods, DaemonSets, pools) are
    /// current: destructive actions wait for it (SPEC §11, I1/I5).
    pub freshness: reflect::Freshness,
}

/// What `reconcile` gets (the controller-rs shape).
pub struct Context {
    pub client: Client,
    /// For evictions: kube's default client retries 429 for minutes, which would hide a
    /// PDB-blocked eviction.
    pub eviction_client: Client,
    pub cloud: Arc<dyn CloudProvider>,
    pub instances: InstanceCache,
    pub config: OperatorConfig,
    pub stores: Stores,
    pub recorder: Recorder,
    pub metrics: Arc<PoolMetrics>,
    /// Consecutive failures per object, for backoff in `error_policy`.
    failures: retry::Failures,
    /// What the last scale-up decision wants of each pool (SPEC §6): the pools' reconciles
    /// launch and hand over accordingly.
    pub demand: Mutex<HashMap<String, PoolDemand>>,
    /// Woken on any pod change: the scale-up loop waits on it.
    pub pods_changed: Arc<Notify>,
    /// Wakes the pool reconciles.
    pub pools_changed: Arc<Notify>,
    /// When each Warning (object, reason, note) was last published.
    warnings: Mutex<HashMap<String, std::time::Instant>>,
    /// Nodes the scale-up loop marked `starting` (by instance id), and when: the node cache
    /// shows a label write a moment after the write succeeds, while the instance listing
    /// shows the start at once (written through). Without this a pool reconcile in between
    /// reads "standby intent, instance running" and stops the node it was just given.
    marked_starting: Mutex<HashMap<String, std::time::SystemTime>>,
}

/// A Warning identical to one published this recently is not published again: a retry
/// loop every few seconds would otherwise write an event (or a series update) per round.
/// kube's recorder folds repeats into a series; this bounds the writes as well.
const WARNING_REPEAT: Duration = Duration::from_secs(600);

/// One pool's share of the scale-up decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolDemand {
    /// Instances to launch for pending pods.
    pub launch: usize,
    /// Warming nodes to hand to pending pods.
    pub handoff: usize,
    /// Some pending pod matches the pool: its empty nodes stay.
    pub wanted: bool,
}

impl Context {
    /// How long an object that failed with `error` waits before its next reconcile (see
    /// [`retry`]: conflicts and blocked actions are not counted as failures).
    pub fn retry_delay(&self, key: &str, error: &Error) -> Duration {
        self.failures.failed(key, retry::classify(error))
    }

    /// Records that the node of `instance` was just labelled `starting`.
    pub fn marked_starting(&self, instance: &str) {
        let now = std::time::SystemTime::now();
        let mut m = self.marked_starting.lock().expect("marked lock");
        m.retain(|_, at| {
            now.duration_since(*at)
                .is_ok_and(|a| a < crate::pool::plan::START_IN_FLIGHT)
        });
        m.insert(instance.to_owned(), now);
    }

    /// The start of `instance` failed and its node went back to standby.
    pub fn unmarked_starting(&self, instance: &str) {
        self.marked_starting
            .lock()
            .expect("marked lock")
            .remove(instance);
    }

    /// When the node of `instance` was labelled `starting`, if that was moments ago.
    pub fn recently_marked_starting(&self, instance: &str) -> Option<std::time::SystemTime> {
        let at = *self
            .marked_starting
            .lock()
            .expect("marked lock")
            .get(instance)?;
        std::time::SystemTime::now()
            .duration_since(at)
            .is_ok_and(|a| a < crate::pool::plan::START_IN_FLIGHT)
            .then_some(at)
    }

    /// The pool's share of the last scale-up decision.
    pub fn demand_of(&self, pool: &str) -> PoolDemand {
        self.demand
            .lock()
            .expect("demand lock")
            .get(pool)
            .cloned()
            .unwrap_or_default()
    }

    /// The pool launched what the decision asked: not again for the same decision.
    pub fn demand_launched(&self, pool: &str) {
        if let Some(d) = self.demand.lock().expect("demand lock").get_mut(pool) {
            d.launch = 0;
        }
    }

    pub fn reset_backoff(&self, key: &str) {
        self.failures.succeeded(key);
    }

    /// A Warning event on `obj`, with `log` run only when the event is actually published:
    /// one log line per cause, not one per retry.
    pub async fn publish_once<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        reason: &str,
        note: &str,
        log: impl FnOnce(),
    ) {
        if self.publish(obj, true, reason, note.to_owned()).await {
            log();
        }
    }

    /// Publishes an event; returns whether it was published (an identical recent Warning is
    /// not).
    pub async fn publish<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) -> bool {
        use kube::runtime::events::{Event, EventType};
        let note: String = note.chars().take(1000).collect();
        if warning {
            let reference = obj.object_ref(&());
            let key = format!(
                "{}/{}/{}|{reason}|{note}",
                reference.kind.as_deref().unwrap_or_default(),
                reference.namespace.as_deref().unwrap_or_default(),
                reference.name.as_deref().unwrap_or_default()
            );
            let now = std::time::Instant::now();
            let mut seen = self.warnings.lock().expect("warnings lock");
            seen.retain(|_, at| now.duration_since(*at) < WARNING_REPEAT);
            if seen.contains_key(&key) {
                return false;
            }
            seen.insert(key, now);
        }
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::debug!(error = %e, reason, "could not publish an event");
        }
        true
    }
}

/// Controller errors; the label names them in metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cloud: {0}")]
    Cloud(#[from] crate::cloud::CloudError),
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// Not a failure: deletion waits for instances to go or pods to be evicted.
    #[error("waiting: {0}")]
    Waiting(String),
    /// An action the cluster refuses for now (an eviction forbidden or blocked by a
    /// disruption budget): not a failure of the pool, but something a user must see.
    #[error("{reason}: {message}")]
    Blocked {
        /// The event and condition reason, e.g. `EvictionBlockedByPDB`.
        reason: &'static str,
        message: String,
    },
}

impl Error {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Cloud(e) => e.label(),
            Self::Finalizer(_) => "finalizer",
            Self::Waiting(_) => "waiting",
            Self::Blocked { .. } => "blocked",
        }
    }
}

/// managedFields are large and never read.
fn drop_managed_fields<K: Resource>(mut o: K) -> K {
    o.meta_mut().managed_fields = None;
    o
}

fn trimmed_node(mut node: Node) -> Node {
    trim::node(&mut node);
    node
}

/// The watched caches, with the notifiers their changes wake. Every replica fills them from
/// its start, leader or not, so a standby that takes over acts on warm caches instead of
/// re-listing every pod and node of the cluster first (SPEC §8, §12).
pub struct Caches {
    stores: Stores,
    pool_store: Store<crate::api::NodePool>,
    /// Node, pod, DaemonSet and class changes: wake the pool reconciles.
    notify: Arc<Notify>,
    /// Pod, node, claim, volume and pool changes: wake the scale-up loop.
    pods_changed: Arc<Notify>,
    /// Pool changes: wake the class controller.
    pools_changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Caches {
    /// Starts every watch in the background.
    pub fn start(client: &Client, config: &OperatorConfig) -> Caches {
        let notify = Arc::new(Notify::new());
        let pods_changed = Arc::new(Notify::new());
        let pools_changed = Arc::new(Notify::new());
        let all = watcher::Config::default;
        let (nodes, nodes_health, nodes_task) = reflect::cache(
            "nodes",
            client,
            all(),
            vec![Wake::always(&notify), Wake::always(&pods_changed)],
            trimmed_node,
        );
        let (pods, pods_health, pods_task) = reflect::cache::<Pod, _>(
            "pods",
            client,
            all(),
            // A pending pod concerns the scale-up decision (which wakes the pools it changes
            // the demand of); a pod on a node concerns that node's pool.
            vec![
                Wake::when(&notify, |p: &CachedPod| p.node_name.is_some()),
                Wake::always(&pods_changed),
            ],
            CachedPod::from,
        );
        let (daemonsets, ds_health, ds_task) = reflect::cache::<DaemonSet, _>(
            "daemonsets",
            client,
            all(),
            vec![Wake::always(&notify)],
            drop_managed_fields,
        );
        let (claims, _, claims_task) = reflect::cache::<PersistentVolumeClaim, _>(
            "persistentvolumeclaims",
            client,
            all(),
            vec![Wake::always(&pods_changed)],
            drop_managed_fields,
        );
        let (volumes, _, volumes_task) = reflect::cache::<PersistentVolume, _>(
            "persistentvolumes",
            client,
            all(),
            vec![Wake::always(&pods_changed)],
            drop_managed_fields,
        );
        let (classes, _, classes_task) = reflect::cache::<AWSNodeClass, _>(
            "awsnodeclasses",
            client,
            config.scoped_watch(),
            vec![Wake::always(&notify)],
            drop_managed_fields,
        );
        // Our own NodePool cache for GC, scale-up and the class controller.
        let (pool_store, pools_health, pools_task) = reflect::cache::<crate::api::NodePool, _>(
            "nodepools",
            client,
            config.scoped_watch(),
            vec![Wake::always(&pools_changed), Wake::always(&pods_changed)],
            drop_managed_fields,
        );
        // GC terminates the instances of pools missing from the pool cache: it is part of
        // the view destructive actions need current.
        let freshness =
            reflect::Freshness::new(vec![nodes_health, pods_health, ds_health, pools_health]);
        let task = tokio::spawn(async move {
            tokio::join!(
                nodes_task,
                pods_task,
                ds_task,
                classes_task,
                pools_task,
                claims_task,
                volumes_task
            );
        });
        Caches {
            stores: Stores {
                nodes,
                pods,
                daemonsets,
                classes,
                claims,
                volumes,
                freshness,
            },
            pool_store,
            notify,
            pods_changed,
            pools_changed,
            task,
        }
    }

    /// Resolves once every cache has listed completely.
    pub async fn wait_until_ready(&self) {
        let s = &self.stores;
        let _ = tokio::join!(
            s.nodes.wait_until_ready(),
            s.pods.wait_until_ready(),
            s.daemonsets.wait_until_ready(),
            s.classes.wait_until_ready(),
            self.pool_store.wait_until_ready(),
            s.claims.wait_until_ready(),
            s.volumes.wait_until_ready()
        );
    }
}

impl Drop for Caches {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs every controller until `shutdown` resolves, then waits for in-flight reconciles,
/// with caches of its own.
pub async fn run(
    client: Client,
    eviction_client: Client,
    cloud: Arc<dyn CloudProvider>,
    config: OperatorConfig,
    metrics: Arc<PoolMetrics>,
    health: Arc<crate::http::Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let caches = Caches::start(&client, &config);
    run_with(
        caches,
        client,
        eviction_client,
        cloud,
        config,
        metrics,
        health,
        shutdown,
    )
    .await
}

/// Runs every controller on `caches` (started earlier, e.g. while waiting for the lease)
/// until `shutdown` resolves, then waits for in-flight reconciles. Only the leader calls
/// this.
#[allow(clippy::too_many_arguments)]
pub async fn run_with(
    caches: Caches,
    client: Client,
    eviction_client: Client,
    cloud: Arc<dyn CloudProvider>,
    config: OperatorConfig,
    metrics: Arc<PoolMetrics>,
    health: Arc<crate::http::Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let synced = std::time::Instant::now();
    caches.wait_until_ready().await;
    health.set(crate::http::Phase::Leading);
    tracing::info!(
        waited_ms = synced.elapsed().as_millis() as u64,
        "caches synced; reconciling"
    );
    let Caches {
        ref stores,
        ref pool_store,
        ref notify,
        ref pods_changed,
        ref pools_changed,
        ..
    } = caches;
    let (notify, pods_changed, pools_changed, pool_store) = (
        notify.clone(),
        pods_changed.clone(),
        pools_changed.clone(),
        pool_store.clone(),
    );

    let reporter = Reporter {
        controller: "stratos".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        instances: InstanceCache::new(cloud.clone(), config.listing_ttl),
        client: client.clone(),
        eviction_client,
        cloud,
        config,
        stores: stores.clone(),
        metrics,
        failures: retry::Failures::default(),
        warnings: Mutex::new(HashMap::new()),
        marked_starting: Mutex::new(HashMap::new()),
        demand: Mutex::new(HashMap::new()),
        pods_changed,
        pools_changed: notify.clone(),
    });
    // One oneshot per consumer: kube's graceful shutdown wants a `Send + Sync` future.
    let mut stops = Vec::new();
    let mut stop_signal = || {
        let (tx, rx) = futures::channel::oneshot::channel::<()>();
        stops.push(tx);
        rx.map(|_| ())
    };
    let pools = nodepool::controller(ctx.clone(), notify.clone(), stop_signal());
    let classes = nodeclass::controller(
        ctx.clone(),
        pool_store.clone(),
        pools_changed,
        stop_signal(),
    );
    let gc = tokio::spawn(gc::run(ctx.clone(), pool_store.clone(), stop_signal()));
    let scale_up = tokio::spawn(scaleup::run(ctx.clone(), pool_store, stop_signal()));
    let stopper = tokio::spawn(async move {
        shutdown.await;
        for tx in stops {
            let _ = tx.send(());
        }
    });
    tokio::join!(pools.run, classes);
    let _ = gc.await;
    let _ = scale_up.await;
    stopper.abort();
    drop(caches);
}
