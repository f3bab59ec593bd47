//! The `stratos` binary as it runs in a cluster (SPEC §8): two replicas elect a leader on a
//! Lease, only the leader acts, a standby takes over when the leader dies, SIGTERM releases
//! the lease at once, and the endpoints serve health and the SPEC §8.1 metrics.
//!
//! Real processes against the embedded API server, its scheduler and kubelet simulator, and
//! the EC2 emulator (moto).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use stratos::api::{AWSNodeClass, NodePool};
use testkit::{
    apiserver::ApiServer,
    controllers::Controllers,
    kubelet::{Ec2Instances, KubeletOptions, KubeletSim},
    moto::{Moto, free_port},
    scheduler::Scheduler,
};

const QUICKSTART: &str = include_str!("../examples/quickstart.yaml");
const NAMESPACE: &str = "kube-system";
const LEASE: &str = "stratos-leader";

/// One `stratos run` process with its own endpoints and log file.
struct Replica {
    name: &'static str,
    child: Child,
    metrics: u16,
    health: u16,
    log: PathBuf,
}

impl Replica {
    fn start(name: &'static str, kubeconfig: &std::path::Path, ec2: &str) -> Replica {
        let (metrics, health) = (free_port(), free_port());
        let log = std::env::temp_dir().join(format!(
            "stratos-operations-{}-{name}.log",
            std::process::id()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_stratos"))
            .args([
                "run",
                "--cluster-name=e2e",
                "--region=us-east-1",
                &format!("--aws-endpoint-url={ec2}"),
                &format!("--metrics-addr=127.0.0.1:{metrics}"),
                &format!("--health-addr=127.0.0.1:{health}"),
                "--log-format=json",
            ])
            .env_clear()
            .env("KUBECONFIG", kubeconfig)
            .env("HOME", std::env::temp_dir())
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", NAMESPACE)
            .env("RUST_LOG", "info,kube_lease_manager=warn")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Replica {
            name,
            child,
            metrics,
            health,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, port: u16, path: &str) -> Option<(u16, String)> {
        get(port, path)
    }

    fn readyz(&self) -> Option<u16> {
        self.get(self.health, "/readyz").map(|(code, _)| code)
    }

    fn scrape(&self) -> String {
        self.get(self.metrics, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {}", self.name);
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.name, self.log());
        }
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1: (status, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE)
        .await
        .ok()??
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

async fn pool_status(pools: &Api<NodePool>) -> stratos::api::NodePoolStatus {
    pools
        .get("workers")
        .await
        .ok()
        .and_then(|p| p.status)
        .unwrap_or_default()
}

/// The value of the first sample whose line starts with `series`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_and_the_standby_takes_over() {
    let Some(moto) = Moto::start() else { return };
    let account = moto.account().await;
    let server = ApiServer::start_with_repo_crds().await;
    let client = server.client();
    let _scheduler = Scheduler::start(client.clone());
    let _controllers = Controllers::start(client.clone());
    let _kubelet = KubeletSim::start(
        client.clone(),
        Arc::new(Ec2Instances::new(account.client.clone())),
        KubeletOptions::default(),
    );
    let kubeconfig = server.kubeconfig_path();
    let mut replicas = [
        Replica::start("stratos-a", &kubeconfig, &moto.endpoint()),
        Replica::start("stratos-b", &kubeconfig, &moto.endpoint()),
    ];

    // One leader; both replicas ready (the leader synced, the other a ready standby).
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let first = wait_for("a leader", Duration::from_secs(30), || holder(&leases)).await;
    let (l, s) = if first.starts_with("stratos-a_") {
        (0, 1)
    } else {
        (1, 0)
    };
    let (leader, standby) = (&replicas[l], &replicas[s]);
    println!("leader: {first}");
    wait_for("both replicas ready", Duration::from_secs(30), || async {
        replicas
            .iter()
            .all(|r| r.readyz() == Some(200))
            .then_some(())
    })
    .await;
    assert_eq!(get(leader.health, "/healthz").map(|r| r.0), Some(200));

    // The leader fills the pool; the standby does nothing meanwhile.
    let pp = PatchParams::apply("e2e").force();
    let quickstart = account.localize(QUICKSTART);
    let mut docs = quickstart.split("---");
    let class: serde_json::Value = serde_yaml::from_str(docs.next().unwrap()).unwrap();
    let pool: serde_json::Value = serde_yaml::from_str(docs.next().unwrap()).unwrap();
    Api::<AWSNodeClass>::all(client.clone())
        .patch(
            class["metadata"]["name"].as_str().unwrap(),
            &pp,
            &Patch::Apply(&class),
        )
        .await
        .unwrap();
    let pools: Api<NodePool> = Api::all(client.clone());
    pools
        .patch("workers", &pp, &Patch::Apply(&pool))
        .await
        .unwrap();
    wait_for("3 standby nodes", Duration::from_secs(60), || async {
        let s = pool_status(&pools).await;
        (s.standby == 3 && s.total == 3 && s.warmup == 0).then_some(())
    })
    .await;

    // A pending pod: the leader starts a standby node for it.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "job", "namespace": "default"},
        "spec": {
            "nodeSelector": {"stratos.sh/pool": "workers"},
            "containers": [{"name": "c", "image": "runner:1", "resources": {"requests": {"cpu": "500m"}}}]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    wait_for("the pod running", Duration::from_secs(60), || async {
        let p = pods.get("job").await.ok()?;
        (p.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;

    // The SPEC §8.1 families, from the leader's endpoint, with plausible values.
    let metrics = wait_for("pool gauges updated", Duration::from_secs(30), || async {
        let m = leader.scrape();
        (sample(&m, "stratos_pool_nodes{pool=\"workers\",state=\"running\"}") == Some(1.0))
            .then_some(m)
    })
    .await;
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        if !line.contains("_bucket{") {
            println!("{line}");
        }
    }
    let expect = [
        ("stratos_pool_size{pool=\"workers\"}", 10.0..=10.0),
        ("stratos_pool_min_standby{pool=\"workers\"}", 3.0..=3.0),
        (
            "stratos_pool_nodes{pool=\"workers\",state=\"standby\"}",
            2.0..=3.0,
        ),
        (
            "stratos_warmup_results_total{pool=\"workers\",result=\"completed\"}",
            3.0..=4.0,
        ),
        (
            "stratos_warmup_duration_seconds_count{pool=\"workers\"}",
            3.0..=4.0,
        ),
        (
            "stratos_scale_ups_total{pool=\"workers\",source=\"standby\"}",
            1.0..=1.0,
        ),
        (
            "stratos_scale_up_nodes_total{pool=\"workers\",source=\"standby\"}",
            1.0..=1.0,
        ),
        (
            "stratos_scale_up_decision_seconds_count{pool=\"workers\"}",
            1.0..=1.0,
        ),
        (
            "stratos_scale_up_decision_seconds_sum{pool=\"workers\"}",
            0.000_1..=2.0,
        ),
        (
            "stratos_pod_pending_to_scheduled_seconds_count{pool=\"workers\"}",
            1.0..=1.0,
        ),
        (
            "stratos_node_start_to_ready_seconds_count{pool=\"workers\"}",
            1.0..=1.0,
        ),
        (
            "stratos_cloud_api_calls_total{operation=\"RunInstances\",result=\"success\"}",
            1.0..=2.0,
        ),
        (
            "stratos_cloud_api_calls_total{operation=\"StartInstances\",result=\"success\"}",
            1.0..=1.0,
        ),
        (
            "stratos_cloud_api_call_duration_seconds_count{operation=\"DescribeInstances\"}",
            1.0..=100_000.0,
        ),
    ];
    for (series, range) in expect {
        let v = sample(&metrics, series).unwrap_or_else(|| panic!("{series} missing"));
        assert!(range.contains(&v), "{series} = {v}, expected {range:?}");
    }
    for family in [
        "stratos_drain_duration_seconds",
        "stratos_drain_failures_total",
        "stratos_scale_downs_total",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {family}")),
            "{family} not registered"
        );
    }
    // Only the leader acts: the standby watches (its caches are warm) but its controllers
    // never started, so it reports no pools.
    assert!(!standby.scrape().contains("stratos_pool_nodes{"));
    assert!(
        !standby.log().contains("caches synced"),
        "{}",
        standby.log()
    );

    // The leader dies without a word: the standby takes over within the lease duration.
    let audited_before = server.audit().len();
    let died = Instant::now();
    replicas[l].child.kill().unwrap();
    replicas[l].child.wait().unwrap();
    let standby = &replicas[s];
    let second = wait_for("a new leader", Duration::from_secs(30), || async {
        holder(&leases)
            .await
            .filter(|h| h.starts_with(&format!("{}_", standby.name)))
    })
    .await;
    let takeover = died.elapsed();
    println!(
        "{second} took over {:.1}s after the leader died",
        takeover.as_secs_f64()
    );
    assert!(
        takeover <= Duration::from_secs(15),
        "takeover took {takeover:?}"
    );
    // And it acts: one more standby node on request.
    let mut more = pool.clone();
    more["spec"]["minStandby"] = serde_json::json!(4);
    pools
        .patch("workers", &pp, &Patch::Apply(&more))
        .await
        .unwrap();
    wait_for(
        "the new leader adds a node",
        Duration::from_secs(60),
        || async {
            let st = pool_status(&pools).await;
            (st.standby == 4 && st.warmup == 0).then_some(())
        },
    )
    .await;
    // Its caches were warm: it acted without listing the cluster's pods or nodes again.
    let relists: Vec<String> = server.audit()[audited_before..]
        .iter()
        .filter(|a| a.method == "GET" && (a.path == "/api/v1/pods" || a.path == "/api/v1/nodes"))
        .filter(|a| !a.query.contains("watch=true") && !a.query.contains("watch=1"))
        // One node's pods, read fresh before its instance is stopped (I3): not a re-list.
        .filter(|a| !a.query.contains("fieldSelector=spec.nodeName"))
        .map(|a| format!("{}?{}", a.path, a.query))
        .collect();
    println!("lists of pods or nodes after the takeover: {relists:?}");
    assert!(relists.is_empty(), "the new leader re-listed: {relists:?}");

    // SIGTERM: the lease is released at once and the process exits cleanly.
    let term = Instant::now();
    replicas[s].sigterm();
    wait_for("the lease released", Duration::from_secs(5), || async {
        holder(&leases).await.is_none().then_some(())
    })
    .await;
    println!(
        "lease released {:.2}s after SIGTERM",
        term.elapsed().as_secs_f64()
    );
    let status = wait_for("the process exits", Duration::from_secs(20), || {
        let st = replicas[s].child.try_wait().unwrap();
        async move { st }
    })
    .await;
    assert!(status.success(), "exit status {status:?}");
    let log = replicas[s].log();
    assert!(log.contains("released the leader lease"), "{log}");
}

/// Runs `run_elected` in the background; returns (became-leader signal, controllers-stopped
/// signal, the election's outcome).
#[allow(clippy::type_complexity)]
fn elect(
    client: kube::Client,
    config: stratos::leader::LeaderConfig,
) -> (
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Receiver<()>,
    tokio::task::JoinHandle<Result<stratos::leader::Outcome, stratos::leader::LeaderError>>,
) {
    let (leading_tx, leading_rx) = tokio::sync::oneshot::channel();
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        stratos::leader::run_elected(
            client,
            &config,
            stratos::http::Health::new(),
            futures::future::pending::<()>(),
            |stop| async move {
                let _ = leading_tx.send(());
                stop.await;
                let _ = stopped_tx.send(());
            },
        )
        .await
    });
    (leading_rx, stopped_rx, task)
}

fn lease_config(duration: u64) -> stratos::leader::LeaderConfig {
    stratos::leader::LeaderConfig {
        lease_name: LEASE.into(),
        namespace: "default".into(),
        identity: stratos::leader::identity(),
        lease_duration: Duration::from_secs(duration),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stops_acting_when_another_holds_the_lease() {
    let server = ApiServer::start_with_repo_crds().await;
    let (leading, stopped, election) = elect(server.client(), lease_config(6));
    tokio::time::timeout(Duration::from_secs(10), leading)
        .await
        .expect("leads")
        .unwrap();
    // Someone else takes the lease (e.g. after a long pause of this process).
    let leases: Api<Lease> = Api::namespaced(server.client(), "default");
    let taken = Instant::now();
    leases
        .patch(
            LEASE,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {
                "holderIdentity": "intruder",
                "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now()),
                "leaseDurationSeconds": 6,
            }})),
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("the controllers stop")
        .unwrap();
    let outcome = election.await.unwrap();
    println!(
        "stopped {:.1}s after the lease was taken: {outcome:?}",
        taken.elapsed().as_secs_f64()
    );
    assert!(matches!(outcome, Err(stratos::leader::LeaderError::Lost)));
}

/// A TCP forwarder to the API server that can be cut: every open connection is dropped and
/// new ones are refused, as when a network partition isolates the leader.
struct Partition {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Partition {
    async fn start(upstream: std::net::SocketAddr) -> Partition {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut down, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Partition { addr, task }
    }

    /// Drops the listener and, with the JoinSet, every forwarded connection.
    fn cut(&self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_server_stops_before_its_lease_expires() {
    let server = ApiServer::start_with_repo_crds().await;
    let upstream: std::net::SocketAddr = server
        .url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let partition = Partition::start(upstream).await;
    let mut config = server.config();
    config.cluster_url = format!("http://{}", partition.addr).parse().unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let (leading, stopped, election) = elect(client, lease_config(6));
    tokio::time::timeout(Duration::from_secs(10), leading)
        .await
        .expect("leads")
        .unwrap();
    let leases: Api<Lease> = Api::namespaced(server.client(), "default");
    let lease = leases.get(LEASE).await.unwrap().spec.unwrap();
    let expiry =
        std::time::SystemTime::from(lease.renew_time.clone().unwrap().0) + Duration::from_secs(6);
    partition.cut();
    // No renewal can land: the controllers must stop before the lease could pass to a
    // standby, i.e. before its expiry.
    tokio::time::timeout(Duration::from_secs(20), stopped)
        .await
        .expect("the controllers stop")
        .unwrap();
    let now = std::time::SystemTime::now();
    assert!(
        now < expiry + Duration::from_millis(500),
        "stopped {:?} after the expiry",
        now.duration_since(expiry).unwrap_or_default()
    );
    let still = leases.get(LEASE).await.unwrap().spec.unwrap();
    assert_eq!(
        still.renew_time, lease.renew_time,
        "no renewal landed through the partition"
    );
    let outcome = tokio::time::timeout(Duration::from_secs(10), election)
        .await
        .expect("returns")
        .unwrap();
    assert!(matches!(outcome, Err(stratos::leader::LeaderError::Lost)));
}
