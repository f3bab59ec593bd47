use std::process::ExitCode;

use stratos::{
    api,
    config::{self, Cli, Command, RunConfig},
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
    }
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
        let _clients = match preflight::connect(&cfg).await {
            Ok(clients) => clients,
            Err(e) => {
                tracing::error!(error = %e, "start-up failed");
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(
            cluster = %cfg.cluster_name,
            version = config::VERSION,
            revision = config::GIT_REVISION,
            "preflight passed; waiting for a shutdown signal"
        );
        shutdown_signal().await;
        tracing::info!("shutting down");
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
