//! A NodePool's status (SPEC §3.2) as a pure function of its plan: counts, the `Ready` and
//! `Degraded` conditions with their reasons, and whether `Degraded` just turned on (the
//! controller then publishes a Warning event).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::plan::{Plan, Problem};
use crate::api::NodePoolStatus;

/// What went wrong while executing the plan, as the status tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The cluster refuses an action (an eviction): `reason` names what, e.g.
    /// `EvictionBlockedByPDB`.
    Blocked {
        reason: String,
        message: String,
    },
    InsufficientCapacity(String),
    Cloud(String),
    Other(String),
}

/// What the status is computed from.
pub struct StatusInput<'a> {
    pub plan: &'a Plan,
    pub class_name: &'a str,
    pub class_found: bool,
    pub min_standby: usize,
    /// The first failure of this round, if any.
    pub failure: Option<&'a Failure>,
    /// The conditions now on the object (transition times are kept while unchanged).
    pub existing: &'a [Condition],
    pub generation: Option<i64>,
    pub now: Time,
}

/// The status to apply, and `Some((reason, message))` when `Degraded` turned on just now.
pub fn pool_status(input: &StatusInput<'_>) -> (NodePoolStatus, Option<(String, String)>) {
    let c = &input.plan.counts;
    let min = input.min_standby;
    let class = input.class_name;
    let (degraded, reason, message) = match (input.plan.problems.first(), input.failure) {
        (Some(Problem::NodeClassNotFound), _) => (
            true,
            "NodeClassNotFound",
            format!("AWSNodeClass {class} does not exist"),
        ),
        (Some(Problem::NodeClassNotReady), _) => (
            true,
            "NodeClassNotReady",
            format!("AWSNodeClass {class} is not Ready; see its status"),
        ),
        (Some(Problem::PrePullFailed(nodes)), _) => (
            true,
            "WarmupFailing",
            format!("image pre-pull failed on {}", nodes.join(", ")),
        ),
        (None, Some(Failure::Blocked { reason, message })) => {
            (true, reason.as_str(), message.clone())
        }
        (None, Some(Failure::InsufficientCapacity(m))) => (true, "InsufficientCapacity", m.clone()),
        (None, Some(Failure::Cloud(m))) => (true, "CloudError", m.clone()),
        (None, Some(Failure::Other(m))) => (true, "ReconcileError", m.clone()),
        (None, None) => (false, "AsExpected", "the pool is healthy".to_owned()),
    };
    let class_ok = !input
        .plan
        .problems
        .iter()
        .any(|p| matches!(p, Problem::NodeClassNotReady | Problem::NodeClassNotFound));
    let ready = input.class_found && class_ok && c.standby >= min;
    let ready_message = if ready {
        format!("{} standby node(s), minStandby {min}", c.standby)
    } else if !input.class_found {
        "no node class".into()
    } else {
        format!(
            "{} of {min} standby node(s) ready; {} warming up",
            c.standby, c.warmup
        )
    };
    let condition = |type_: &str, status: bool, reason: &str, message: String| {
        let status = if status { "True" } else { "False" }.to_owned();
        let last_transition_time = match input.existing.iter().find(|c| c.type_ == type_) {
            Some(p) if p.status == status => p.last_transition_time.clone(),
            _ => input.now.clone(),
        };
        Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message,
            observed_generation: input.generation,
            last_transition_time,
        }
    };
    let ready_reason = if ready {
        "StandbyAvailable"
    } else {
        "StandbyShort"
    };
    let status = NodePoolStatus {
        observed_generation: input.generation,
        warmup: c.warmup as i32,
        standby: c.standby as i32,
        starting: c.starting as i32,
        running: c.running as i32,
        draining: c.draining as i32,
        total: c.total as i32,
        conditions: vec![
            condition("Ready", ready, ready_reason, ready_message),
            condition("Degraded", degraded, reason, message.clone()),
        ],
        // Owned by the scale-up path's own field manager.
        last_scale_up: None,
    };
    let was_degraded = input
        .existing
        .iter()
        .any(|c| c.type_ == "Degraded" && c.status == "True");
    let newly = (degraded && !was_degraded).then(|| (reason.to_owned(), message));
    (status, newly)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::plan::Counts;

    fn at(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn conditions_follow_problems_failures_and_standby() {
        let plan = |problems: Vec<Problem>, standby: usize| Plan {
            counts: Counts {
                standby,
                total: standby,
                ..Default::default()
            },
            problems,
            ..Default::default()
        };
        let cloud = Failure::Cloud("InternalError".into());
        let ice = Failure::InsufficientCapacity("no m5.large in us-east-1a".into());
        // (what, plan, class found, failure, Ready, Degraded reason)
        type Case<'a> = (&'a str, Plan, bool, Option<&'a Failure>, bool, &'a str);
        let cases: Vec<Case> = vec![
            ("healthy", plan(vec![], 3), true, None, true, "AsExpected"),
            (
                "standby short",
                plan(vec![], 1),
                true,
                None,
                false,
                "AsExpected",
            ),
            (
                "no class",
                plan(vec![Problem::NodeClassNotFound], 3),
                false,
                None,
                false,
                "NodeClassNotFound",
            ),
            (
                "class not ready",
                plan(vec![Problem::NodeClassNotReady], 3),
                true,
                None,
                false,
                "NodeClassNotReady",
            ),
            (
                "pre-pull",
                plan(vec![Problem::PrePullFailed(vec!["n1".into()])], 3),
                true,
                None,
                true,
                "WarmupFailing",
            ),
            (
                "capacity",
                plan(vec![], 3),
                true,
                Some(&ice),
                true,
                "InsufficientCapacity",
            ),
            (
                "cloud",
                plan(vec![], 3),
                true,
                Some(&cloud),
                true,
                "CloudError",
            ),
            (
                "problems first",
                plan(vec![Problem::NodeClassNotReady], 3),
                true,
                Some(&cloud),
                false,
                "NodeClassNotReady",
            ),
        ];
        for (what, plan, class_found, failure, ready, reason) in cases {
            let (status, newly) = pool_status(&StatusInput {
                plan: &plan,
                class_name: "workers",
                class_found,
                min_standby: 3,
                failure,
                existing: &[],
                generation: Some(2),
                now: at(100),
            });
            let cond = |t: &str| {
                status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == t)
                    .unwrap()
                    .clone()
            };
            assert_eq!(cond("Ready").status == "True", ready, "{what}");
            assert_eq!(cond("Degraded").reason, reason, "{what}");
            assert_eq!(
                newly.is_some(),
                reason != "AsExpected",
                "{what}: event only when it turns on"
            );
            assert_eq!(status.observed_generation, Some(2));
        }
    }

    #[test]
    fn transition_times_are_kept_while_a_condition_holds() {
        let plan = Plan::default();
        let input = |existing: &[Condition], now| {
            pool_status(&StatusInput {
                plan: &plan,
                class_name: "c",
                class_found: true,
                min_standby: 0,
                failure: None,
                existing,
                generation: None,
                now,
            })
        };
        let (first, _) = input(&[], at(100));
        let (second, newly) = input(&first.conditions, at(200));
        assert_eq!(second.conditions, first.conditions, "nothing changed");
        assert!(newly.is_none());
        let failing = Failure::Other("boom".into());
        let (third, newly) = pool_status(&StatusInput {
            failure: Some(&failing),
            existing: &second.conditions,
            now: at(300),
            ..StatusInput {
                plan: &plan,
                class_name: "c",
                class_found: true,
                min_standby: 0,
                failure: None,
                existing: &[],
                generation: None,
                now: at(0),
            }
        });
        let degraded = third
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded")
            .unwrap();
        assert_eq!(degraded.last_transition_time, at(300));
        assert_eq!(newly, Some(("ReconcileError".into(), "boom".into())));
        let ready = third
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.last_transition_time, at(100), "Ready did not change");
    }
}
