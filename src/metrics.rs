//! Prometheus metrics (SPEC §8.1). One registry per process; families are created here and
//! handed to the components that record them.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::cloud::ratelimit::Operation;

/// Every cloud API call: a count by result and a latency, plus time spent waiting for the
/// client-side rate limiter.
pub struct CloudApiMetrics {
    calls: IntCounterVec,
    latency: HistogramVec,
    rate_limit_wait: HistogramVec,
}

impl CloudApiMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let calls = IntCounterVec::new(
            Opts::new(
                "stratos_cloud_api_calls_total",
                "Cloud API calls by operation and result.",
            ),
            &["operation", "result"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "stratos_cloud_api_call_duration_seconds",
                "Latency of one cloud API call attempt.",
            )
            .buckets(vec![0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["operation"],
        )?;
        let rate_limit_wait = HistogramVec::new(
            HistogramOpts::new(
                "stratos_cloud_api_rate_limit_wait_seconds",
                "Time a cloud API call waited for the client-side rate limiter.",
            )
            .buckets(vec![0.0, 0.1, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0]),
            &["operation"],
        )?;
        registry.register(Box::new(calls.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(rate_limit_wait.clone()))?;
        Ok(Self {
            calls,
            latency,
            rate_limit_wait,
        })
    }

    /// Metrics that nobody scrapes, for tests and tools.
    /// A detached set, for tests and embedding.
    pub fn detached() -> Self {
        Self::new(&Registry::new()).expect("a fresh registry accepts every family")
    }

    pub fn observe_call(&self, op: Operation, result: &str, elapsed: Duration) {
        self.calls.with_label_values(&[op.as_str(), result]).inc();
        self.latency
            .with_label_values(&[op.as_str()])
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_rate_limit_wait(&self, op: Operation, waited: Duration) {
        self.rate_limit_wait
            .with_label_values(&[op.as_str()])
            .observe(waited.as_secs_f64());
    }

    /// Calls of `op` with `result` so far.
    pub fn calls(&self, op: Operation, result: &str) -> u64 {
        self.calls.with_label_values(&[op.as_str(), result]).get()
    }
}

/// Every `reason` of `stratos_blocked_actions_total`: actions the cluster or the cloud
/// refused, which a user must act on (SPEC §8.2).
pub const BLOCKED_REASONS: [&str; 5] = [
    "EvictionForbidden",
    "EvictionBlockedByPDB",
    "EvictionRejected",
    "DrainTimeout",
    "TerminateFailed",
];

/// Every `result` of `stratos_warmup_results_total`.
pub const WARMUP_RESULTS: [&str; 4] = [
    "completed",
    "resumed",
    "timeout",
    "stopped_before_registering",
];

/// Pool gauges and lifecycle counters (SPEC §8.1). Per-pool series are removed with the pool.
pub struct PoolMetrics {
    registry: Registry,
    decision_latency: HistogramVec,
    pending_to_scheduled: HistogramVec,
    start_to_ready: HistogramVec,
    drain_duration: HistogramVec,
    drain_failures: IntCounterVec,
    blocked_actions: IntCounterVec,
    scale_up_nodes: IntCounterVec,
    scale_ups: IntCounterVec,
    scale_downs: IntCounterVec,
    nodes: prometheus::IntGaugeVec,
    pool_size: prometheus::IntGaugeVec,
    min_standby: prometheus::IntGaugeVec,
    warmup_results: IntCounterVec,
    warmup_duration: HistogramVec,
    reconcile_errors: IntCounterVec,
    round_duration: HistogramVec,
    decision_duration: HistogramVec,
}

impl PoolMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let nodes = prometheus::IntGaugeVec::new(
            Opts::new("stratos_pool_nodes", "Nodes of a pool by lifecycle state."),
            &["pool", "state"],
        )?;
        let pool_size = prometheus::IntGaugeVec::new(
            Opts::new("stratos_pool_size", "The pool's poolSize."),
            &["pool"],
        )?;
        let min_standby = prometheus::IntGaugeVec::new(
            Opts::new("stratos_pool_min_standby", "The pool's minStandby."),
            &["pool"],
        )?;
        let warmup_results = IntCounterVec::new(
            Opts::new(
                "stratos_warmup_results_total",
                "Warmups by result (completed, resumed, timeout, stopped_before_registering).",
            ),
            &["pool", "result"],
        )?;
        let warmup_duration = HistogramVec::new(
            HistogramOpts::new("stratos_warmup_duration_seconds", "From launch to standby.")
                .buckets(vec![30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 900.0, 1800.0]),
            &["pool"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "stratos_reconcile_errors_total",
                "Failed reconciles by controller and error.",
            ),
            &["controller", "error"],
        )?;
        // Fine buckets: SPEC §12 holds a round to p99 < 50 ms.
        let round_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let round_duration = HistogramVec::new(
            HistogramOpts::new(
                "stratos_reconcile_duration_seconds",
                "One reconcile round, from its start to its last write (cloud calls included), by controller.",
            )
            .buckets(round_buckets.clone()),
            &["controller"],
        )?;
        let decision_duration = HistogramVec::new(
            HistogramOpts::new(
                "stratos_decision_duration_seconds",
                "The part of a round that reads the caches and decides (snapshot and plan), without any call, by controller.",
            )
            .buckets(round_buckets),
            &["controller"],
        )?;
        let seconds = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["pool"])
        };
        let decision_latency = seconds(
            "stratos_scale_up_decision_seconds",
            "From Stratos seeing a pod unschedulable to StartInstances issued for it.",
            vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0],
        )?;
        let pending_to_scheduled = seconds(
            "stratos_pod_pending_to_scheduled_seconds",
            "From a pod becoming unschedulable to its binding on a node of the pool.",
            vec![1.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0],
        )?;
        let start_to_ready = seconds(
            "stratos_node_start_to_ready_seconds",
            "From StartInstances to the node Ready.",
            vec![5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0],
        )?;
        let drain_duration = seconds(
            "stratos_drain_duration_seconds",
            "From the start of a drain to the node stopped into standby.",
            vec![1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0],
        )?;
        let drain_failures = IntCounterVec::new(
            Opts::new(
                "stratos_drain_failures_total",
                "Drains that did not finish, by reason.",
            ),
            &["pool", "reason"],
        )?;
        let blocked_actions = IntCounterVec::new(
            Opts::new(
                "stratos_blocked_actions_total",
                "Actions refused by the cluster or the cloud (evictions forbidden or blocked by a PodDisruptionBudget, drains timed out, terminations failed), by reason; each refused attempt counts.",
            ),
            &["pool", "reason"],
        )?;
        let scale_up_nodes = IntCounterVec::new(
            Opts::new(
                "stratos_scale_up_nodes_total",
                "Nodes added for pending pods, by source.",
            ),
            &["pool", "source"],
        )?;
        let scale_ups = IntCounterVec::new(
            Opts::new(
                "stratos_scale_ups_total",
                "Scale-up decisions that added nodes for pending pods, by source.",
            ),
            &["pool", "source"],
        )?;
        let scale_downs = IntCounterVec::new(
            Opts::new(
                "stratos_scale_downs_total",
                "Empty nodes drained and stopped back into standby.",
            ),
            &["pool"],
        )?;
        for h in [
            &decision_latency,
            &pending_to_scheduled,
            &start_to_ready,
            &drain_duration,
        ] {
            registry.register(Box::new(h.clone()))?;
        }
        registry.register(Box::new(scale_ups.clone()))?;
        registry.register(Box::new(scale_downs.clone()))?;
        registry.register(Box::new(drain_failures.clone()))?;
        registry.register(Box::new(blocked_actions.clone()))?;
        registry.register(Box::new(scale_up_nodes.clone()))?;
        for c in [&nodes, &pool_size, &min_standby] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(warmup_results.clone()))?;
        registry.register(Box::new(warmup_duration.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(round_duration.clone()))?;
        registry.register(Box::new(decision_duration.clone()))?;
        Ok(Self {
            registry: registry.clone(),
            decision_latency,
            pending_to_scheduled,
            start_to_ready,
            drain_duration,
            drain_failures,
            blocked_actions,
            scale_up_nodes,
            scale_ups,
            scale_downs,
            nodes,
            pool_size,
            min_standby,
            warmup_results,
            warmup_duration,
            reconcile_errors,
            round_duration,
            decision_duration,
        })
    }

    pub fn detached() -> Self {
        Self::new(&Registry::new()).expect("a fresh registry accepts every family")
    }

    pub fn set_pool(&self, pool: &str, pool_size: i64, min_standby: i64, by_state: &[(&str, i64)]) {
        self.pool_size.with_label_values(&[pool]).set(pool_size);
        self.min_standby.with_label_values(&[pool]).set(min_standby);
        for (state, n) in by_state {
            self.nodes.with_label_values(&[pool, state]).set(*n);
        }
        // Counters and histograms exist from the pool's first reconcile, at zero, so rates
        // and alerts see a series before the first event.
        for source in ["standby", "launch"] {
            self.scale_ups.with_label_values(&[pool, source]);
            self.scale_up_nodes.with_label_values(&[pool, source]);
        }
        self.scale_downs.with_label_values(&[pool]);
        self.drain_failures.with_label_values(&[pool, "timeout"]);
        for reason in BLOCKED_REASONS {
            self.blocked_actions.with_label_values(&[pool, reason]);
        }
        // Also after a restart, before any warmup ends: alerts on results see a series.
        for result in WARMUP_RESULTS {
            self.warmup_results.with_label_values(&[pool, result]);
        }
        for h in [
            &self.decision_latency,
            &self.pending_to_scheduled,
            &self.start_to_ready,
            &self.drain_duration,
            &self.warmup_duration,
        ] {
            h.with_label_values(&[pool]);
        }
    }

    pub fn warmup_result(&self, pool: &str, result: &str, duration: Option<Duration>) {
        self.warmup_results.with_label_values(&[pool, result]).inc();
        if let Some(d) = duration {
            self.warmup_duration
                .with_label_values(&[pool])
                .observe(d.as_secs_f64());
        }
    }

    pub fn scale_up(
        &self,
        pool: &str,
        source: &str,
        nodes: usize,
        decision_latencies: &[Duration],
    ) {
        if nodes > 0 {
            self.scale_ups.with_label_values(&[pool, source]).inc();
        }
        self.scale_up_nodes
            .with_label_values(&[pool, source])
            .inc_by(nodes as u64);
        for d in decision_latencies {
            self.decision_latency
                .with_label_values(&[pool])
                .observe(d.as_secs_f64());
        }
    }

    pub fn pod_scheduled(&self, pool: &str, pending_for: Duration) {
        self.pending_to_scheduled
            .with_label_values(&[pool])
            .observe(pending_for.as_secs_f64());
    }

    pub fn node_ready_after_start(&self, pool: &str, after: Duration) {
        self.start_to_ready
            .with_label_values(&[pool])
            .observe(after.as_secs_f64());
    }

    pub fn drained(&self, pool: &str, took: Duration) {
        self.scale_downs.with_label_values(&[pool]).inc();
        self.drain_duration
            .with_label_values(&[pool])
            .observe(took.as_secs_f64());
    }

    /// An action of `pool` was refused for `reason` (one of [`BLOCKED_REASONS`]).
    pub fn blocked(&self, pool: &str, reason: &str) {
        self.blocked_actions
            .with_label_values(&[pool, reason])
            .inc();
    }

    pub fn drain_failed(&self, pool: &str, reason: &str) {
        self.drain_failures.with_label_values(&[pool, reason]).inc();
    }

    /// The registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        let _ = encoder.encode_utf8(&self.registry.gather(), &mut out);
        out
    }

    /// A whole round, and the part of it that decided.
    pub fn round(&self, controller: &str, whole: Duration, deciding: Duration) {
        self.round_duration
            .with_label_values(&[controller])
            .observe(whole.as_secs_f64());
        self.decision_duration
            .with_label_values(&[controller])
            .observe(deciding.as_secs_f64());
    }

    pub fn reconcile_error(&self, controller: &str, error: &str) {
        self.reconcile_errors
            .with_label_values(&[controller, error])
            .inc();
    }

    /// Drops every per-pool series of a deleted pool.
    pub fn remove_pool(&self, pool: &str, states: &[&str]) {
        let _ = self.pool_size.remove_label_values(&[pool]);
        let _ = self.min_standby.remove_label_values(&[pool]);
        let _ = self.warmup_duration.remove_label_values(&[pool]);
        for h in [
            &self.decision_latency,
            &self.pending_to_scheduled,
            &self.start_to_ready,
            &self.drain_duration,
        ] {
            let _ = h.remove_label_values(&[pool]);
        }
        for source in ["standby", "launch"] {
            let _ = self.scale_up_nodes.remove_label_values(&[pool, source]);
            let _ = self.scale_ups.remove_label_values(&[pool, source]);
        }
        let _ = self.scale_downs.remove_label_values(&[pool]);
        let _ = self.drain_failures.remove_label_values(&[pool, "timeout"]);
        for reason in BLOCKED_REASONS {
            let _ = self.blocked_actions.remove_label_values(&[pool, reason]);
        }
        for s in states {
            let _ = self.nodes.remove_label_values(&[pool, s]);
        }
        for r in WARMUP_RESULTS {
            let _ = self.warmup_results.remove_label_values(&[pool, r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_pool_leaves_no_series_behind() {
        let m = PoolMetrics::detached();
        for pool in ["gone", "kept"] {
            m.set_pool(pool, 10, 3, &[("standby", 3), ("running", 1)]);
            m.warmup_result(pool, "completed", Some(Duration::from_secs(90)));
            m.scale_up(pool, "standby", 2, &[Duration::from_millis(120)]);
            m.scale_up(pool, "launch", 1, &[]);
            m.pod_scheduled(pool, Duration::from_secs(9));
            m.node_ready_after_start(pool, Duration::from_secs(14));
            m.drained(pool, Duration::from_secs(30));
            m.drain_failed(pool, "timeout");
            m.blocked(pool, "EvictionBlockedByPDB");
        }
        let before = m.render();
        assert!(before.contains(
            "stratos_blocked_actions_total{pool=\"kept\",reason=\"EvictionForbidden\"} 0"
        ));
        assert!(before.contains(
            "stratos_blocked_actions_total{pool=\"kept\",reason=\"EvictionBlockedByPDB\"} 1"
        ));
        assert!(before.contains("stratos_scale_ups_total{pool=\"gone\",source=\"standby\"} 1"));
        assert!(
            before.contains("stratos_warmup_results_total{pool=\"kept\",result=\"timeout\"} 0"),
            "every result exists at zero from the pool's first reconcile"
        );
        assert!(before.contains("stratos_scale_downs_total{pool=\"gone\"} 1"));
        m.remove_pool("gone", &["standby", "running"]);
        let after = m.render();
        let leftovers: Vec<_> = after
            .lines()
            .filter(|l| l.contains("pool=\"gone\""))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:#?}");
        assert!(after.contains("stratos_pool_nodes{pool=\"kept\",state=\"standby\"} 3"));
    }
}
