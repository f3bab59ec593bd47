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
