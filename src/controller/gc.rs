//! Garbage collection (SPEC §5.7): instances with this cluster's tag whose NodePool no longer
//! exists, and Nodes of a pool whose instance is gone.

use std::{future::Future, sync::Arc};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, ResourceExt, api::DeleteParams, runtime::reflector::Store};

use super::Context;
use crate::{
    api::{NodePool, nodepool::POOL_LABEL},
    cloud::{InstanceState, parse_provider_id, tags},
};

pub async fn run(ctx: Arc<Context>, pools: Store<NodePool>, shutdown: impl Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    tracing::debug!("garbage collection waits for the pool cache");
    let _ = pools.wait_until_ready().await;
    tracing::debug!("garbage collection started");
    loop {
        collect(&ctx, &pools).await;
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(ctx.config.gc_interval) => {}
        }
    }
}

pub async fn collect(ctx: &Context, pools: &Store<NodePool>) {
    // A pool missing from a stale pool cache, or a Node missing from a stale node cache,
    // is no evidence of anything: collect only from a current view.
    if !ctx.stores.freshness.current() {
        tracing::info!(stale = ?ctx.stores.freshness.stale(), "garbage collection waits for the caches to catch up");
        return;
    }
    let Ok((listed_at, instances)) = ctx.instances.get().await else {
        return;
    };
    let pool_names: Vec<String> = pools.state().iter().map(|p| p.name_any()).collect();
    let orphans: Vec<String> = instances
        .iter()
        .filter(|i| i.state.is_live())
        .filter(|i| i.tag(tags::CLUSTER) == Some(ctx.config.cluster.as_str()))
        .filter(|i| {
            i.tag(tags::POOL)
                .is_some_and(|p| !pool_names.iter().any(|n| n == p))
        })
        .map(|i| i.id.clone())
        .collect();
    if !orphans.is_empty() {
        tracing::info!(instances = ?orphans, "terminating instances of deleted pools");
        let outcome = ctx.cloud.terminate_instances(&orphans).await;
        for (id, e) in outcome.failed {
            tracing::warn!(instance = %id, error = %e, "could not terminate an orphaned instance");
        }
        ctx.instances
            .record(super::instances::Change::State(
                &outcome.succeeded,
                crate::cloud::InstanceState::ShuttingDown,
            ))
            .await;
    }
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    for node in ctx.stores.nodes.state() {
        let owned = node
            .labels()
            .get(POOL_LABEL)
            .is_some_and(|p| ctx.config.manages_node_of(p, &pool_names));
        if !owned {
            continue;
        }
        let Some((_, id)) = node
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.as_deref())
            .and_then(parse_provider_id)
        else {
            continue;
        };
        let gone = match instances.iter().find(|i| i.id == id) {
            Some(i) => matches!(
                i.state,
                InstanceState::Terminated | InstanceState::ShuttingDown
            ),
            None => {
                let created = node
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| std::time::SystemTime::from(t.0));
                let age_at_listing = created.and_then(|c| {
                    (std::time::SystemTime::now() - listed_at.elapsed())
                        .duration_since(c)
                        .ok()
                });
                age_at_listing.is_some_and(|a| a > ctx.config.node_gc_grace)
            }
        };
        if gone {
            tracing::info!(node = %node.name_any(), instance = id, "deleting the node of a gone instance");
            let _ = nodes
                .delete(&node.name_any(), &DeleteParams::default())
                .await;
        }
    }
}
