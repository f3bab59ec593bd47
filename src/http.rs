//! The operator's HTTP endpoints (SPEC §8): `/metrics` on one address, `/healthz` and
//! `/readyz` on another, so the probes keep answering while a scrape is slow.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::metrics::PoolMetrics;

/// Where the process is in its life, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Connecting, or the leader filling its caches.
    Starting = 0,
    /// A candidate waiting for the lease: ready to take over, so it counts as available.
    Standby = 1,
    /// The leader with synced caches.
    Leading = 2,
    /// SIGTERM received: no longer a candidate.
    ShuttingDown = 3,
}

/// Shared between the controllers, the leader election and the probes.
#[derive(Debug, Default)]
pub struct Health {
    phase: AtomicU8,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            1 => Phase::Standby,
            2 => Phase::Leading,
            3 => Phase::ShuttingDown,
            _ => Phase::Starting,
        }
    }

    fn ready(&self) -> (bool, &'static str) {
        match self.phase() {
            Phase::Starting => (false, "starting: caches not synced yet\n"),
            Phase::Standby => (true, "ok: standby, waiting for the leader lease\n"),
            Phase::Leading => (true, "ok: leader, caches synced\n"),
            Phase::ShuttingDown => (false, "shutting down\n"),
        }
    }
}

/// `/healthz` (the process serves requests) and `/readyz` (see [`Phase`]).
pub fn health_router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(health): State<Arc<Health>>| async move {
                let (ready, body) = health.ready();
                let code = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, body)
            }),
        )
        .with_state(health)
}

/// `/metrics` in the Prometheus text format.
pub fn metrics_router(metrics: Arc<PoolMetrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(metrics): State<Arc<PoolMetrics>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
                    .into_response()
            }),
        )
        .with_state(metrics)
}

/// Binds `addr` now (so a taken port fails start-up) and serves `router` until `shutdown`.
pub async fn bind(
    addr: SocketAddr,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, addr = %local, "HTTP server failed");
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_phase() {
        let h = Health::new();
        let table = [
            (Phase::Starting, false),
            (Phase::Standby, true),
            (Phase::Leading, true),
            (Phase::ShuttingDown, false),
        ];
        for (phase, ready) in table {
            h.set(phase);
            assert_eq!(h.phase(), phase);
            assert_eq!(h.ready().0, ready, "{phase:?}");
        }
    }
}
