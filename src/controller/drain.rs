//! Draining a node: evict its workload pods through the Eviction API (PDBs respected), never
//! deleting a pod directly (SPEC §5.6, invariant 3).

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt, api::EvictParams};

use super::{Context, Error};

/// Asks for the eviction of every workload pod on `node`; returns how many remain (being
/// deleted or blocked by a disruption budget). Safe to repeat: an eviction of a pod that is
/// already going is a no-op.
pub async fn evict_workload(ctx: &Context, node: &str) -> Result<usize, Error> {
    let mut remaining = 0;
    for pod in ctx.stores.pods.state() {
        if pod.node_name.as_deref() != Some(node) {
            continue;
        }
        if pod.metadata.deletion_timestamp.is_some() && !pod.is_workload() {
            // Evicted and terminating: wait for it to go.
            if !pod.finished() {
                remaining += 1;
            }
            continue;
        }
        if !pod.is_workload() {
            continue;
        }
        remaining += 1;
        let api: Api<Pod> = Api::namespaced(
            ctx.eviction_client.clone(),
            &pod.namespace().unwrap_or_default(),
        );
        match api.evict(&pod.name_any(), &EvictParams::default()).await {
            Ok(_) => tracing::info!(node, pod = %pod.name_any(), "evicted"),
            Err(kube::Error::Api(s)) if s.code == 429 => {
                tracing::info!(node, pod = %pod.name_any(), "eviction blocked by a disruption budget; will retry")
            }
            Err(kube::Error::Api(s)) if s.code == 404 => remaining -= 1,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(remaining)
}
