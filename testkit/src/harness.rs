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
        fake::{CallRecord, FakeCloud, FakeCloudConfig},
        ratelimit::Operation,
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
    scheduler::{Scheduler, SchedulerOptions},
};

/// Environment variable naming a real cluster's kubeconfig.
pub const E2E_KUBECONFIG: &str = "STRATOS_E2E_KUBECONFIG";

/// Label on every object a test creates (and on its pools' nodes): the test's id. The
/// test's operator manages only pools with its own value (`--pool-selector`), and the
/// test's pods and DaemonSets select only nodes carrying it, so tests sharing one real
/// cluster never touch each other's objects.
pub const TEST_LABEL: &str = "e2e.stratos.sh/test";

/// Environment variable naming a command that takes a real cluster's API server down for
/// the number of seconds given as its last argument and returns once it serves again, e.g.
/// `testkit/real-cluster.sh outage` (see `testkit/README.md`).
pub const E2E_OUTAGE_CMD: &str = "STRATOS_E2E_OUTAGE_CMD";

/// Whether the tests run against a real cluster (`STRATOS_E2E_KUBECONFIG` is set).
pub fn real_cluster() -> bool {
    std::env::var_os(E2E_KUBECONFIG).is_some()
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub cluster_name: String,
    pub cloud: FakeCloudConfig,
    pub kubelet: KubeletOptions,
    /// The embedded scheduler's pace (a real cluster's scheduler has its own).
    pub scheduler: SchedulerOptions,
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
            scheduler: SchedulerOptions::default(),
        }
    }
}

pub struct TestCluster {
    /// `None` when running against a real cluster.
    pub server: Option<ApiServer>,
    pub client: Client,
    config: kube::Config,
    pub cloud: Arc<FakeCloud>,
    /// This test's cluster tag: `<ClusterOptions::cluster_name>-<id>`.
    pub cluster_name: String,
    /// This test's id: a suffix of its pool and class names, the value of [`TEST_LABEL`],
    /// part of its namespace and of its nodes' names.
    pub id: String,
    /// The namespace of this test's pods, DaemonSets, PDBs and pre-pull pods.
    pub namespace: String,
    pub invariants: Invariants,
    kubeconfig: PathBuf,
    _scheduler: Option<Scheduler>,
    _controllers: Option<Controllers>,
    kubelet: Option<KubeletSim>,
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
                    let scheduler = Scheduler::start_with(client.clone(), options.scheduler);
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
        // Unique per test and per run: names, ids and DNS names never meet another test's.
        let id = format!("t{:06x}", fastrand::u32(..0x100_0000));
        let cluster_name = format!("{}-{id}", options.cluster_name);
        let namespace = format!("e2e-{id}");
        create_namespace(&client, &namespace).await;
        let mut cloud_config = options.cloud.clone();
        cloud_config.cluster = cluster_name.clone();
        cloud_config.id_base = fastrand::u64(1..1 << 40) << 24;
        cloud_config.dns_domain = format!("{id}.ec2.internal");
        let cloud = Arc::new(FakeCloud::new(cloud_config));
        // The network of the examples (examples/*.yaml), plus two more zones.
        cloud.add_subnet("subnet-12345678", "us-east-1a");
        cloud.add_subnet("subnet-22345678", "us-east-1b");
        cloud.add_subnet("subnet-32345678", "us-east-1c");
        cloud.add_security_group("sg-12345678");
        cloud.add_image("ami-0123456789abcdef0");
        // Nodes register with the test's label, so its DaemonSets select them from the start.
        let mut kubelet_options = options.kubelet.clone();
        kubelet_options
            .node_labels
            .insert(TEST_LABEL.into(), id.clone());
        let kubelet = KubeletSim::start(client.clone(), cloud.clone(), kubelet_options);
        let probe = server.as_ref().map(|s| s.resource_version_probe());
        let invariants = Invariants::start(client.clone(), &cloud, &cluster_name, probe).await;
        TestCluster {
            server,
            client,
            config: kube_config,
            cloud,
            cluster_name,
            id,
            namespace,
            invariants,
            kubeconfig,
            _scheduler: scheduler,
            _controllers: controllers,
            kubelet: Some(kubelet),
        }
    }

    /// Whether [`TestCluster::api_outage`] can take this cluster's API server down: always
    /// for the embedded one; for a real one when [`E2E_OUTAGE_CMD`] is set.
    pub fn can_take_api_down(&self) -> bool {
        self.server.is_some() || std::env::var_os(E2E_OUTAGE_CMD).is_some()
    }

    /// Takes the API server down for `duration`, as a kube-apiserver restart does, and
    /// returns the instant it answers again.
    pub async fn api_outage(&self, duration: Duration) -> std::time::Instant {
        if let Some(server) = &self.server {
            server.set_down(true);
            tokio::time::sleep(duration).await;
            server.set_down(false);
        } else {
            let cmd = std::env::var(E2E_OUTAGE_CMD)
                .unwrap_or_else(|_| panic!("{E2E_OUTAGE_CMD} is not set"));
            let secs = duration.as_secs().to_string();
            let line = format!("{cmd} {secs}");
            let status = tokio::task::spawn_blocking(move || {
                std::process::Command::new("sh")
                    .arg("-c")
                    .arg(line)
                    .status()
            })
            .await
            .expect("outage command task")
            .expect("run the outage command");
            assert!(status.success(), "{cmd} {secs}: {status}");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if self.client.apiserver_version().await.is_ok() {
                return std::time::Instant::now();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the API server did not come back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Makes every eviction in this test's namespace answer 403 Forbidden, as a missing
    /// `pods/eviction` permission or a policy that denies evictions does: on the embedded
    /// server a fault; on a real one a ValidatingAdmissionPolicy bound to the namespace.
    pub async fn deny_evictions(&self) {
        if let Some(server) = &self.server {
            server.deny("create", "pods/eviction");
            return;
        }
        use k8s_openapi::api::admissionregistration::v1::{
            ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
        };
        let name = deny_evictions_name(&self.id);
        let policy: ValidatingAdmissionPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {TEST_LABEL: self.id}},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{
                    "apiGroups": [""], "apiVersions": ["v1"],
                    "operations": ["CREATE"], "resources": ["pods/eviction"],
                }]},
                "validations": [{
                    "expression": "false",
                    "message": "evictions are denied in this namespace (e2e test)",
                    "reason": "Forbidden",
                }],
            },
        }))
        .expect("policy");
        let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {TEST_LABEL: self.id}},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": self.namespace,
                }}},
            },
        }))
        .expect("binding");
        let pp = kube::api::PostParams::default();
        Api::<ValidatingAdmissionPolicy>::all(self.client.clone())
            .create(&pp, &policy)
            .await
            .expect("create the policy");
        Api::<ValidatingAdmissionPolicyBinding>::all(self.client.clone())
            .create(&pp, &binding)
            .await
            .expect("create the binding");
        // The API server's policy informer picks it up within about a second.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    /// Undoes [`TestCluster::deny_evictions`].
    pub async fn allow_evictions(&self) {
        if let Some(server) = &self.server {
            server.clear_faults();
            return;
        }
        remove_deny_evictions(&self.client, &self.id).await;
    }

    /// This test's name for a cluster-scoped object the test code calls `base` (a NodePool
    /// or AWSNodeClass: `workers` → `workers-t1a2b3c`).
    pub fn name(&self, base: &str) -> String {
        format!("{base}-{}", self.id)
    }

    /// The DNS domain of this test's instances (and so the suffix of its Node names).
    pub fn dns_domain(&self) -> String {
        format!("{}.ec2.internal", self.id)
    }

    /// An Api for this test's pods.
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Rewrites one document the way [`TestCluster::apply_yaml`] applies it: this test's
    /// names, label, namespace, and node selection.
    pub fn scoped(&self, mut value: Value) -> Value {
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let label = |v: &mut Value, path: &str| {
            if let Some(obj) = ensure_object(v, path) {
                obj.insert(TEST_LABEL.into(), Value::String(self.id.clone()));
            }
        };
        label(&mut value, "/metadata/labels");
        match kind.as_str() {
            "NodePool" | "AWSNodeClass" => {
                if let Some(name) = value["metadata"]["name"].as_str() {
                    value["metadata"]["name"] = Value::String(self.name(name));
                }
                if kind == "NodePool" {
                    if let Some(class) = value.pointer("/spec/template/nodeClassRef/name") {
                        let class = self.name(class.as_str().unwrap_or_default());
                        value["spec"]["template"]["nodeClassRef"]["name"] = Value::String(class);
                    }
                    label(&mut value, "/spec/template/labels");
                    if let Some(pool) = value.pointer_mut(&format!(
                        "/spec/template/labels/{}",
                        tags::POOL.replace('/', "~1")
                    )) && let Some(name) = pool.as_str()
                    {
                        *pool = Value::String(self.name(name));
                    }
                }
            }
            _ => {
                value["metadata"]["namespace"] = Value::String(self.namespace.clone());
                // Pods, DaemonSets and workloads select only this test's nodes (which
                // register with its label).
                let spec = match kind.as_str() {
                    "Pod" => Some("/spec"),
                    "DaemonSet" | "Deployment" | "StatefulSet" | "ReplicaSet" | "Job" => {
                        Some("/spec/template/spec")
                    }
                    _ => None,
                };
                if let Some(spec) = spec
                    && value.pointer(&format!("{spec}/nodeName")).is_none()
                {
                    self.scope_pod_spec(value.pointer_mut(spec).expect("pod spec"));
                }
            }
        }
        value
    }

    /// A pod spec selects only this test's nodes, and a pool by this test's name for it.
    fn scope_pod_spec(&self, spec: &mut Value) {
        let scoped_pool = |v: &mut Value| {
            if let Some(pool) = v.as_str() {
                *v = Value::String(self.name(pool));
            }
        };
        if let Some(selector) = ensure_object(spec, "/nodeSelector") {
            if let Some(pool) = selector.get_mut(tags::POOL) {
                scoped_pool(pool);
            }
            selector.insert(TEST_LABEL.into(), Value::String(self.id.clone()));
        }
        let terms = spec.pointer_mut(
            "/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms",
        );
        for term in terms.and_then(Value::as_array_mut).into_iter().flatten() {
            let exprs = term
                .get_mut("matchExpressions")
                .and_then(Value::as_array_mut);
            for expr in exprs.into_iter().flatten() {
                if expr["key"] == tags::POOL
                    && let Some(values) = expr.get_mut("values").and_then(Value::as_array_mut)
                {
                    values.iter_mut().for_each(scoped_pool);
                }
            }
        }
    }

    /// Runs the real Stratos controllers in this process, against this cluster and its
    /// FakeCloud. Dropping (or [`Operator::kill`]ing) the handle stops them at once, like a
    /// crashed pod.
    pub fn start_operator(&self) -> Operator {
        self.start_operator_with(|_| {})
    }

    /// [`TestCluster::start_operator`] with the test's settings adjusted by `adjust` (e.g.
    /// production's listing TTL for a benchmark).
    pub fn start_operator_with(&self, adjust: impl FnOnce(&mut OperatorConfig)) -> Operator {
        self.start_operator_on(&tokio::runtime::Handle::current(), adjust)
    }

    /// The operator on a runtime of its own (a benchmark reads its threads' CPU time).
    pub fn start_operator_on(
        &self,
        runtime: &tokio::runtime::Handle,
        adjust: impl FnOnce(&mut OperatorConfig),
    ) -> Operator {
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
        config.prepull_namespace = self.namespace.clone();
        config.pool_selector = Some(format!("{TEST_LABEL}={}", self.id));
        adjust(&mut config);
        let cloud: Arc<dyn CloudProvider> = self.cloud.clone();
        let metrics = Arc::new(PoolMetrics::detached());
        let task = runtime.spawn(stratos::controller::run(
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
            let value = self.scoped(value);
            let kind = value["kind"].as_str().unwrap_or_default().to_owned();
            let name = value["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let ns = self.namespace.clone();
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

    /// The status of this test's pool `name`.
    pub async fn pool_status(&self, name: &str) -> Option<stratos::api::NodePoolStatus> {
        Api::<NodePool>::all(self.client.clone())
            .get_opt(&self.name(name))
            .await
            .ok()??
            .status
    }

    /// Waits until pool `pool` has `standby` standby nodes of `total`, none warming.
    pub async fn wait_standby(&self, pool: &str, standby: i32, total: i32) {
        self.wait_for(
            &format!("{pool}: {standby} standby of {total}"),
            Duration::from_secs(30),
            || async {
                let s = self.pool_status(pool).await?;
                (s.standby == standby && s.total == total && s.warmup == 0).then_some(())
            },
        )
        .await;
    }

    /// The live instances of this test's pool `pool`.
    pub fn pool_instances(&self, pool: &str) -> Vec<stratos::cloud::Instance> {
        let name = self.name(pool);
        self.cloud
            .all_instances()
            .into_iter()
            .filter(|i| i.tag(tags::POOL) == Some(name.as_str()) && i.state.is_live())
            .collect()
    }

    /// The instance behind Node `node` (named after its private DNS name).
    pub fn instance_of_node(&self, node: &str) -> stratos::cloud::Instance {
        self.cloud
            .all_instances()
            .into_iter()
            .find(|i| i.private_dns_name.as_deref() == Some(node))
            .unwrap_or_else(|| panic!("no instance behind node {node}"))
    }

    /// Instances launched so far.
    pub fn launched(&self) -> usize {
        self.cloud
            .calls()
            .iter()
            .filter(|c| c.operation == Operation::RunInstances)
            .map(|c| c.ids.len())
            .sum()
    }

    /// The StartInstances calls after the first `before`, logged with the nodes each started.
    pub fn starts_since(&self, before: usize, what: &str) -> Vec<CallRecord> {
        let starts: Vec<_> = self
            .cloud
            .calls()
            .into_iter()
            .filter(|c| c.operation == Operation::StartInstances)
            .skip(before)
            .collect();
        println!(
            "{what}: StartInstances calls: {}, nodes started: {:?}",
            starts.len(),
            starts.iter().map(|c| c.ids.len()).collect::<Vec<_>>()
        );
        starts
    }

    /// Waits until `n` of this test's pods run.
    pub async fn wait_pods_running(&self, n: usize, timeout: Duration) {
        let pods = self.pods();
        self.wait_for(&format!("{n} pods running"), timeout, || async {
            let list = pods.list(&ListParams::default()).await.ok()?;
            let running = list
                .items
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count();
            (running == n).then_some(())
        })
        .await;
    }

    /// Waits until this test's pod `name` runs; returns its node.
    pub async fn running_node_of(&self, name: &str, timeout: Duration) -> String {
        let pods = self.pods();
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
        let mut out = format!("--- cluster state of test {} ---\n", self.id);
        let own = ListParams::default().labels(&format!("{TEST_LABEL}={}", self.id));
        if let Ok(pools) = Api::<NodePool>::all(self.client.clone()).list(&own).await {
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
            let domain = format!(".{}", self.dns_domain());
            for n in nodes
                .into_iter()
                .filter(|n| n.name_any().ends_with(&domain))
            {
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
        if let Ok(pods) = self.pods().list(&ListParams::default()).await {
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

impl Drop for TestCluster {
    /// On a real cluster, removes what the test created, pass or fail: its pools and
    /// classes (finalizers dropped: its operator is gone), its Nodes and its namespace.
    /// The embedded server goes with the test.
    fn drop(&mut self) {
        // No node may come back while its objects go.
        self.kubelet.take();
        if self.server.is_some() {
            return;
        }
        let (config, id, namespace, domain) = (
            self.config.clone(),
            self.id.clone(),
            self.namespace.clone(),
            self.dns_domain(),
        );
        // A runtime of its own: this may run while the test's runtime unwinds a panic.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                let Ok(client) = Client::try_from(config) else {
                    return;
                };
                remove_test_objects(&client, &id, &namespace, &domain).await;
            });
        });
        let _ = cleanup.join();
    }
}

fn deny_evictions_name(id: &str) -> String {
    format!("stratos-e2e-deny-evictions-{id}")
}

async fn remove_deny_evictions(client: &Client, id: &str) {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let name = deny_evictions_name(id);
    let _ = Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .delete(&name, &Default::default())
        .await;
    let _ = Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .delete(&name, &Default::default())
        .await;
}

/// Deletes every object of test `id` from a real cluster.
async fn remove_test_objects(client: &Client, id: &str, namespace: &str, domain: &str) {
    remove_deny_evictions(client, id).await;
    let own = ListParams::default().labels(&format!("{TEST_LABEL}={id}"));
    let no_finalizers = Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}}));
    let pools: Api<NodePool> = Api::all(client.clone());
    for pool in pools.list(&own).await.map(|l| l.items).unwrap_or_default() {
        let name = pool.name_any();
        let _ = pools.delete(&name, &Default::default()).await;
        let _ = pools
            .patch(&name, &PatchParams::default(), &no_finalizers)
            .await;
    }
    let classes: Api<stratos::api::AWSNodeClass> = Api::all(client.clone());
    for class in classes
        .list(&own)
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        let name = class.name_any();
        let _ = classes.delete(&name, &Default::default()).await;
        let _ = classes
            .patch(&name, &PatchParams::default(), &no_finalizers)
            .await;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let now = kube::api::DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    let _ = pods.delete_collection(&now, &ListParams::default()).await;
    let nodes: Api<Node> = Api::all(client.clone());
    let suffix = format!(".{domain}");
    for node in nodes
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        let name = node.name_any();
        if name.ends_with(&suffix) || node.labels().get(TEST_LABEL).map(String::as_str) == Some(id)
        {
            let _ = nodes.delete(&name, &Default::default()).await;
        }
    }
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(namespace, &Default::default()).await;
}

/// Creates a namespace (if it does not exist yet).
async fn create_namespace(client: &Client, name: &str) {
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("namespace");
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    match api.create(&Default::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create namespace {name}: {e}"),
    }
    // A real control plane admits pods only once its service-account controller has made
    // the namespace's `default` ServiceAccount (slower while it recovers from an API server
    // restart); the embedded one does not check.
    if real_cluster() {
        let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), name);
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while !matches!(accounts.get_opt("default").await, Ok(Some(_))) {
            assert!(
                std::time::Instant::now() < deadline,
                "no default ServiceAccount in {name} after 90 s: is kube-controller-manager running?"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The object at `path` (created empty if missing or null), when there is one to be had.
fn ensure_object<'a>(
    value: &'a mut Value,
    path: &str,
) -> Option<&'a mut serde_json::Map<String, Value>> {
    let (parent, key) = path.rsplit_once('/')?;
    let parent = if parent.is_empty() {
        value
    } else {
        value.pointer_mut(parent)?
    };
    let parent = parent.as_object_mut()?;
    let slot = parent
        .entry(key.to_owned())
        .or_insert_with(|| Value::Object(Default::default()));
    if slot.is_null() {
        *slot = Value::Object(Default::default());
    }
    slot.as_object_mut()
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
