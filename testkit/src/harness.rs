//! The end-to-end harness: one call starts an API server (or connects to a real cluster),
//! the simulated control plane, a FakeCloud and its kubelets, and the invariant checks.
//!
//! With `STRATOS_E2E_KUBECONFIG` set, the tests run against that cluster's API server,
//! scheduler and controllers instead; the simulator then plays only the nodes and the cloud.

use std::{fmt::Write as _, path::PathBuf, sync::Arc, time::Duration};

use k8s_openapi::{
    api::core::v1::{Node, Pod},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::Value;
use stratos::{
    api::NodePool,
    cloud::{
        CloudProvider,
        fake::{FakeCloud, FakeCloudConfig},
        tags,
    },
    controller::OperatorConfig,
    metrics::PoolMetrics,
};

use crate::{
    apiserver::{ApiServer, repo_crds},
    controllers::Controllers,
    invariants::Invariants,
    kubelet::{KubeletOptions, KubeletSim},
    scheduler::Scheduler,
};

/// Environment variable naming a real cluster's kubeconfig.
pub const E2E_KUBECONFIG: &str = "STRATOS_E2E_KUBECONFIG";

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub cluster_name: String,
    pub cloud: FakeCloudConfig,
    pub kubelet: KubeletOptions,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            cluster_name: "e2e".into(),
            cloud: FakeCloudConfig {
                cluster: "e2e".into(),
                pending_to_running: Duration::from_millis(300),
                stopping_to_stopped: Duration::from_millis(200),
                shutting_down_to_terminated: Duration::from_millis(200),
                ..Default::default()
            },
            kubelet: KubeletOptions::default(),
        }
    }
}

pub struct TestCluster {
    /// `None` when running against a real cluster.
    pub server: Option<ApiServer>,
    pub client: Client,
    config: kube::Config,
    pub cloud: Arc<FakeCloud>,
    pub cluster_name: String,
    pub invariants: Invariants,
    kubeconfig: PathBuf,
    _scheduler: Option<Scheduler>,
    _controllers: Option<Controllers>,
    _kubelet: KubeletSim,
}

impl TestCluster {
    pub async fn start(options: ClusterOptions) -> TestCluster {
        // `RUST_LOG=stratos=debug cargo test ...` shows the operator's log lines.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .try_init();
        let (server, client, kube_config, kubeconfig, scheduler, controllers) =
            match std::env::var_os(E2E_KUBECONFIG) {
                Some(path) => {
                    let path = PathBuf::from(path);
                    let kubeconfig =
                        Kubeconfig::read_from(&path).expect("read STRATOS_E2E_KUBECONFIG");
                    let config = kube::Config::from_custom_kubeconfig(
                        kubeconfig,
                        &KubeConfigOptions::default(),
                    )
                    .await
                    .expect("load STRATOS_E2E_KUBECONFIG");
                    let client = Client::try_from(config.clone()).expect("client");
                    install_crds(&client).await;
                    (None, client, config, path, None, None)
                }
                None => {
                    let server = ApiServer::start_with_repo_crds().await;
                    let client = server.client();
                    let path = server.kubeconfig_path();
                    let scheduler = Scheduler::start(client.clone());
                    let controllers = Controllers::start(client.clone());
                    let config = server.config();
                    (
                        Some(server),
                        client,
                        config,
                        path,
                        Some(scheduler),
                        Some(controllers),
                    )
                }
            };
        let mut cloud_config = options.cloud.clone();
        cloud_config.cluster = options.cluster_name.clone();
        let cloud = Arc::new(FakeCloud::new(cloud_config));
        // The network of the examples (examples/*.yaml), plus two more zones.
        cloud.add_subnet("subnet-12345678", "us-east-1a");
        cloud.add_subnet("subnet-22345678", "us-east-1b");
        cloud.add_subnet("subnet-32345678", "us-east-1c");
        cloud.add_security_group("sg-12345678");
        cloud.add_image("ami-0123456789abcdef0");
        let kubelet = KubeletSim::start(client.clone(), cloud.clone(), options.kubelet.clone());
        let probe = server.as_ref().map(|s| s.resource_version_probe());
        let invariants =
            Invariants::start(client.clone(), &cloud, &options.cluster_name, probe).await;
        TestCluster {
            server,
            client,
            config: kube_config,
            cloud,
            cluster_name: options.cluster_name,
            invariants,
            kubeconfig,
            _scheduler: scheduler,
            _controllers: controllers,
            _kubelet: kubelet,
        }
    }

    /// Runs the real Stratos controllers in this process, against this cluster and its
    /// FakeCloud. Dropping (or [`Operator::kill`]ing) the handle stops them at once, like a
    /// crashed pod.
    pub fn start_operator(&self) -> Operator {
        // The operator's own clients, named like the binary's, so audits can tell its calls.
        let mut operator_config = self.config.clone();
        stratos::preflight::identify(&mut operator_config);
        let client = Client::try_from(operator_config.clone()).expect("operator client");
        let mut eviction_config = operator_config;
        eviction_config.default_retry = false;
        let eviction = Client::try_from(eviction_config).expect("eviction client");
        let mut config = OperatorConfig::new(&self.cluster_name);
        config.prepull_image = "stratos:e2e".into();
        config.resync = Duration::from_secs(2);
        config.listing_ttl = Duration::from_millis(300);
        config.gc_interval = Duration::from_secs(1);
        config.node_gc_grace = Duration::from_secs(5);
        let cloud: Arc<dyn CloudProvider> = self.cloud.clone();
        let metrics = Arc::new(PoolMetrics::detached());
        let task = tokio::spawn(stratos::controller::run(
            client,
            eviction,
            cloud,
            config,
            metrics.clone(),
            stratos::http::Health::new(),
            futures::future::pending(),
        ));
        Operator { task, metrics }
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        self.kubeconfig.clone()
    }

    /// Server-side applies every document of a YAML stream (NodePool, AWSNodeClass and any
    /// built-in kind the harness knows).
    pub async fn apply_yaml(&self, yaml: &str) {
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("yaml");
            let value: Value = serde_json::to_value(value).expect("json");
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_default().to_owned();
            let name = value["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let ns = value["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned();
            let pp = PatchParams::apply("stratos-e2e").force();
            let result = match kind.as_str() {
                "NodePool" => match Api::<NodePool>::all(self.client.clone())
                    .patch(&name, &pp, &Patch::Apply(&value))
                    .await
                {
                    Ok(pool) => {
                        self.invariants
                            .wait_for_pool(&name, pool.metadata.generation.unwrap_or(1))
                            .await;
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                "AWSNodeClass" => Api::<stratos::api::AWSNodeClass>::all(self.client.clone())
                    .patch(&name, &pp, &Patch::Apply(&value))
                    .await
                    .map(|_| ()),
                "Pod" => Api::<Pod>::namespaced(self.client.clone(), &ns)
                    .patch(&name, &pp, &Patch::Apply(&value))
                    .await
                    .map(|_| ()),
                "DaemonSet" => Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(
                    self.client.clone(),
                    &ns,
                )
                .patch(&name, &pp, &Patch::Apply(&value))
                .await
                .map(|_| ()),
                "PodDisruptionBudget" => {
                    Api::<k8s_openapi::api::policy::v1::PodDisruptionBudget>::namespaced(
                        self.client.clone(),
                        &ns,
                    )
                    .patch(&name, &pp, &Patch::Apply(&value))
                    .await
                    .map(|_| ())
                }
                other => panic!("apply_yaml does not know kind {other}"),
            };
            result.unwrap_or_else(|e| panic!("apply {kind}/{name}: {e}"));
        }
    }

    /// Waits until pod `default/name` runs; returns its node.
    pub async fn running_node_of(&self, name: &str, timeout: Duration) -> String {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "default");
        self.wait_for(&format!("pod {name} running"), timeout, || async {
            let p = pods.get(name).await.ok()?;
            (p.status.as_ref()?.phase.as_deref() == Some("Running"))
                .then(|| p.spec?.node_name)
                .flatten()
        })
        .await
    }

    /// Marks `node` as Stratos does when a drain begins (state, start time, cordon): the
    /// race where a pod lands on a node just as its drain starts.
    pub async fn begin_drain(&self, node: &str) {
        let patch = serde_json::json!({
            "metadata": {
                "labels": {stratos::api::nodepool::STATE_LABEL: "draining"},
                "annotations": {
                    stratos::controller::nodepool::DRAINING_SINCE: jiff::Timestamp::now().to_string(),
                },
            },
            "spec": {"unschedulable": true},
        });
        Api::<Node>::all(self.client.clone())
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("mark the node draining");
    }

    /// Polls `check` until it returns `Some`, or fails with `what` and a dump of the cluster.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = check().await {
                return v;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.dump().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A readable picture of the cluster and the cloud, for failure messages.
    pub async fn dump(&self) -> String {
        let mut out = String::from("--- cluster state ---\n");
        if let Ok(pools) = Api::<NodePool>::all(self.client.clone())
            .list(&ListParams::default())
            .await
        {
            for p in pools {
                let s = p.status.clone().unwrap_or_default();
                let _ = writeln!(
                    out,
                    "nodepool {} size={} minStandby={} warmup={} standby={} starting={} running={} draining={} total={}",
                    p.name_any(),
                    p.spec.pool_size,
                    p.spec.min_standby,
                    s.warmup,
                    s.standby,
                    s.starting,
                    s.running,
                    s.draining,
                    s.total
                );
            }
        }
        if let Ok(nodes) = Api::<Node>::all(self.client.clone())
            .list(&ListParams::default())
            .await
        {
            for n in nodes {
                let labels = n.labels();
                let ready = n
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                    .map(|c| c.status.clone())
                    .unwrap_or_default();
                let spec = n.spec.clone().unwrap_or_default();
                let taints: Vec<String> = spec
                    .taints
                    .unwrap_or_default()
                    .iter()
                    .map(|t| format!("{}:{}", t.key, t.effect))
                    .collect();
                let _ = writeln!(
                    out,
                    "node {} pool={} state={} ready={ready} unschedulable={} taints={taints:?}",
                    n.name_any(),
                    labels.get(tags::POOL).map(String::as_str).unwrap_or("-"),
                    labels.get(tags::STATE).map(String::as_str).unwrap_or("-"),
                    spec.unschedulable.unwrap_or(false)
                );
            }
        }
        if let Ok(pods) = Api::<Pod>::all(self.client.clone())
            .list(&ListParams::default())
            .await
        {
            for p in pods {
                let phase = p
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.clone())
                    .unwrap_or_default();
                let node = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "pod {}/{} node={node} phase={phase}",
                    p.namespace().unwrap_or_default(),
                    p.name_any()
                );
            }
        }
        for i in self.cloud.all_instances() {
            let _ = writeln!(
                out,
                "instance {} {} pool={} state-tag={} zone={}",
                i.id,
                i.state,
                i.tag(tags::POOL).unwrap_or("-"),
                i.tag(tags::STATE).unwrap_or("-"),
                i.zone
            );
        }
        let violations = self.invariants.violations();
        if !violations.is_empty() {
            let _ = writeln!(out, "invariant violations: {violations:#?}");
        }
        out
    }

    /// `kubectl <args>` against this cluster, when kubectl is available.
    pub fn kubectl(&self, args: &[&str]) -> Option<String> {
        let kubectl = crate::tools::kubectl()?;
        let out = std::process::Command::new(kubectl)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .ok()?;
        Some(
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

/// The in-process operator started by [`TestCluster::start_operator`].
pub struct Operator {
    task: tokio::task::JoinHandle<()>,
    /// The operator's pool metrics.
    pub metrics: Arc<PoolMetrics>,
}

impl Operator {
    /// Stops the controllers at once, wherever they are.
    pub fn kill(self) {
        self.task.abort();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Installs (server-side applies) the committed CRDs into a real cluster and waits until
/// they are established.
async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in repo_crds() {
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply("stratos-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("install CRD {name}: {e}"));
        for _ in 0..100 {
            let established = api
                .get(&name)
                .await
                .ok()
                .and_then(|c| c.status)
                .and_then(|s| s.conditions)
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
