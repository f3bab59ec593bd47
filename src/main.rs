use std::process::ExitCode;

use std::sync::Arc;

use stratos::{
    api,
    cloud::{
        ec2::{Ec2Cloud, RetryPolicy},
        ratelimit::Limits,
    },
    config::{self, Cli, Command, RunConfig},
    controller::{self, OperatorConfig},
    http::{self, Health, Phase},
    leader::{self, LeaderConfig},
    metrics::{CloudApiMetrics, PoolMetrics},
    preflight, telemetry,
};

fn main() -> ExitCode {
    let cli = match Cli::parse_from_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(err) if err.is_request => {
            print!("{}", err.message);
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("{}", err.message);
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Crds => {
            print!("{}", api::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("stratos {} ({})", config::VERSION, config::GIT_REVISION);
            ExitCode::SUCCESS
        }
        Command::Run(cfg) => run(*cfg),
        Command::Noop => ExitCode::SUCCESS,
        Command::InstallNoop { dest } => match install_self(&dest) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: cannot install to {}: {e}", dest.display());
                ExitCode::FAILURE
            }
        },
    }
}

/// Copies this (static) binary where the pre-pull containers run it as `noop`.
fn install_self(dest: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe()?;
    std::fs::copy(exe, dest)?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))
}

fn run(cfg: RunConfig) -> ExitCode {
    telemetry::init(cfg.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match serve(cfg).await {
            Ok(()) => {
                tracing::info!("shut down");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "stopped");
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Connects, serves the endpoints, and runs the controllers while leading, until SIGTERM.
async fn serve(cfg: RunConfig) -> Result<(), String> {
    let health = Health::new();
    // Two stops: SIGTERM stops the controllers and releases the lease; the endpoints close
    // only after that, so probes and scrapes see the shutdown through.
    let (stop, stopped) = stop_signal();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("SIGTERM: finishing in-flight work, then releasing the lease");
        let _ = stop.send(true);
    });
    let (http_stop, http_stopped) = stop_signal();

    let registry = prometheus::Registry::new();
    let cloud_metrics =
        CloudApiMetrics::new(&registry).map_err(|e| format!("cannot register metrics: {e}"))?;
    let pool_metrics =
        Arc::new(PoolMetrics::new(&registry).map_err(|e| format!("cannot register metrics: {e}"))?);
    // Bind before connecting, so probes answer (not ready) during start-up and a taken port
    // fails at once.
    let (_, health_server) = http::bind(
        cfg.health_addr,
        http::health_router(health.clone()),
        http_stopped(),
    )
    .await
    .map_err(|e| format!("cannot listen on --health-addr {}: {e}", cfg.health_addr))?;
    let (_, metrics_server) = http::bind(
        cfg.metrics_addr,
        http::metrics_router(pool_metrics.clone()),
        http_stopped(),
    )
    .await
    .map_err(|e| format!("cannot listen on --metrics-addr {}: {e}", cfg.metrics_addr))?;

    let clients = preflight::connect(&cfg).await.map_err(|e| e.to_string())?;
    let cloud = Arc::new(Ec2Cloud::new(
        &clients.aws,
        &cfg.cluster_name,
        Limits::default().scaled(cfg.ec2_rate_limit_scale),
        RetryPolicy::default(),
        Arc::new(cloud_metrics),
    ));
    let mut operator = OperatorConfig::new(&cfg.cluster_name);
    operator.prepull_namespace = cfg.prepull_namespace.clone();
    operator.pool_selector = cfg.pool_selector.clone();
    if let Some(image) = &cfg.prepull_image {
        operator.prepull_image = image.clone();
    }
    tracing::info!(
        cluster = %cfg.cluster_name,
        version = config::VERSION,
        revision = config::GIT_REVISION,
        leader_elect = cfg.leader_elect,
        "starting"
    );
    // Every replica watches from the start: a standby that takes over acts on warm caches.
    let caches = controller::Caches::start(&clients.kube, &operator);
    let controllers = {
        let (kube, eviction, health) = (
            clients.kube.clone(),
            clients.eviction.clone(),
            health.clone(),
        );
        move |stop| {
            controller::run_with(
                caches,
                kube,
                eviction,
                cloud,
                operator,
                pool_metrics,
                health,
                stop,
            )
        }
    };
    let result = if cfg.leader_elect {
        let leader = LeaderConfig {
            lease_name: cfg.leader_elect_lease_name.clone(),
            namespace: cfg
                .leader_elect_namespace
                .clone()
                .unwrap_or_else(|| cfg.prepull_namespace.clone()),
            identity: leader::identity(),
            lease_duration: cfg.leader_elect_lease_duration,
        };
        leader::run_elected(
            clients.kube,
            &leader,
            health.clone(),
            stopped(),
            controllers,
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    } else {
        controllers(stopped()).await;
        Ok(())
    };
    health.set(Phase::ShuttingDown);
    let _ = http_stop.send(true);
    let _ = tokio::join!(health_server, metrics_server);
    result
}

/// A stop that any number of futures wait for: send `true` once and every future that
/// `stopped()` made resolves.
fn stop_signal() -> (
    tokio::sync::watch::Sender<bool>,
    impl Fn() -> futures::future::BoxFuture<'static, ()>,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = rx.clone();
        let wait: futures::future::BoxFuture<'static, ()> = Box::pin(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        });
        wait
    };
    (tx, stopped)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
