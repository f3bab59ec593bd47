//! The AWSNodeClass controller: validates a class against the cloud, publishes the result
//! as its `Ready` condition with the resolved subnets, and keeps it from being deleted
//! while NodePools use it.

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action as Requeue,
        finalizer::{Event as FinalizerEvent, finalizer},
        reflector::Store,
    },
};
use serde_json::json;

use super::{Context, Error};
use crate::{
    api::{AWSNodeClass, AWSNodeClassStatus, NodePool},
    cloud::{CloudError, NodeClassCheck, NodeClassRefs},
};

pub use crate::contract::CLASS_FINALIZER as FINALIZER;
const RECHECK_READY: Duration = Duration::from_secs(300);
const RECHECK_NOT_READY: Duration = Duration::from_secs(30);

pub async fn controller(
    ctx: Arc<Context>,
    pools: Store<NodePool>,
    pools_changed: Arc<tokio::sync::Notify>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<AWSNodeClass> = Api::all(ctx.client.clone());
    let watch = ctx.config.scoped_watch();
    let data = Arc::new((ctx, pools, std::sync::Mutex::new(HashMap::new())));
    // A pool that starts or stops using a class changes the class's status.
    let trigger = futures::stream::unfold(pools_changed, |n| async move {
        n.notified().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some(((), n))
    });
    Controller::new(api, watch)
        .trigger_backoff(super::reflect::WatchBackoff::default())
        .reconcile_all_on(trigger)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, data)
        .for_each(|_| async {})
        .await;
}

/// The last cloud check per class: (generation, when, result). Pool changes re-run the
/// reconcile often; EC2 is asked again only when the class changed or the check is old.
type Checks = std::sync::Mutex<
    HashMap<
        String,
        (
            Option<i64>,
            std::time::Instant,
            Result<NodeClassCheck, CloudError>,
        ),
    >,
>;

type Data = (Arc<Context>, Store<NodePool>, Checks);

fn error_policy(class: Arc<AWSNodeClass>, error: &Error, data: Arc<Data>) -> Requeue {
    if let Error::Waiting(why) = error {
        tracing::debug!(class = %class.name_any(), why, "deletion waits");
        return Requeue::requeue(Duration::from_secs(5));
    }
    let ctx = &data.0;
    let delay = ctx.retry_delay(&format!("awsnodeclass/{}", class.name_any()), error);
    if super::retry::classify(error) != super::retry::ErrorClass::Conflict {
        ctx.metrics.reconcile_error("awsnodeclass", error.label());
        tracing::warn!(class = %class.name_any(), error = %error, retry_in_ms = delay.as_millis() as u64, "reconcile failed");
    }
    Requeue::requeue(delay)
}

fn users(name: &str, pools: &Store<NodePool>) -> Vec<String> {
    let mut users: Vec<String> = pools
        .state()
        .iter()
        .filter(|p| p.spec.template.node_class_ref.name == name)
        .map(|p| p.name_any())
        .collect();
    users.sort();
    users
}

async fn reconcile(class: Arc<AWSNodeClass>, data: Arc<Data>) -> Result<Requeue, Error> {
    let (ctx, pools, checks) = (&data.0, &data.1, &data.2);
    let api: Api<AWSNodeClass> = Api::all(ctx.client.clone());
    let result = finalizer(&api, FINALIZER, class, |event| async {
        match event {
            FinalizerEvent::Apply(class) => validate(&class, ctx, pools, checks).await,
            FinalizerEvent::Cleanup(class) => {
                let users = users(&class.name_any(), pools);
                if users.is_empty() {
                    return Ok(Requeue::await_change());
                }
                ctx.publish(
                    &*class,
                    true,
                    "InUse",
                    format!(
                        "cannot be deleted while NodePools use it: {}",
                        users.join(", ")
                    ),
                )
                .await;
                Err(Error::Waiting(format!("used by {}", users.join(", "))))
            }
        }
    })
    .await;
    match result {
        Ok(a) => Ok(a),
        Err(
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e),
        ) => Err(e),
        Err(e) => Err(Error::Finalizer(e.to_string())),
    }
}

async fn validate(
    class: &AWSNodeClass,
    ctx: &Context,
    pools: &Store<NodePool>,
    checks: &Checks,
) -> Result<Requeue, Error> {
    let name = class.name_any();
    let existing = class.status.clone().unwrap_or_default();
    let cached =
        checks
            .lock()
            .expect("checks lock")
            .get(&name)
            .and_then(|(generation, at, result)| {
                let max_age = if matches!(result, Ok(c) if c.is_ready()) {
                    RECHECK_READY
                } else {
                    RECHECK_NOT_READY
                };
                (*generation == class.metadata.generation && at.elapsed() < max_age)
                    .then(|| result.clone())
            });
    let checked = match cached {
        Some(result) => result,
        None => {
            let result = ctx
                .cloud
                .check_node_class(&NodeClassRefs::from(&class.spec))
                .await;
            let entry = (
                class.metadata.generation,
                std::time::Instant::now(),
                result.clone(),
            );
            checks
                .lock()
                .expect("checks lock")
                .insert(name.clone(), entry);
            result
        }
    };
    let (ready, reason, message, subnets) = match &checked {
        Ok(check) if check.is_ready() => (
            true,
            "Validated",
            "AMI, subnets and security groups exist".to_owned(),
            check.subnets.clone(),
        ),
        Ok(check) => (
            false,
            "NotFound",
            check.problems.join("; "),
            check.subnets.clone(),
        ),
        Err(e) => (false, "CloudError", e.to_string(), existing.subnets.clone()),
    };
    let previous = existing.conditions.iter().find(|c| c.type_ == "Ready");
    let status_str = if ready { "True" } else { "False" };
    if !ready && previous.is_none_or(|p| p.status != status_str || p.message != message) {
        ctx.publish(class, true, "InvalidSpec", message.clone())
            .await;
    }
    let condition = Condition {
        type_: "Ready".into(),
        status: status_str.into(),
        reason: reason.into(),
        message,
        observed_generation: class.metadata.generation,
        last_transition_time: match previous {
            Some(p) if p.status == status_str => p.last_transition_time.clone(),
            _ => Time(jiff::Timestamp::now()),
        },
    };
    let status = AWSNodeClassStatus {
        observed_generation: class.metadata.generation,
        conditions: vec![condition],
        subnets,
        node_pools: users(&name, pools),
    };
    let body =
        json!({"apiVersion": "stratos.sh/v1alpha1", "kind": "AWSNodeClass", "status": status});
    let api: Api<AWSNodeClass> = Api::all(ctx.client.clone());
    api.patch_status(
        &name,
        &PatchParams::apply("stratos").force(),
        &Patch::Apply(&body),
    )
    .await?;
    if let Err(e) = checked {
        return Err(Error::Cloud(e));
    }
    ctx.reset_backoff(&format!("awsnodeclass/{name}"));
    // Re-validate periodically: an AMI can be deregistered, a subnet deleted; a class that is
    // not Ready is checked more often so a fix shows up quickly.
    Ok(Requeue::requeue(if ready {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(30)
    }))
}
