//! The Stratos sandbox: the real controllers against an embedded Kubernetes API server,
//! scheduler, DaemonSet controller and kubelet simulator, with a simulated EC2 of AWS-like
//! latencies. No cluster and no AWS account needed.
//!
//!     cargo run --example sandbox
//!
//! It applies `examples/quickstart.yaml`, watches the pool warm up into standby, sends a
//! burst of pods that standby nodes serve, then a burst to a pool of the same nodes without
//! standby (`minStandby: 0`), which only cold launches can serve,
//! and prints each pod's pending → running time. Empty nodes then drain back to standby.
//! `/metrics` is served on 127.0.0.1:9464 meanwhile.
//!
//! `STRATOS_SANDBOX_SPEED` scales every latency (default 0.2: a 15 s start takes 3 s).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt, api::ListParams};
use stratos::{api::NodePool, cloud::fake::FakeCloudConfig, cloud::ratelimit::Operation};
use testkit::{
    harness::{ClusterOptions, TestCluster},
    kubelet::KubeletOptions,
};
use tokio::{io::AsyncWriteExt, time::Instant};

const QUICKSTART: &str = include_str!("quickstart.yaml");

fn scaled(secs: f64, speed: f64) -> Duration {
    Duration::from_secs_f64((secs * speed).max(0.05))
}

fn pod(name: &str, pool: &str, cpu: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  nodeSelector:\n    stratos.sh/pool: {pool}\n  containers:\n    - name: runner\n      image: ci-runner:1\n      resources:\n        requests:\n          cpu: {cpu}\n"
    )
}

async fn serve_metrics(render: impl Fn() -> String + Send + Sync + 'static) {
    let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:9464").await else {
        println!("(port 9464 busy: /metrics not served)");
        return;
    };
    let render = Arc::new(render);
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let body = render();
        let _ = stream
            .write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes())
            .await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let speed: f64 = std::env::var("STRATOS_SANDBOX_SPEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.2);
    let t0 = Instant::now();
    let at = move || format!("t={:6.1}s", t0.elapsed().as_secs_f64());
    println!(
        "Stratos sandbox: AWS-like latencies x{speed} (start ~15 s, cold launch ~45 s, kubelet Ready ~5 s)\n"
    );
    let options = ClusterOptions {
        cloud: FakeCloudConfig {
            pending_to_running: scaled(15.0, speed),
            launch_extra: scaled(25.0, speed),
            stopping_to_stopped: scaled(10.0, speed),
            shutting_down_to_terminated: scaled(10.0, speed),
            ..Default::default()
        },
        kubelet: KubeletOptions {
            register_after: scaled(2.0, speed),
            ready_after: scaled(3.0, speed),
            network_ready_after: scaled(3.0, speed),
            pod_start_after: scaled(1.0, speed),
            ..Default::default()
        },
        ..Default::default()
    };
    let cluster = TestCluster::start(options).await;
    let operator = cluster.start_operator();
    let metrics = operator.metrics.clone();
    tokio::spawn(serve_metrics(move || metrics.render()));
    println!(
        "{} API server {} · kubeconfig {} · metrics http://127.0.0.1:9464/metrics",
        at(),
        cluster.server.as_ref().map(|s| s.url()).unwrap_or_default(),
        cluster.kubeconfig_path().display()
    );

    // A short TTL so the demo shows scale-down too.
    let ttl = format!("{}s", (120.0 * speed).ceil() as u64);
    let quickstart = QUICKSTART.to_owned() + &format!("  scaleDown:\n    emptyNodeTTL: {ttl}\n");
    cluster.apply_yaml(&quickstart).await;
    println!(
        "{} applied examples/quickstart.yaml (poolSize 10, minStandby 3, emptyNodeTTL {ttl})",
        at()
    );

    let pools: Api<NodePool> = Api::all(cluster.client.clone());
    let mut last = String::new();
    let mut show = |status: Option<stratos::api::NodePoolStatus>| {
        let s = status.unwrap_or_default();
        let line = format!(
            "warmup={} standby={} starting={} running={} draining={} total={}",
            s.warmup, s.standby, s.starting, s.running, s.draining, s.total
        );
        if line != last {
            println!("{} pool workers: {line}", at());
            last = line;
        }
        s
    };
    loop {
        let s = show(
            pools
                .get(&cluster.name("workers"))
                .await
                .ok()
                .and_then(|p| p.status),
        );
        if s.standby == 3 && s.warmup == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Standby counts from the moment a node is told to stop; EC2 starts an instance only
    // once it is fully stopped, as a pool at rest is.
    while cluster
        .cloud
        .all_instances()
        .iter()
        .any(|i| i.state != stratos::cloud::InstanceState::Stopped)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{} warm: 3 nodes launched once, warmed up and stopped into standby\n",
        at()
    );

    let pods: Api<Pod> = cluster.pods();
    let mut created: BTreeMap<String, (Instant, &str)> = BTreeMap::new();
    // Burst 1: six 900m pods, two per m5.large: three standby nodes start in one call.
    for i in 0..6 {
        cluster
            .apply_yaml(&pod(&format!("standby-{i}"), "workers", "900m"))
            .await;
        created.insert(format!("standby-{i}"), (Instant::now(), "standby start"));
    }
    println!("{} burst: 6 pods of 900m", at());
    let mut running: BTreeMap<String, Duration> = BTreeMap::new();
    let mut placed: BTreeMap<String, String> = BTreeMap::new();
    let mut wait_running =
        |running: &mut BTreeMap<String, Duration>,
         list: &[Pod],
         created: &BTreeMap<String, (Instant, &str)>| {
            for p in list {
                let name = p.name_any();
                if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    && !running.contains_key(&name)
                    && let Some((t, _)) = created.get(&name)
                {
                    placed.insert(
                        name.clone(),
                        p.spec
                            .as_ref()
                            .and_then(|s| s.node_name.clone())
                            .unwrap_or_default(),
                    );
                    running.insert(name, t.elapsed());
                }
            }
        };
    while running.len() < 6 {
        let list = pods
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        wait_running(&mut running, &list, &created);
        show(
            pools
                .get(&cluster.name("workers"))
                .await
                .ok()
                .and_then(|p| p.status),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let starts: Vec<usize> = cluster
        .cloud
        .calls()
        .iter()
        .filter(|c| c.operation == Operation::StartInstances)
        .map(|c| c.ids.len())
        .collect();
    println!(
        "{} all 6 running · StartInstances calls: {} (nodes per call: {starts:?})\n",
        at(),
        starts.len()
    );

    // Burst 2: the cold path, for comparison: a pool of the same nodes that keeps no
    // standby (minStandby 0), as every cold-node autoscaler does. Its pods wait for a launch,
    // boot, join and warmup before they can run.
    let cold_pool = quickstart
        .split("---")
        .nth(1)
        .unwrap_or_default()
        .replace("name: workers\nspec:", "name: cold\nspec:")
        .replace("minStandby: 3", "minStandby: 0")
        .replace("stratos.sh/pool: workers", "stratos.sh/pool: cold");
    cluster.apply_yaml(&cold_pool).await;
    for i in 0..4 {
        cluster
            .apply_yaml(&pod(&format!("cold-{i}"), "cold", "1500m"))
            .await;
        created.insert(format!("cold-{i}"), (Instant::now(), "cold launch"));
    }
    println!(
        "{} burst: 4 pods of 1500m on pool cold (same nodes, minStandby 0): cold launches",
        at()
    );
    while running.len() < 10 {
        let list = pods
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        wait_running(&mut running, &list, &created);
        show(
            pools
                .get(&cluster.name("workers"))
                .await
                .ok()
                .and_then(|p| p.status),
        );
        if t0.elapsed() > Duration::from_secs(600) {
            println!("giving up after 10 minutes");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    println!(
        "\n{:<12} {:<15} {:<28} {:>18}",
        "pod", "served by", "node", "pending → running"
    );
    for (name, took) in &running {
        let how = created.get(name).map(|(_, h)| *h).unwrap_or("");
        let node = placed.get(name).map(String::as_str).unwrap_or("");
        println!(
            "{name:<12} {how:<15} {node:<28} {:>17.1}s",
            took.as_secs_f64()
        );
    }
    let avg = |how: &str| {
        let v: Vec<f64> = running
            .iter()
            .filter(|(n, _)| created.get(*n).is_some_and(|(_, h)| *h == how))
            .map(|(_, d)| d.as_secs_f64())
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    println!(
        "\nstandby start: {:.1}s on average ({:.0}s at AWS speed) · cold launch: {:.1}s ({:.0}s at AWS speed)\n",
        avg("standby start"),
        avg("standby start") / speed,
        avg("cold launch"),
        avg("cold launch") / speed
    );

    // The jobs end: empty nodes drain back to standby after the TTL.
    pods.delete_collection(&Default::default(), &ListParams::default())
        .await
        .ok();
    println!(
        "{} all pods deleted; empty nodes return to standby after {ttl}",
        at()
    );
    let deadline = Instant::now() + Duration::from_secs_f64(120.0 * speed * 4.0 + 30.0);
    loop {
        let s = show(
            pools
                .get(&cluster.name("workers"))
                .await
                .ok()
                .and_then(|p| p.status),
        );
        let cold = pools
            .get(&cluster.name("cold"))
            .await
            .ok()
            .and_then(|p| p.status)
            .unwrap_or_default();
        let busy = |s: &stratos::api::NodePoolStatus| s.running + s.draining + s.starting;
        if busy(&s) == 0 && busy(&cold) == 0 {
            break;
        }
        if Instant::now() > deadline {
            println!("(scale-down still in progress)");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(table) = cluster.kubectl(&["get", "np"]) {
        println!("\n$ kubectl get np\n{table}");
    }
    let violations = cluster.invariants.violations();
    println!(
        "SPEC §11 invariants: {}",
        if violations.is_empty() {
            "held throughout".to_owned()
        } else {
            format!("VIOLATED: {violations:?}")
        }
    );
    println!("{} done", at());
    if !violations.is_empty() {
        std::process::exit(1);
    }
}
