//! How a failed reconcile is retried (SPEC §11 I6). Errors differ in what waiting achieves:
//!
//! | class | examples | retry | counts toward backoff |
//! | --- | --- | --- | --- |
//! | conflict | 409: someone else wrote the object first | after 100 ms, from a fresh read | no |
//! | blocked | an eviction refused (403, PDB), a deletion waiting for instances | every 5 s while it lasts | no |
//! | transient | API server restarting (connection refused, 5xx), 429, EC2 throttling | 0.5 s doubling to **5 s** | yes, reset by the first success |
//! | permanent | 400/403/404/422 from the API, EC2 errors | 1 s doubling to **2 min** | yes, reset by the first success |
//!
//! Why these caps: a transient error ends by itself, usually within seconds (an API server
//! restart, a throttling window), and a pool must act soon after — e.g. replenish standby —
//! without waiting for an unrelated event to wake it; 5 s keeps that delay short at a cost of
//! one cheap reconcile per pool per 5 s during an outage. A permanent error needs a person
//! (a missing permission, an invalid AMI); retrying it every second only burns API and EC2
//! quota, so it backs off to 2 minutes, and the condition and Warning event say what to fix.
//! Any change of the pool, its class, or its nodes and pods reconciles it at once anyway.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use super::Error;
use crate::cloud::CloudError;

/// What a failure says about retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Conflict,
    Blocked,
    Transient,
    Permanent,
}

impl ErrorClass {
    /// Whether consecutive failures of this class lengthen the wait.
    fn counted(self) -> bool {
        matches!(self, Self::Transient | Self::Permanent)
    }
}

/// The class of a Kubernetes API error.
pub fn classify_kube(e: &kube::Error) -> ErrorClass {
    match e {
        kube::Error::Api(s) => match s.code {
            409 => ErrorClass::Conflict,
            429 | 500 | 502 | 503 | 504 => ErrorClass::Transient,
            _ => ErrorClass::Permanent,
        },
        // No answer at all: connection refused or reset, TLS cut short, timeouts — what an
        // API server restart looks like from here.
        kube::Error::HyperError(_) | kube::Error::Service(_) => ErrorClass::Transient,
        _ => ErrorClass::Permanent,
    }
}

/// The class of a controller error.
pub fn classify(e: &Error) -> ErrorClass {
    match e {
        Error::Kube(k) => classify_kube(k),
        Error::Cloud(CloudError::Throttled(_)) => ErrorClass::Transient,
        Error::Cloud(_) => ErrorClass::Permanent,
        Error::Finalizer(_) => ErrorClass::Permanent,
        Error::Waiting(_) | Error::Blocked { .. } => ErrorClass::Blocked,
    }
}

/// How long to wait after the `n`th consecutive failure (from 1) of `class`.
pub fn retry_after(class: ErrorClass, n: u32) -> Duration {
    let doubling = |first: Duration, cap: Duration| {
        let factor = 1u32 << n.saturating_sub(1).min(16);
        first.saturating_mul(factor).min(cap)
    };
    match class {
        ErrorClass::Conflict => Duration::from_millis(100),
        ErrorClass::Blocked => Duration::from_secs(5),
        ErrorClass::Transient => doubling(Duration::from_millis(500), Duration::from_secs(5)),
        ErrorClass::Permanent => doubling(Duration::from_secs(1), Duration::from_secs(120)),
    }
}

/// Consecutive counted failures per object.
#[derive(Debug, Default)]
pub struct Failures {
    by_key: Mutex<HashMap<String, u32>>,
}

impl Failures {
    /// Records a failure of `key` and says how long to wait before the next attempt.
    pub fn failed(&self, key: &str, class: ErrorClass) -> Duration {
        if !class.counted() {
            return retry_after(class, 1);
        }
        let mut by_key = self.by_key.lock().expect("failures lock");
        let n = by_key.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        retry_after(class, *n)
    }

    /// `key` succeeded: its next failure starts from the shortest wait.
    pub fn succeeded(&self, key: &str) {
        self.by_key.lock().expect("failures lock").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> Error {
        Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..Default::default()
        })))
    }

    #[test]
    fn errors_are_classified_by_what_waiting_achieves() {
        let cases = [
            (api(409), ErrorClass::Conflict),
            (api(429), ErrorClass::Transient),
            (api(500), ErrorClass::Transient),
            (api(503), ErrorClass::Transient),
            (api(504), ErrorClass::Transient),
            (api(403), ErrorClass::Permanent),
            (api(404), ErrorClass::Permanent),
            (api(422), ErrorClass::Permanent),
            (
                Error::Cloud(CloudError::Throttled("RequestLimitExceeded".into())),
                ErrorClass::Transient,
            ),
            (
                Error::Cloud(CloudError::InsufficientCapacity("m5.large".into())),
                ErrorClass::Permanent,
            ),
            (
                Error::Cloud(CloudError::Unauthorized("ec2:RunInstances".into())),
                ErrorClass::Permanent,
            ),
            (Error::Waiting("2 instances".into()), ErrorClass::Blocked),
            (
                Error::Blocked {
                    reason: "EvictionForbidden",
                    message: "pods/eviction".into(),
                },
                ErrorClass::Blocked,
            ),
        ];
        for (error, class) in cases {
            assert_eq!(classify(&error), class, "{error}");
        }
    }

    #[test]
    fn waits_grow_per_class_up_to_their_caps() {
        let secs = |class, n| retry_after(class, n).as_secs_f64();
        let transient: Vec<f64> = (1..=6).map(|n| secs(ErrorClass::Transient, n)).collect();
        assert_eq!(transient, vec![0.5, 1.0, 2.0, 4.0, 5.0, 5.0]);
        let permanent: Vec<f64> = (1..=9).map(|n| secs(ErrorClass::Permanent, n)).collect();
        assert_eq!(
            permanent,
            vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 120.0, 120.0]
        );
        assert_eq!(secs(ErrorClass::Permanent, 1000), 120.0, "no overflow");
        assert_eq!(secs(ErrorClass::Conflict, 50), 0.1);
        assert_eq!(secs(ErrorClass::Blocked, 50), 5.0);
    }

    #[test]
    fn conflicts_never_lengthen_the_wait_and_a_success_resets_it() {
        let f = Failures::default();
        assert_eq!(f.failed("p", ErrorClass::Permanent), Duration::from_secs(1));
        assert_eq!(f.failed("p", ErrorClass::Permanent), Duration::from_secs(2));
        // Fourteen conflicts in a row after an API server restart: still 100 ms each, and
        // the count of real failures is untouched.
        for _ in 0..14 {
            assert_eq!(
                f.failed("p", ErrorClass::Conflict),
                Duration::from_millis(100)
            );
        }
        assert_eq!(f.failed("p", ErrorClass::Permanent), Duration::from_secs(4));
        f.succeeded("p");
        assert_eq!(
            f.failed("p", ErrorClass::Transient),
            Duration::from_millis(500)
        );
        assert_eq!(
            f.failed("other", ErrorClass::Transient),
            Duration::from_millis(500)
        );
    }
}
