//! Serves the embedded API server until interrupted, for poking at it with kubectl:
//! `cargo run -p stratos-testkit --example serve`, then `KUBECONFIG=<printed path> kubectl ...`.

#[tokio::main]
async fn main() {
    let server = testkit::apiserver::ApiServer::start_with_repo_crds().await;
    println!("{}", server.kubeconfig_path().display());
    tokio::signal::ctrl_c().await.ok();
}
