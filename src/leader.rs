//! Leader election on a coordination/v1 Lease (SPEC §8), through kube-lease-manager: only
//! the holder runs the controllers; a candidate takes over once the holder stops renewing.

use std::{future::Future, sync::Arc, time::Duration};

use futures::{FutureExt, future::BoxFuture};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};

use crate::http::{Health, Phase};

/// Where and how the lease is held.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    /// Unique per process: two processes with one identity would both think they lead.
    pub identity: String,
    /// How long a lease outlives its last renewal: a candidate takes over at most this long
    /// after the leader died.
    pub lease_duration: Duration,
}

impl LeaderConfig {
    /// The leader renews this long before the lease would expire: a third of the duration,
    /// so a renewal can fail once or twice and still land in time.
    fn renew_margin(&self) -> u64 {
        (self.lease_duration.as_secs() / 3).max(1)
    }
}

/// An identity unique to this process: the pod name (or host name) plus a random suffix,
/// so a restarted container never mistakes its predecessor's lease for its own.
pub fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "stratos".into());
    let suffix: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(6)
        .collect();
    format!("{base}_{}", suffix.to_lowercase())
}

/// Why the elected run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Shutdown was requested; the lease, if held, was released.
    Shutdown,
    /// The controllers returned on their own.
    Finished,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("cannot set up the lease {0}: {1}")]
    Setup(String, LeaseManagerError),
    #[error("lost the leader lease: another replica may act now, so this one stops")]
    Lost,
    #[error("the lease watcher stopped unexpectedly")]
    WatcherGone,
}

/// Waits for the lease, then runs `lead` until `shutdown` resolves or the lease is lost.
/// `lead` gets a future that resolves when it must stop; the lease is released only after
/// `lead` returned, so two leaders never act at once.
pub async fn run_elected<F, Fut>(
    client: Client,
    config: &LeaderConfig,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
    lead: F,
) -> Result<Outcome, LeaderError>
where
    F: FnOnce(BoxFuture<'static, ()>) -> Fut,
    Fut: Future<Output = ()>,
{
    let lease = format!("{}/{}", config.namespace, config.lease_name);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let manager = LeaseManagerBuilder::new(client, &config.lease_name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(config.lease_duration.as_secs())
        .with_grace(config.renew_margin())
        .with_field_manager(format!("stratos-leader-{}", config.identity))
        .build()
        .await
        .map_err(|e| LeaderError::Setup(lease.clone(), e))?;
    let (mut leading, watcher) = manager.watch().await;
    let mut shutdown = std::pin::pin!(shutdown);
    health.set(Phase::Standby);
    tracing::info!(%lease, identity = %config.identity, "waiting for the leader lease");
    while !*leading.borrow_and_update() {
        tokio::select! {
            _ = &mut shutdown => {
                health.set(Phase::ShuttingDown);
                drop(leading);
                let _ = watcher.await;
                return Ok(Outcome::Shutdown);
            }
            changed = leading.changed() => if changed.is_err() {
                return Err(LeaderError::WatcherGone);
            },
        }
    }
    tracing::info!(%lease, identity = %config.identity, "acquired the leader lease");
    health.set(Phase::Starting);

    let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<()>();
    let mut controllers = std::pin::pin!(lead(stop_rx.map(|_| ()).boxed()));
    enum Why {
        Shutdown,
        Lost,
        Finished,
    }
    let why = tokio::select! {
        _ = &mut shutdown => Why::Shutdown,
        _ = async {
            // Resolves once the watcher reports the lease gone (or dies).
            while leading.changed().await.is_ok() && *leading.borrow_and_update() {}
        } => Why::Lost,
        _ = still_held(&leases, config) => Why::Lost,
        _ = &mut controllers => Why::Finished,
    };
    if !matches!(why, Why::Finished) {
        if matches!(why, Why::Lost) {
            tracing::error!(%lease, "lost the leader lease; stopping the controllers");
        }
        health.set(Phase::ShuttingDown);
        let _ = stop_tx.send(());
        controllers.await;
    }
    // Dropping the receiver makes the watcher release the lease and return.
    drop(leading);
    match tokio::time::timeout(Duration::from_secs(5), watcher).await {
        Ok(Ok(Ok(_))) => tracing::info!(%lease, "released the leader lease"),
        Ok(Ok(Err(e))) => {
            tracing::warn!(%lease, error = %e, "could not release the lease; it expires on its own")
        }
        Ok(Err(_)) | Err(_) => {
            tracing::warn!(%lease, "lease release timed out; it expires on its own")
        }
    }
    match why {
        Why::Shutdown => Ok(Outcome::Shutdown),
        Why::Lost => Err(LeaderError::Lost),
        Why::Finished => Ok(Outcome::Finished),
    }
}

/// How long before the lease's expiry (by our clock) a leader that could not confirm a
/// renewal stops: a candidate takes over only after the expiry, so no two leaders overlap
/// unless the clocks disagree by more than this.
const EXPIRY_MARGIN: Duration = Duration::from_secs(1);

/// Resolves when this process can no longer be sure it holds the lease: another identity
/// holds it, or no renewal could be confirmed and the lease is about to expire. The lease
/// manager notices both only at its next renewal, while an unreachable API server would
/// leave it believing it leads; this check bounds that.
async fn still_held(leases: &Api<Lease>, config: &LeaderConfig) {
    let period = (config.lease_duration / 6).max(Duration::from_millis(500));
    let mut expiry = std::time::SystemTime::now() + config.lease_duration;
    loop {
        tokio::time::sleep(period).await;
        match tokio::time::timeout(period, leases.get(&config.lease_name)).await {
            Ok(Ok(lease)) => {
                let spec = lease.spec.unwrap_or_default();
                if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
                    tracing::error!(holder = ?spec.holder_identity, "the leader lease is held by another replica");
                    return;
                }
                if let (Some(renewed), Some(secs)) = (spec.renew_time, spec.lease_duration_seconds)
                {
                    expiry = std::time::SystemTime::from(renewed.0)
                        + Duration::from_secs(secs.max(0) as u64);
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the leader lease"),
            Err(_) => tracing::warn!("reading the leader lease timed out"),
        }
        if std::time::SystemTime::now() + EXPIRY_MARGIN >= expiry {
            tracing::error!("no lease renewal confirmed before its expiry");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_unique_per_process_start() {
        assert_ne!(identity(), identity());
    }

    #[test]
    fn the_leader_renews_a_third_of_the_duration_early() {
        let cfg = |secs| LeaderConfig {
            lease_name: "stratos".into(),
            namespace: "kube-system".into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(secs),
        };
        assert_eq!(cfg(15).renew_margin(), 5);
        assert_eq!(cfg(2).renew_margin(), 1);
    }
}
