//! Client-side rate limiting modelled on EC2's token buckets.
//!
//! EC2 throttles per account and region with two kinds of bucket: a *request* bucket per API
//! action, and for instance actions a *resource* bucket drained by the number of instances
//! in the call. Throttling is shared with everything else in the account (other
//! controllers, consoles, CI), so Stratos keeps well inside the documented sizes and waits
//! locally instead of burning the shared budget on requests that would come back
//! `RequestLimitExceeded`.
//!
//! Buckets run on tokio's clock, so tests with paused time see the real refill behaviour
//! without waiting.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tokio::time::Instant;

/// Every cloud API call Stratos makes, for rate limiting and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    RunInstances,
    StartInstances,
    StopInstances,
    TerminateInstances,
    DescribeInstances,
    CreateTags,
    DescribeImages,
    DescribeSubnets,
    DescribeSecurityGroups,
}

impl Operation {
    pub const ALL: [Operation; 9] = [
        Self::RunInstances,
        Self::StartInstances,
        Self::StopInstances,
        Self::TerminateInstances,
        Self::DescribeInstances,
        Self::CreateTags,
        Self::DescribeImages,
        Self::DescribeSubnets,
        Self::DescribeSecurityGroups,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RunInstances => "RunInstances",
            Self::StartInstances => "StartInstances",
            Self::StopInstances => "StopInstances",
            Self::TerminateInstances => "TerminateInstances",
            Self::DescribeInstances => "DescribeInstances",
            Self::CreateTags => "CreateTags",
            Self::DescribeImages => "DescribeImages",
            Self::DescribeSubnets => "DescribeSubnets",
            Self::DescribeSecurityGroups => "DescribeSecurityGroups",
        }
    }
}

/// A bucket's size and refill rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub capacity: f64,
    pub refill_per_sec: f64,
}

impl Bucket {
    pub const fn new(capacity: f64, refill_per_sec: f64) -> Self {
        Self {
            capacity,
            refill_per_sec,
        }
    }
}

/// Bucket sizes per operation.
#[derive(Debug, Clone)]
pub struct Limits {
    pub request: HashMap<Operation, Bucket>,
    /// Drained by the number of instances in the call.
    pub resource: HashMap<Operation, Bucket>,
}

impl Default for Limits {
    /// Conservative shares of EC2's documented per-account buckets.
    fn default() -> Self {
        use Operation::*;
        let request = HashMap::from([
            (RunInstances, Bucket::new(5.0, 2.0)),
            (StartInstances, Bucket::new(5.0, 2.0)),
            (StopInstances, Bucket::new(5.0, 2.0)),
            (TerminateInstances, Bucket::new(5.0, 2.0)),
            (CreateTags, Bucket::new(10.0, 5.0)),
            (DescribeInstances, Bucket::new(20.0, 5.0)),
            (DescribeImages, Bucket::new(10.0, 2.0)),
            (DescribeSubnets, Bucket::new(10.0, 2.0)),
            (DescribeSecurityGroups, Bucket::new(10.0, 2.0)),
        ]);
        let resource = HashMap::from([
            (RunInstances, Bucket::new(1000.0, 2.0)),
            (StartInstances, Bucket::new(1000.0, 2.0)),
            (StopInstances, Bucket::new(1000.0, 20.0)),
            (TerminateInstances, Bucket::new(1000.0, 20.0)),
        ]);
        Self { request, resource }
    }
}

impl Limits {
    /// Every bucket's size and refill multiplied by `factor`: for an account whose EC2
    /// throttling limits AWS has raised (or lowered, to leave room for other clients).
    pub fn scaled(mut self, factor: f64) -> Self {
        for bucket in self.request.values_mut().chain(self.resource.values_mut()) {
            bucket.capacity *= factor;
            bucket.refill_per_sec *= factor;
        }
        self
    }

    /// No limiting at all (for benchmarks that measure Stratos, not the buckets).
    pub fn unlimited() -> Self {
        Self {
            request: HashMap::new(),
            resource: HashMap::new(),
        }
    }
}

#[derive(Debug)]
struct TokenBucket {
    config: Bucket,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    fn new(config: Bucket, now: Instant) -> Self {
        Self {
            config,
            tokens: config.capacity,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * self.config.refill_per_sec).min(self.config.capacity);
        self.updated = now;
    }

    /// Takes `n` tokens, or says how long until they are there. A request larger than the
    /// whole bucket may proceed once the bucket is full and leaves it in debt: otherwise a
    /// 1,000-instance batch could never start.
    fn take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let needed = n.min(self.config.capacity);
        if self.tokens >= needed {
            self.tokens -= n;
            return Ok(());
        }
        let missing = needed - self.tokens;
        Err(Duration::from_secs_f64(
            missing / self.config.refill_per_sec.max(f64::EPSILON),
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Request,
    Resource,
}

/// Shared by every call of one cloud client.
#[derive(Debug)]
pub struct RateLimiter {
    limits: Limits,
    buckets: Mutex<HashMap<(Operation, Kind), TokenBucket>>,
}

impl RateLimiter {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until one request token and `resources` resource tokens are available for
    /// `op`, then takes them. Returns how long it waited.
    pub async fn acquire(&self, op: Operation, resources: usize) -> Duration {
        let start = Instant::now();
        if let Some(bucket) = self.limits.request.get(&op).copied() {
            self.take(op, Kind::Request, bucket, 1.0).await;
        }
        if resources > 0
            && let Some(bucket) = self.limits.resource.get(&op).copied()
        {
            self.take(op, Kind::Resource, bucket, resources as f64)
                .await;
        }
        start.elapsed()
    }

    async fn take(&self, op: Operation, kind: Kind, config: Bucket, n: f64) {
        loop {
            let wait = {
                let now = Instant::now();
                let mut buckets = self.buckets.lock().expect("rate limiter lock poisoned");
                let bucket = buckets
                    .entry((op, kind))
                    .or_insert_with(|| TokenBucket::new(config, now));
                match bucket.take(n, now) {
                    Ok(()) => return,
                    Err(wait) => wait,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(request: Bucket, resource: Option<Bucket>) -> RateLimiter {
        let mut limits = Limits::unlimited();
        limits.request.insert(Operation::StartInstances, request);
        if let Some(r) = resource {
            limits.resource.insert(Operation::StartInstances, r);
        }
        RateLimiter::new(limits)
    }

    #[test]
    fn scaling_multiplies_every_bucket() {
        let base = Limits::default();
        let raised = Limits::default().scaled(10.0);
        for (op, b) in &base.request {
            assert_eq!(raised.request[op].capacity, b.capacity * 10.0);
            assert_eq!(raised.request[op].refill_per_sec, b.refill_per_sec * 10.0);
        }
        for (op, b) in &base.resource {
            assert_eq!(raised.resource[op].capacity, b.capacity * 10.0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill_rate() {
        let rl = limiter(Bucket::new(5.0, 2.0), None);
        let start = Instant::now();
        for _ in 0..5 {
            rl.acquire(Operation::StartInstances, 0).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst passes at once");
        for _ in 0..4 {
            rl.acquire(Operation::StartInstances, 0).await;
        }
        // Four more tokens at 2/s take two seconds.
        let waited = start.elapsed().as_secs_f64();
        assert!((waited - 2.0).abs() < 0.01, "waited {waited}s");
    }

    #[tokio::test(start_paused = true)]
    async fn resource_tokens_follow_instance_counts() {
        let rl = limiter(Bucket::new(100.0, 100.0), Some(Bucket::new(10.0, 2.0)));
        let start = Instant::now();
        rl.acquire(Operation::StartInstances, 10).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        rl.acquire(Operation::StartInstances, 4).await;
        let waited = start.elapsed().as_secs_f64();
        assert!(
            (waited - 2.0).abs() < 0.01,
            "waited {waited}s for 4 instance tokens at 2/s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_larger_than_the_bucket_still_proceeds() {
        let rl = limiter(Bucket::new(100.0, 100.0), Some(Bucket::new(10.0, 1.0)));
        let start = Instant::now();
        rl.acquire(Operation::StartInstances, 50).await;
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a full bucket lets an oversized batch through"
        );
        rl.acquire(Operation::StartInstances, 1).await;
        // The bucket is 40 tokens in debt, so the next instance waits ~41 s.
        let waited = start.elapsed().as_secs_f64();
        assert!((waited - 41.0).abs() < 0.05, "waited {waited}s");
    }

    #[tokio::test(start_paused = true)]
    async fn operations_without_a_bucket_are_not_limited() {
        let rl = RateLimiter::new(Limits::unlimited());
        let start = Instant::now();
        for _ in 0..1000 {
            rl.acquire(Operation::DescribeInstances, 0).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
