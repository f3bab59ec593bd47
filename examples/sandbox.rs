//! The Stratos sandbox: the real controllers against an embedded Kubernetes API server,
//! scheduler, DaemonSet controller and kubelet simulator, with a simulated EC2 of AWS-like
//! latencies. No cluster and no AWS account needed.
//!
//!     cargo run --example sandbox [-- --scenario NAME] [--speed X]
//!
//! It applies a scenario's example (`quickstart`, `ci-runners`, `inference`,
//! `scale-to-zero`: the files of `examples/`), watches the pool warm up into standby, sends
//! a burst of pods that standby nodes serve, then the same burst to a pool of the same nodes
//! without standby (`minStandby: 0`), which only cold launches can serve, and prints each
//! pod's pending → running time. Empty nodes then drain back to standby. It ends with a
//! summary table in Markdown. `/metrics` is served on 127.0.0.1:9464 meanwhile.
//!
//! `--speed` scales every latency (default 0.2: a 15 s start takes 3 s; 1 is real time).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt, api::ListParams};
use stratos::{api::NodePool, cloud::fake::FakeCloudConfig, cloud::ratelimit::Operation};
use testkit::{
    harness::{ClusterOptions, TestCluster},
    kubelet::KubeletOptions,
};
use tokio::{io::AsyncWriteExt, time::Instant};

/// A use case of the docs, runnable here.
struct Scenario {
    name: &'static str,
    what: &'static str,
    yaml: &'static str,
    /// The pool of the example.
    pool: &'static str,
    /// Pods of the burst: how many, and each one's CPU, image and GPUs.
    pods: usize,
    cpu: &'static str,
    image: &'static str,
    gpus: u32,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario {
        name: "quickstart",
        what: "examples/quickstart.yaml: 3 standby m5.large nodes; a burst of 6 pods of 900m",
        yaml: include_str!("quickstart.yaml"),
        pool: "workers",
        pods: 6,
        cpu: "900m",
        image: "ci-runner:1",
        gpus: 0,
    },
    Scenario {
        name: "ci-runners",
        what: "examples/ci-runners.yaml: 5 standby m5.2xlarge runners; a burst of 16 CI jobs of 1500m",
        yaml: include_str!("ci-runners.yaml"),
        pool: "ci-runners",
        pods: 16,
        cpu: "1500m",
        image: "ci-runner:1",
        gpus: 0,
    },
    Scenario {
        name: "inference",
        what: "examples/llm-inference.yaml: 2 standby g5.2xlarge nodes with the model image pulled during warmup; 2 model servers of one GPU each",
        yaml: include_str!("llm-inference.yaml"),
        pool: "inference",
        pods: 2,
        cpu: "2",
        image: "my-registry.com/llama-3:70b",
        gpus: 1,
    },
    Scenario {
        name: "scale-to-zero",
        what: "examples/scale-to-zero.yaml: 2 standby m5.large nodes; a service scales from 0 to 1 replica",
        yaml: include_str!("scale-to-zero.yaml"),
        pool: "on-demand",
        pods: 1,
        cpu: "500m",
        image: "web:1",
        gpus: 0,
    },
];

struct Args {
    scenario: &'static Scenario,
    speed: f64,
}

fn usage() -> String {
    let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
    format!(
        "usage: cargo run --example sandbox -- [--scenario {}] [--speed X]\n  --speed X   latencies × X (default 0.2; 1 is AWS speed, about 4 minutes)",
        names.join("|")
    )
}

fn args() -> Result<Args, String> {
    let mut scenario = &SCENARIOS[0];
    let mut speed = 0.2;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or(format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--scenario" => {
                let v = value()?;
                scenario = SCENARIOS
                    .iter()
                    .find(|s| s.name == v)
                    .ok_or(format!("unknown scenario {v:?}"))?;
            }
            "--speed" => {
                let v = value()?;
                speed = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| *s > 0.0 && *s <= 10.0)
                    .ok_or(format!("--speed {v}: a number in (0, 10]"))?;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args { scenario, speed })
}

/// The example with a short emptyNodeTTL (so the demo shows scale-down too).
fn with_ttl(yaml: &str, ttl: &str) -> String {
    if yaml.contains("emptyNodeTTL:") {
        yaml.lines()
            .map(|l| {
                if l.trim_start().starts_with("emptyNodeTTL:") {
                    format!("    emptyNodeTTL: {ttl}")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    } else {
        yaml.to_owned() + &format!("  scaleDown:\n    emptyNodeTTL: {ttl}\n")
    }
}

/// The example's pool as a pool of the same nodes (same class) that keeps no standby,
/// named `cold`.
fn cold_pool(yaml: &str, pool: &str) -> String {
    let doc = yaml
        .split("\n---\n")
        .find(|d| d.contains("kind: NodePool"))
        .unwrap_or_default()
        // The pool's own name (metadata comes first), not its nodeClassRef's.
        .replacen(&format!("name: {pool}"), "name: cold", 1)
        .replace(&format!("stratos.sh/pool: {pool}"), "stratos.sh/pool: cold");
    doc.lines()
        .map(|l| {
            if l.trim_start().starts_with("minStandby:") {
                "  minStandby: 0".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn scaled(secs: f64, speed: f64) -> Duration {
    Duration::from_secs_f64((secs * speed).max(0.05))
}

fn pod(name: &str, pool: &str, s: &Scenario) -> String {
    let gpus = if s.gpus > 0 {
        // Extended resources are requested and limited alike.
        format!(
            "\n          nvidia.com/gpu: {0}\n        limits:\n          nvidia.com/gpu: {0}",
            s.gpus
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  nodeSelector:\n    stratos.sh/pool: {pool}\n  containers:\n    - name: main\n      image: {}\n      resources:\n        requests:\n          cpu: {}{gpus}\n",
        s.image, s.cpu
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
    let Args {
        scenario: sc,
        speed,
    } = match args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("{e}");
            }
            eprintln!("{}", usage());
            std::process::exit(if e.is_empty() { 0 } else { 2 });
        }
    };
    let pool = sc.pool;
    let t0 = Instant::now();
    let at = move || format!("t={:6.1}s", t0.elapsed().as_secs_f64());
    println!(
        "Stratos sandbox, scenario {}: {}\nAWS-like latencies x{speed} (start ~15 s, cold launch ~45 s, kubelet Ready ~5 s)\n",
        sc.name, sc.what
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
        "{} API server {} · metrics http://127.0.0.1:9464/metrics\n   watch it: KUBECONFIG={} kubectl get np,nodes -w",
        at(),
        cluster.server.as_ref().map(|s| s.url()).unwrap_or_default(),
        cluster.kubeconfig_path().display()
    );

    // A short TTL so the demo shows scale-down too.
    let ttl = format!("{}s", (120.0 * speed).ceil() as u64);
    let example = with_ttl(sc.yaml, &ttl);
    cluster.apply_yaml(&example).await;
    let min_standby: i32 = example
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("minStandby:"))
        .and_then(|v| v.split('#').next()?.trim().parse().ok())
        .unwrap_or(1);
    println!(
        "{} applied the example (minStandby {min_standby}, emptyNodeTTL {ttl})",
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
            println!("{} pool {pool}: {line}", at());
            last = line;
        }
        s
    };
    loop {
        let s = show(
            pools
                .get(&cluster.name(pool))
                .await
                .ok()
                .and_then(|p| p.status),
        );
        if s.standby == min_standby && s.warmup == 0 {
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
        "{} warm: {min_standby} nodes launched once, warmed up and stopped into standby\n",
        at()
    );

    let pods: Api<Pod> = cluster.pods();
    let mut created: BTreeMap<String, (Instant, &str)> = BTreeMap::new();
    // Burst 1: the scenario's pods, served by standby nodes started in one call.
    let n = sc.pods;
    for i in 0..n {
        cluster
            .apply_yaml(&pod(&format!("standby-{i}"), pool, sc))
            .await;
        created.insert(format!("standby-{i}"), (Instant::now(), "standby start"));
    }
    println!("{} burst: {n} pods of {}", at(), sc.cpu);
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
    while running.len() < n {
        let list = pods
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        wait_running(&mut running, &list, &created);
        show(
            pools
                .get(&cluster.name(pool))
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
        "{} all {n} running · StartInstances calls: {} (nodes per call: {starts:?})\n",
        at(),
        starts.len()
    );

    // Burst 2: the cold path, for comparison: a pool of the same nodes that keeps no
    // standby (minStandby 0), as every cold-node autoscaler does. Its pods wait for a launch,
    // boot, join and warmup before they can run.
    let cold = cold_pool(&example, pool);
    cluster.apply_yaml(&cold).await;
    for i in 0..n {
        cluster
            .apply_yaml(&pod(&format!("cold-{i}"), "cold", sc))
            .await;
        created.insert(format!("cold-{i}"), (Instant::now(), "cold launch"));
    }
    println!(
        "{} burst: the same {n} pods on pool cold (same nodes, minStandby 0): cold launches",
        at()
    );
    while running.len() < 2 * n {
        let list = pods
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        wait_running(&mut running, &list, &created);
        show(
            pools
                .get(&cluster.name(pool))
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
                .get(&cluster.name(pool))
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
    // A summary to paste into an issue or a discussion.
    let median = |how: &str| {
        let mut v: Vec<f64> = running
            .iter()
            .filter(|(n, _)| created.get(*n).is_some_and(|(_, h)| *h == how))
            .map(|(_, d)| d.as_secs_f64())
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let calls = |op: Operation| cluster.cloud.call_count(op);
    println!(
        "\n| scenario | speed | pods | pending → running p50, standby start | p50, cold launch | at AWS speed (standby / cold) | StartInstances calls | RunInstances calls | SPEC §11 invariants |\n|---|---|---|---|---|---|---|---|---|\n| {} | ×{speed} | {n} + {n} | {:.1} s | {:.1} s | {:.0} s / {:.0} s | {} | {} | {} |",
        sc.name,
        median("standby start"),
        median("cold launch"),
        median("standby start") / speed,
        median("cold launch") / speed,
        calls(Operation::StartInstances),
        calls(Operation::RunInstances),
        if violations.is_empty() {
            "held"
        } else {
            "VIOLATED"
        },
    );
    println!(
        "\nstratos {} · `cargo run --example sandbox -- --scenario {} --speed {speed}`",
        env!("CARGO_PKG_VERSION"),
        sc.name
    );
    println!("{} done", at());
    if !violations.is_empty() {
        std::process::exit(1);
    }
}
