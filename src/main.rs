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
        let clients = match preflight::connect(&cfg).await {
            Ok(clients) => clients,
            Err(e) => {
                tracing::error!(error = %e, "start-up failed");
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let registry = prometheus::Registry::new();
        let (cloud_metrics, pool_metrics) =
            match (CloudApiMetrics::new(&registry), PoolMetrics::new(&registry)) {
                (Ok(c), Ok(p)) => (Arc::new(c), Arc::new(p)),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("error: cannot register metrics: {e}");
                    return ExitCode::FAILURE;
                }
            };
        let cloud = Arc::new(Ec2Cloud::new(
            &clients.aws,
            &cfg.cluster_name,
            Limits::default(),
            RetryPolicy::default(),
            cloud_metrics,
        ));
        let mut operator = OperatorConfig::new(&cfg.cluster_name);
        operator.prepull_namespace = cfg.prepull_namespace.clone();
        if let Some(image) = &cfg.prepull_image {
            operator.prepull_image = image.clone();
        }
        tracing::info!(
            cluster = %cfg.cluster_name,
            version = config::VERSION,
            revision = config::GIT_REVISION,
            "starting controllers"
        );
        controller::run(
            clients.kube,
            clients.eviction,
            cloud,
            operator,
            pool_metrics,
            shutdown_signal(),
        )
        .await;
        tracing::info!("shut down");
        ExitCode::SUCCESS
    })
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
