//! SPEC §12 benchmarks, against FakeCloud and the embedded API server.
//!
//!     cargo run --release --example bench            # both
//!     cargo run --release --example bench decision   # burst decision latency
//!     cargo run --release --example bench memory     # controller RSS with big caches
//!     cargo run --release --example bench scale      # 10 live pools, 5,000 nodes, churn
//!
//! `decision`: 10 pools with enough standby capacity; a burst of 1,000 pending pods. For
//! each pod, the time from the scheduler marking it unschedulable (as a watch sees it) to
//! the StartInstances call that serves its pool; the StartInstances calls (one carries
//! every pool's ids); the DescribeInstances listings meanwhile. FakeCloud sits behind EC2's
//! request buckets, the scheduler marks the burst over about a second, and the operator
//! runs with production timings. Targets (SPEC §12): p99 ≤ 100 ms, ≤ 3 StartInstances, no
//! DescribeInstances during the burst.
//!
//! `memory`: 5,000 nodes and 50,000 pods in the API server, then the real `stratos run`
//! binary (EC2 pointed at moto) syncs its caches; its RSS is read from /proc. Target:
//! < 150 MiB. The binary is found next to this example (`target/<profile>/stratos`; build it
//! with `cargo build [--release] --bin stratos`) or through `STRATOS_BIN`.
//!
//! `scale`: the real binary against moto runs 10 pools holding 5,000 instances (2,000
//! running with pods, 3,000 in standby) and 50,000 pods, warmed and started by itself (the
//! kubelet simulator plays the nodes, the embedded scheduler binds); then for 60 s, 100 pod
//! changes a second: long-lived pods replaced and jobs that finish while new ones wait for
//! a node from standby. Reported from /proc and the binary's own /metrics: RSS peak and
//! mean, CPU mean and p99 per second, reconcile round and decision p50/p99, cloud calls.
//! Targets: RSS < 150 MiB, mean CPU < 0.25 core, round p99 < 50 ms.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, ResourceExt,
    api::PostParams,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use stratos::cloud::{ratelimit::Operation, tags};
use testkit::{
    harness::{ClusterOptions, TestCluster},
    scheduler::SchedulerOptions,
};
use tokio::time::Instant;

const POOLS: usize = 10;
const PODS: usize = 1_000;
/// m5.2xlarge has 7920m allocatable: 15 pods of 500m per node, 7 nodes for 100 pods.
const NODES_PER_POOL: usize = 7;

/// Creates every object, 32 requests at a time.
async fn create_all<K>(api: &Api<K>, objects: impl Iterator<Item = serde_json::Value>)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    futures::stream::iter(objects)
        .map(|o| async move {
            let o: K = serde_json::from_value(o).unwrap();
            api.create(&PostParams::default(), &o).await.unwrap();
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
}

/// `POOLS` m5.2xlarge classes and their pools (`pool-0`…), labelled `stratos.sh/pool`.
fn pools_yaml(pool_size: usize, min_standby: usize, extra_spec: &str) -> String {
    (0..POOLS)
        .map(|i| {
            format!(
                "apiVersion: stratos.sh/v1alpha1\nkind: AWSNodeClass\nmetadata:\n  name: class-{i}\nspec:\n  instanceType: m5.2xlarge\n  ami: ami-0123456789abcdef0\n  subnetIds: [\"subnet-12345678\"]\n  securityGroupIds: [\"sg-12345678\"]\n  iamInstanceProfile: node-role\n---\napiVersion: stratos.sh/v1alpha1\nkind: NodePool\nmetadata:\n  name: pool-{i}\nspec:\n  poolSize: {pool_size}\n  minStandby: {min_standby}\n{extra_spec}  template:\n    nodeClassRef:\n      kind: AWSNodeClass\n      name: class-{i}\n    labels:\n      stratos.sh/pool: pool-{i}\n---\n"
            )
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn decision() -> bool {
    // What production has: EC2's request buckets in front of the fake, a scheduler that
    // marks the burst over about a second, and the operator's production timings.
    let mut options = ClusterOptions {
        scheduler: SchedulerOptions {
            api_qps: Some(1000.0),
            api_burst: 100,
        },
        ..Default::default()
    };
    options.cloud.limits = Some(stratos::cloud::ratelimit::Limits::default());
    let cluster = TestCluster::start(options).await;
    let production = stratos::controller::OperatorConfig::new("bench");
    let _operator = cluster.start_operator_with(|c| {
        c.listing_ttl = production.listing_ttl;
        c.resync = production.resync;
    });
    cluster
        .apply_yaml(&pools_yaml(20, NODES_PER_POOL, ""))
        .await;
    let pools: Api<stratos::api::NodePool> = Api::all(cluster.client.clone());
    let want = (POOLS * NODES_PER_POOL) as i32;
    let t0 = Instant::now();
    cluster
        .wait_for(
            "every pool's standby warm",
            Duration::from_secs(300),
            || async {
                let list = pools.list(&Default::default()).await.ok()?;
                let standby: i32 = list
                    .items
                    .iter()
                    .filter_map(|p| p.status.as_ref())
                    .map(|s| s.standby)
                    .sum();
                (standby == want).then_some(())
            },
        )
        .await;
    println!(
        "decision: {POOLS} pools, {want} standby nodes warm after {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let instance_pool: HashMap<String, String> = cluster
        .cloud
        .all_instances()
        .into_iter()
        .filter_map(|i| Some((i.id.clone(), i.tag(tags::POOL)?.to_owned())))
        .collect();
    // Let the replenish rounds settle before the burst.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls_before = cluster.cloud.calls().len();

    // When the scheduler marked each pod unschedulable, as a watch sees it.
    let marked: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let pods: Api<Pod> = cluster.pods();
    let watch = {
        let marked = marked.clone();
        let pods = pods.clone();
        tokio::spawn(async move {
            let stream = watcher(pods, watcher::Config::default()).applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Ok(Some(pod)) = stream.try_next().await {
                if stratos::pool::pods::is_pending_unschedulable(&pod) {
                    marked
                        .lock()
                        .unwrap()
                        .entry(pod.name_any())
                        .or_insert_with(Instant::now);
                }
            }
        })
    };
    let burst = Instant::now();
    create_all(
        &pods,
        (0..PODS).map(|i| {
            cluster.scoped(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("job-{i}")},
                "spec": {
                    "nodeSelector": {"stratos.sh/pool": format!("pool-{}", i % POOLS)},
                    "containers": [{"name": "c", "image": "runner:1", "resources": {"requests": {"cpu": "500m"}}}]
                }
            }))
        }),
    )
    .await;
    println!(
        "decision: {PODS} pods created in {:.2}s",
        burst.elapsed().as_secs_f64()
    );
    cluster
        .wait_for("every pod running", Duration::from_secs(300), || async {
            let list = pods.list(&Default::default()).await.ok()?;
            let running = list
                .items
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count();
            (running == PODS).then_some(())
        })
        .await;
    watch.abort();

    let calls: Vec<_> = cluster
        .cloud
        .calls()
        .into_iter()
        .skip(calls_before)
        .collect();
    // One StartInstances carries every pool's ids: each pool's share of each call.
    let mut starts_by_pool: BTreeMap<String, Vec<(Instant, usize)>> = BTreeMap::new();
    let start_calls: Vec<_> = calls
        .iter()
        .filter(|c| c.operation == Operation::StartInstances)
        .collect();
    for c in &start_calls {
        let mut per_pool: BTreeMap<String, usize> = BTreeMap::new();
        for id in &c.ids {
            let pool = instance_pool.get(id).cloned().unwrap_or_default();
            *per_pool.entry(pool).or_default() += 1;
        }
        for (pool, n) in per_pool {
            starts_by_pool.entry(pool).or_default().push((c.at, n));
        }
    }
    let marked = marked.lock().unwrap().clone();
    // Listings between the first pod marked and the last start: the burst.
    let burst_window = marked.values().min().zip(start_calls.last().map(|c| c.at));
    let describes = calls
        .iter()
        .filter(|c| c.operation == Operation::DescribeInstances)
        .filter(|c| burst_window.is_some_and(|(from, to)| c.at >= *from && c.at <= to))
        .count();
    if let (Some(first), Some(last)) = (marked.values().min(), marked.values().max()) {
        println!(
            "decision: the scheduler marked the pods unschedulable from {:.2}s to {:.2}s after the burst began",
            (*first - burst).as_secs_f64(),
            (*last - burst).as_secs_f64()
        );
    }
    for c in &start_calls {
        let marked_by = marked.values().filter(|t| **t <= c.at).count();
        println!(
            "decision: +{:.2}s StartInstances of {} node(s) ({} of the pods marked by then)",
            (c.at - burst).as_secs_f64(),
            c.ids.len(),
            marked_by
        );
    }
    let describe_at: Vec<String> = calls
        .iter()
        .filter(|c| c.operation == Operation::DescribeInstances)
        .map(|c| format!("+{:.1}s", (c.at - burst).as_secs_f64()))
        .collect();
    println!("decision: DescribeInstances at {describe_at:?}");
    // Pods are fungible: a start serves the pool's pods in the order they were marked, as
    // many as the started nodes hold. So a pool's k-th marked pod is served by the call that
    // brought the pool's started capacity to k pods (capacity per node: the most pods any
    // of the pool's nodes ended up running). Its latency runs from its own mark to that
    // call, or is zero when the capacity was already on its way.
    let placed: HashMap<String, String> = pods
        .list(&Default::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| Some((p.name_any(), p.spec?.node_name?)))
        .collect();
    let mut per_node: HashMap<&str, usize> = HashMap::new();
    for node in placed.values() {
        *per_node.entry(node.as_str()).or_default() += 1;
    }
    let per_node_max = per_node.values().copied().max().unwrap_or(1).max(1);
    let mut latencies = Vec::new();
    let mut unserved = 0;
    let mut ahead = 0;
    for p in 0..POOLS {
        let pool = cluster.name(&format!("pool-{p}"));
        let mut marks: Vec<Instant> = (0..PODS)
            .filter(|i| i % POOLS == p)
            .filter_map(|i| marked.get(&format!("job-{i}")).copied())
            .collect();
        marks.sort();
        unserved += PODS / POOLS - marks.len();
        let starts = starts_by_pool.get(&pool).cloned().unwrap_or_default();
        let mut capacity = 0;
        let mut calls = starts.iter();
        let mut at = None;
        for (k, mark) in marks.iter().enumerate() {
            while capacity <= k {
                match calls.next() {
                    Some((t, n)) => {
                        capacity += n * per_node_max;
                        at = Some(*t);
                    }
                    None => {
                        at = None;
                        break;
                    }
                }
            }
            match at {
                Some(t) if capacity > k => {
                    if t < *mark {
                        ahead += 1;
                    }
                    latencies.push(t.saturating_duration_since(*mark));
                }
                _ => unserved += 1,
            }
        }
    }
    println!(
        "decision: {ahead} pods were served by capacity started before their own mark (at most {per_node_max} pods per node)"
    );
    latencies.sort();
    // What the batch window adds is the burst's own spread; after its last pod, only the
    // idle window and the decision itself remain.
    if let Some(last) = marked.values().max() {
        let after: Vec<_> = starts_by_pool
            .values()
            .filter_map(|s| s.iter().map(|(t, _)| *t).find(|t| *t >= *last))
            .map(|t| t - *last)
            .collect();
        if let Some(worst) = after.iter().max() {
            println!(
                "decision: StartInstances issued at most {} after the burst's last pod was marked unschedulable",
                ms(*worst)
            );
        }
    }

    let nodes: usize = starts_by_pool
        .values()
        .flat_map(|s| s.iter().map(|(_, n)| n))
        .sum();
    println!(
        "decision: latency p50 {} · p99 {} · max {} ({} pods measured, {} not matched to a start)",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or_default()),
        latencies.len(),
        unserved
    );
    println!(
        "decision: StartInstances calls: {} (nodes per call {:?}, {} nodes); DescribeInstances during the burst: {describes}",
        start_calls.len(),
        start_calls.iter().map(|c| c.ids.len()).collect::<Vec<_>>(),
        nodes
    );
    cluster.invariants.assert_held().await;
    println!("decision: SPEC §11 invariants held");
    let p99 = percentile(&latencies, 0.99) <= Duration::from_millis(100);
    let few_calls = start_calls.len() <= 3;
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "decision: p99 ≤ 100 ms: {} · ≤ 3 StartInstances: {} · no DescribeInstances during the burst: {} · every pod served: {}",
        verdict(p99),
        verdict(few_calls),
        verdict(describes == 0),
        verdict(unserved == 0)
    );
    p99 && few_calls && describes == 0 && unserved == 0
}

fn stratos_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("STRATOS_BIN") {
        return Some(p.into());
    }
    // target/<profile>/examples/bench → target/<profile>/stratos
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("stratos");
    bin.is_file().then_some(bin)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn memory() -> bool {
    const NODES: usize = 5_000;
    const PODS_TOTAL: usize = 50_000;
    let Some(binary) = stratos_binary() else {
        println!("memory: skipped: build the binary first (cargo build --bin stratos)");
        return false;
    };
    let Some(moto) = testkit::moto::Moto::start() else {
        println!("memory: skipped: moto_server not installed");
        return false;
    };
    let server = testkit::apiserver::ApiServer::start_with_repo_crds().await;
    let client = server.client();
    let t0 = Instant::now();
    let nodes: Api<Node> = Api::all(client.clone());
    create_all(
        &nodes,
        (0..NODES).map(|i| {
            json!({
                "metadata": {"name": format!("ip-10-1-{}-{}.ec2.internal", i / 250, i % 250),
                    "labels": {"kubernetes.io/os": "linux", "node.kubernetes.io/instance-type": "m5.2xlarge", "topology.kubernetes.io/zone": "us-east-1a"}},
                "spec": {"providerID": format!("aws:///us-east-1a/i-{i:017x}")},
                "status": {"allocatable": {"cpu": "7920m", "memory": "29Gi", "pods": "58"}, "capacity": {"cpu": "8", "memory": "32Gi", "pods": "58"},
                    "conditions": [{"type": "Ready", "status": "True"}]}
            })
        }),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    create_all(
        &pods,
        (0..PODS_TOTAL).map(|i| {
            json!({
                "metadata": {"name": format!("app-{i}"), "namespace": "default",
                    "labels": {"app": format!("app-{}", i % 100), "pod-template-hash": "5d8f9c7b6"}},
                "spec": {
                    "nodeName": format!("ip-10-1-{}-{}.ec2.internal", (i % NODES) / 250, (i % NODES) % 250),
                    "containers": [{"name": "app", "image": "registry.example.com/team/app:1.2.3",
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                        "env": [{"name": "MODE", "value": "production"}]}]
                }
            })
        }),
    )
    .await;
    println!(
        "memory: {NODES} nodes and {PODS_TOTAL} pods created in {:.0}s",
        t0.elapsed().as_secs_f64()
    );
    let log = std::env::temp_dir().join(format!("stratos-bench-{}.log", std::process::id()));
    let mut child = std::process::Command::new(&binary)
        .args([
            "run",
            "--cluster-name=bench",
            "--region=us-east-1",
            &format!("--aws-endpoint-url={}", moto.endpoint()),
            "--metrics-addr=127.0.0.1:0",
            "--health-addr=127.0.0.1:0",
            "--leader-elect=false",
        ])
        .env_clear()
        .env("KUBECONFIG", server.kubeconfig_path())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(std::env::var("MALLOC_ARENA_MAX").map(|v| ("MALLOC_ARENA_MAX", v)))
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("caches synced") {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) || child.try_wait().unwrap().is_some() {
            println!("memory: the operator did not sync its caches:\n{text}");
            let _ = child.kill();
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "memory: caches synced {:.1}s after start",
        started.elapsed().as_secs_f64()
    );
    // A few reconcile rounds over the full caches, sampling the peak.
    let mut peak = 0;
    let mut samples = Vec::new();
    let cpu_before = cpu_seconds(child.id());
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = rss_kib(child.id()).unwrap_or(0);
        samples.push(rss / 1024);
        peak = peak.max(rss);
    }
    println!("memory: RSS samples (MiB, every 0.5 s): {samples:?}");
    if let (Some(a), Some(b)) = (cpu_before, cpu_seconds(child.id())) {
        println!("memory: CPU {:.3} core over those 10 s", (b - a) / 10.0);
    }
    let _ = child.kill();
    let _ = child.wait();
    let mib = peak as f64 / 1024.0;
    let ok = mib < 150.0;
    println!(
        "memory: peak RSS {mib:.1} MiB with {NODES} nodes and {PODS_TOTAL} pods cached ({}): target < 150 MiB {}",
        binary.display(),
        if ok { "met" } else { "NOT met" }
    );
    ok
}

/// CPU seconds (user + system) the process has used, from /proc/<pid>/stat.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ: the kernel reports these in hundredths of a second on every Linux ABI.
    Some(ticks / 100.0)
}

/// The `le` buckets of one histogram series in a Prometheus text exposition.
fn buckets(text: &str, family: &str, label: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{family}_bucket{{");
    let mut out: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// `histogram_quantile` over the observations made between two scrapes: linear within the
/// bucket, as Prometheus computes it.
fn quantile_between(before: &str, after: &str, family: &str, label: &str, q: f64) -> (f64, f64) {
    let a = buckets(after, family, label);
    let b = buckets(before, family, label);
    let delta: Vec<(f64, f64)> = a
        .iter()
        .map(|(le, n)| {
            let prior = b
                .iter()
                .find(|(l, _)| l == le)
                .map(|(_, c)| *c)
                .unwrap_or(0.0);
            (*le, n - prior)
        })
        .collect();
    let total = delta.last().map(|(_, n)| *n).unwrap_or(0.0);
    if total == 0.0 {
        return (0.0, 0.0);
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (le, n) in &delta {
        if *n >= rank {
            if le.is_infinite() {
                return (lower.0, total);
            }
            let within = if n - lower.1 > 0.0 {
                (rank - lower.1) / (n - lower.1)
            } else {
                1.0
            };
            return (lower.0 + (le - lower.0) * within, total);
        }
        lower = (*le, *n);
    }
    (lower.0, total)
}

/// A counter's value summed over the series whose labels contain `label`.
fn counter(text: &str, family: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// CPU seconds of this process's threads whose name starts with `prefix`.
fn thread_cpu_seconds(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut total = 0.0;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
            .sum();
        // USER_HZ: the kernel reports these in hundredths of a second on every Linux ABI.
        total += ticks / 100.0;
    }
    total
}

/// Each pool's counts, as `kubectl get np` would show them.
fn counts(statuses: &[stratos::api::NodePoolStatus]) -> String {
    statuses
        .iter()
        .map(|s| {
            format!(
                "standby {} running {} starting {} warmup {} draining {} total {}",
                s.standby, s.running, s.starting, s.warmup, s.draining, s.total
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// SPEC §12 "controller at scale": the operator runs 10 pools that hold 5,000 instances,
/// 2,000 of them running with pods and 3,000 in standby, 50,000 pods in all, while 100 pod
/// changes a second come and go and pending jobs are served from standby.
///
/// moto cannot hold 5,000 instances at a usable pace (a DescribeInstances took 22 s, a
/// RunInstances 12 s), so this runs the controllers in this process against FakeCloud, on a
/// runtime of their own: their CPU is read from their threads in /proc. RSS cannot be split
/// within one process; the binary's RSS with the same caches is `bench memory`.
async fn scale() -> bool {
    const POOL_SIZE: usize = 500;
    const RUNNING_PER_POOL: usize = 200;
    /// Of the running nodes, these carry the long-lived pods; the rest one job each.
    const SERVICE_PER_POOL: usize = 150;
    const SERVICE_PODS: usize = 48_000;
    const CHURN_SECS: u64 = 60;
    let mut options = ClusterOptions::default();
    // 5,000 launches and 2,000 starts fit in minutes only with raised limits (EC2's
    // instance buckets refill 2 a second); the churn itself stays within the defaults.
    options.cloud.limits = Some(stratos::cloud::ratelimit::Limits::default().scaled(20.0));
    options.kubelet.tick = Duration::from_millis(500);
    options.kubelet.poweroff_after_ready = Some(Duration::from_millis(500));
    let cluster = TestCluster::start(options).await;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("stratos-op")
        .enable_all()
        .build()
        .unwrap();
    let production = stratos::controller::OperatorConfig::new("bench");
    let operator = cluster.start_operator_on(runtime.handle(), |c| {
        c.listing_ttl = production.listing_ttl;
        c.resync = production.resync;
        c.gc_interval = production.gc_interval;
        c.node_gc_grace = production.node_gc_grace;
    });
    let standby = POOL_SIZE - RUNNING_PER_POOL;
    cluster
        .apply_yaml(&pools_yaml(
            POOL_SIZE,
            standby,
            "  scaleDown:\n    emptyNodeTTL: 10s\n",
        ))
        .await;
    let pools: Api<stratos::api::NodePool> = Api::all(cluster.client.clone());
    let t0 = Instant::now();
    let wait_pools = |what: &'static str, want: fn(&stratos::api::NodePoolStatus) -> bool| {
        let pools = pools.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(900);
            loop {
                let list = pools
                    .list(&Default::default())
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default();
                let statuses: Vec<_> = list
                    .iter()
                    .map(|p| p.status.clone().unwrap_or_default())
                    .collect();
                if statuses.len() == POOLS && statuses.iter().all(want) {
                    return true;
                }
                if Instant::now() > deadline {
                    println!("scale: {what} not reached: {}", counts(&statuses));
                    return false;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    if !wait_pools("standby", |s| s.standby == 300 && s.warmup == 0).await {
        return false;
    }
    println!(
        "scale: {} standby nodes warm after {:.0}s",
        POOLS * standby,
        t0.elapsed().as_secs_f64()
    );

    // Jobs that take a whole node each: 200 per pool, started from standby; the pools
    // replenish their standby to 300 meanwhile.
    let pods = cluster.pods();
    let job = |pool: usize, n: usize| {
        cluster.scoped(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("job-{pool}-{n}"), "labels": {"app": "job"}},
            "spec": {
                "nodeSelector": {"stratos.sh/pool": format!("pool-{pool}")},
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "c", "image": "runner:1", "resources": {"requests": {"cpu": "6"}}}]
            }
        }))
    };
    create_all(
        &pods,
        (0..POOLS)
            .flat_map(|p| (0..RUNNING_PER_POOL).map(move |n| (p, n)))
            .map(|(p, n)| job(p, n)),
    )
    .await;
    if !wait_pools("running", |s| {
        s.running == 200 && s.standby == 300 && s.warmup == 0 && s.starting == 0
    })
    .await
    {
        return false;
    }
    println!(
        "scale: {} running and {} standby after {:.0}s",
        POOLS * RUNNING_PER_POOL,
        POOLS * standby,
        t0.elapsed().as_secs_f64()
    );

    // Long-lived pods fill 150 running nodes of each pool; the other 50 hold one job each,
    // which the churn replaces.
    let list = pods.list(&Default::default()).await.unwrap().items;
    let mut service_nodes = Vec::new();
    let mut churn_jobs: std::collections::VecDeque<String> = Default::default();
    for p in 0..POOLS {
        let mut on: Vec<(String, String)> = list
            .iter()
            .filter(|pod| pod.name_any().starts_with(&format!("job-{p}-")))
            .filter_map(|pod| Some((pod.spec.as_ref()?.node_name.clone()?, pod.name_any())))
            .collect();
        on.sort();
        for (i, (node, pod)) in on.into_iter().enumerate() {
            if i < SERVICE_PER_POOL {
                service_nodes.push(node);
            } else {
                churn_jobs.push_back(pod);
            }
        }
    }
    let service = |n: usize| {
        cluster.scoped(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("app-{n}"),
                "labels": {"app": format!("app-{}", n % 100), "pod-template-hash": "5d8f9c7b6"}},
            "spec": {
                "nodeName": service_nodes[n % service_nodes.len()],
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "app", "image": "registry.example.com/team/app:1.2.3",
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                    "env": [{"name": "MODE", "value": "production"}]}]
            }
        }))
    };
    create_all(&pods, (0..SERVICE_PODS).map(service)).await;
    println!(
        "scale: {} pods in the cluster after {:.0}s",
        SERVICE_PODS + POOLS * RUNNING_PER_POOL,
        t0.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(10)).await;

    // Churn: each second 40 long-lived pods replaced (80 changes) and 10 jobs replaced by
    // pending ones in the next pool (20 changes): 100 pod changes a second.
    let before = operator.metrics.render();
    let calls_before = cluster.cloud.calls().len();
    let cpu_start = thread_cpu_seconds("stratos-op");
    let mut cpu_last = cpu_start;
    let mut per_second = Vec::new();
    let mut rss = Vec::new();
    let churn_start = Instant::now();
    let mut next_app = SERVICE_PODS;
    let mut next_job = 0usize;
    let mut oldest_app = 0usize;
    for second in 0..CHURN_SECS {
        let tick = churn_start + Duration::from_secs(second + 1);
        let gone: Vec<String> = (oldest_app..oldest_app + 40)
            .map(|n| format!("app-{n}"))
            .chain((0..10).filter_map(|_| churn_jobs.pop_front()))
            .collect();
        oldest_app += 40;
        futures::stream::iter(gone)
            .map(|n| {
                let pods = pods.clone();
                async move {
                    let _ = pods.delete(&n, &Default::default()).await;
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        let fresh: Vec<serde_json::Value> = (next_app..next_app + 40)
            .map(service)
            .chain((0..10).map(|i| {
                let p = (next_job + i) % POOLS;
                let j = job(p, RUNNING_PER_POOL + next_job + i);
                churn_jobs.push_back(j["metadata"]["name"].as_str().unwrap().to_owned());
                j
            }))
            .collect();
        next_app += 40;
        next_job += 10;
        create_all(&pods, fresh.into_iter()).await;
        tokio::time::sleep_until(tick).await;
        let cpu = thread_cpu_seconds("stratos-op");
        per_second.push(cpu - cpu_last);
        cpu_last = cpu;
        rss.push(rss_kib(std::process::id()).unwrap_or(0) as f64 / 1024.0);
    }
    let window = churn_start.elapsed().as_secs_f64();
    let after = operator.metrics.render();
    let calls: Vec<_> = cluster
        .cloud
        .calls()
        .into_iter()
        .skip(calls_before)
        .collect();
    let statuses: Vec<_> = pools
        .list(&Default::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.status.unwrap_or_default())
        .collect();
    let mean_cpu = (cpu_last - cpu_start) / window;
    per_second.sort_by(f64::total_cmp);
    let p99_cpu = per_second[((per_second.len() as f64 - 1.0) * 0.99).round() as usize];
    let peak = rss.iter().copied().fold(0.0, f64::max);
    println!(
        "scale: churn {CHURN_SECS}s at 100 pod changes/s: operator CPU mean {mean_cpu:.3} core, p99 {p99_cpu:.2} core (per second, its threads in /proc); whole process RSS peak {peak:.0} MiB (API server, scheduler, kubelets and operator together)"
    );
    let mut round_p99 = f64::INFINITY;
    for controller in ["nodepool", "scaleup"] {
        let label = format!("controller=\"{controller}\"");
        for family in [
            "stratos_reconcile_duration_seconds",
            "stratos_decision_duration_seconds",
        ] {
            let (p50, n) = quantile_between(&before, &after, family, &label, 0.5);
            let (p99, _) = quantile_between(&before, &after, family, &label, 0.99);
            println!(
                "scale: {family}{{{label}}}: {n:.0} rounds, p50 {:.1} ms, p99 {:.1} ms",
                p50 * 1000.0,
                p99 * 1000.0
            );
            if family == "stratos_reconcile_duration_seconds" && controller == "nodepool" {
                round_p99 = p99;
            }
        }
    }
    let mut per_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for c in &calls {
        let e = per_kind.entry(c.operation.as_str()).or_default();
        e.0 += 1;
        e.1 += c.ids.len();
    }
    println!("scale: cloud calls during the churn (calls, instances): {per_kind:?}");
    let scale_ups = counter(&after, "stratos_scale_up_nodes_total", "source=\"standby\"")
        - counter(
            &before,
            "stratos_scale_up_nodes_total",
            "source=\"standby\"",
        );
    let scale_downs = counter(&after, "stratos_scale_downs_total", "pool=")
        - counter(&before, "stratos_scale_downs_total", "pool=");
    println!(
        "scale: during the churn {scale_ups:.0} nodes started from standby for pending jobs, {scale_downs:.0} drained back"
    );
    println!("scale: pools at the end: {}", counts(&statuses));
    cluster.invariants.assert_held().await;
    println!("scale: SPEC §11 invariants held");
    operator.kill();
    runtime.shutdown_background();
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let cpu_ok = mean_cpu < 0.25;
    let round_ok = round_p99 < 0.05;
    println!(
        "scale: mean CPU < 0.25 core: {} · round p99 < 50 ms: {} · RSS: see `bench memory`",
        verdict(cpu_ok),
        verdict(round_ok)
    );
    cpu_ok && round_ok
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
    let mut ok = true;
    if which.is_empty() || which == "decision" {
        ok &= decision().await;
    }
    if which.is_empty() || which == "memory" {
        ok &= memory().await;
    }
    if which.is_empty() || which == "scale" {
        ok &= scale().await;
    }
    std::process::exit(if ok { 0 } else { 1 });
}
