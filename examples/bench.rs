//! SPEC §12 benchmarks, against FakeCloud and the embedded API server.
//!
//!     cargo run --release --example bench            # both
//!     cargo run --release --example bench decision   # burst decision latency
//!     cargo run --release --example bench memory     # controller RSS with big caches
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
    let mut yaml = String::new();
    for i in 0..POOLS {
        yaml.push_str(&format!(
            "apiVersion: stratos.sh/v1alpha1\nkind: AWSNodeClass\nmetadata:\n  name: class-{i}\nspec:\n  instanceType: m5.2xlarge\n  ami: ami-0123456789abcdef0\n  subnetIds: [\"subnet-12345678\"]\n  securityGroupIds: [\"sg-12345678\"]\n  iamInstanceProfile: node-role\n---\napiVersion: stratos.sh/v1alpha1\nkind: NodePool\nmetadata:\n  name: pool-{i}\nspec:\n  poolSize: 20\n  minStandby: {NODES_PER_POOL}\n  template:\n    nodeClassRef:\n      kind: AWSNodeClass\n      name: class-{i}\n    labels:\n      stratos.sh/pool: pool-{i}\n---\n"
        ));
    }
    cluster.apply_yaml(&yaml).await;
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
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = rss_kib(child.id()).unwrap_or(0);
        samples.push(rss / 1024);
        peak = peak.max(rss);
    }
    println!("memory: RSS samples (MiB, every 0.5 s): {samples:?}");
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
    std::process::exit(if ok { 0 } else { 1 });
}
