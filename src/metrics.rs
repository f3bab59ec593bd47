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

/// Pool gauges and lifecycle counters (SPEC §8.1). Per-pool series are removed with the pool.
pub struct PoolMetrics {
    nodes: prometheus::IntGaugeVec,
    pool_size: prometheus::IntGaugeVec,
    min_standby: prometheus::IntGaugeVec,
    warmup_results: IntCounterVec,
    warmup_duration: HistogramVec,
    reconcile_errors: IntCounterVec,
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
                "Warmups by result (completed, self_stopped, timeout, stopped_before_registering).",
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
        for c in [&nodes, &pool_size, &min_standby] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(warmup_results.clone()))?;
        registry.register(Box::new(warmup_duration.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        Ok(Self {
            nodes,
            pool_size,
            min_standby,
            warmup_results,
            warmup_duration,
            reconcile_errors,
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
    }

    pub fn warmup_result(&self, pool: &str, result: &str, duration: Option<Duration>) {
        self.warmup_results.with_label_values(&[pool, result]).inc();
        if let Some(d) = duration {
            self.warmup_duration
                .with_label_values(&[pool])
                .observe(d.as_secs_f64());
        }
    }

    pub fn reconcile_error(&self, controller: &str, error: &str) {
        self.reconcile_errors
            .with_label_values(&[controller, error])
            .inc();
    }

    /// Drops every per-pool series of a deleted pool.
    pub fn remove_pool(&self, pool: &str, states: &[&str], results: &[&str]) {
        let _ = self.pool_size.remove_label_values(&[pool]);
        let _ = self.min_standby.remove_label_values(&[pool]);
        let _ = self.warmup_duration.remove_label_values(&[pool]);
        for s in states {
            let _ = self.nodes.remove_label_values(&[pool, s]);
        }
        for r in results {
            let _ = self.warmup_results.remove_label_values(&[pool, r]);
        }
    }
}
