//! A kubelet simulator: plays the nodes of a cloud's instances against an API server.
//!
//! For every running instance it registers a Node named after the instance's private DNS
//! name, with `providerID: aws:///<zone>/<id>`, the standard labels, capacity from the
//! instance type, and the labels and taints from the kubelet flags in the instance's user
//! data (`--node-labels`, `--register-with-taints`; taints at first registration only, as a
//! real kubelet). After configurable delays the node turns Ready and its network ready. It
//! runs the pods bound to it (init containers first) to Running/Ready, or to Succeeded for
//! run-to-completion pods, records their images in `status.images`, and confirms pod
//! deletions. When the instance stops the node goes `Ready=Unknown` and stays; when it
//! terminates the Node is deleted. It renews node Leases, so a real control plane keeps
//! the nodes alive too.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use serde_json::{Value, json};
use stratos::cloud::{InstanceState, fake::FakeCloud};
use tokio::{task::JoinHandle, time::Instant};

use crate::apiserver::now;

/// What the simulator needs to know about one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimInstance {
    pub id: String,
    pub state: InstanceState,
    pub zone: String,
    pub instance_type: String,
    pub private_dns_name: String,
    pub user_data: Option<String>,
}

/// Where instances come from.
#[async_trait]
pub trait InstanceSource: Send + Sync + 'static {
    async fn instances(&self) -> Vec<SimInstance>;
    /// The OS powers the instance off (the seeds' user data ends with `poweroff`).
    async fn power_off(&self, id: &str);
}

#[async_trait]
impl InstanceSource for FakeCloud {
    async fn instances(&self) -> Vec<SimInstance> {
        self.all_instances()
            .into_iter()
            .map(|i| SimInstance {
                user_data: self.launch_spec(&i.id).and_then(|s| s.user_data),
                private_dns_name: i.private_dns_name.clone().unwrap_or_else(|| i.id.clone()),
                id: i.id,
                state: i.state,
                zone: i.zone,
                instance_type: i.instance_type,
            })
            .collect()
    }

    async fn power_off(&self, id: &str) {
        FakeCloud::power_off(self, id);
    }
}

/// Instances of an EC2 API (e.g. moto), read with DescribeInstances; user data is fetched
/// once per instance.
pub struct Ec2Instances {
    client: aws_sdk_ec2::Client,
    user_data: Mutex<HashMap<String, Option<String>>>,
}

impl Ec2Instances {
    pub fn new(client: aws_sdk_ec2::Client) -> Self {
        Self {
            client,
            user_data: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl InstanceSource for Ec2Instances {
    async fn instances(&self) -> Vec<SimInstance> {
        let Ok(pages) = self
            .client
            .describe_instances()
            .into_paginator()
            .send()
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for inst in pages
            .iter()
            .flat_map(|p| p.reservations())
            .flat_map(|r| r.instances())
        {
            let (Some(id), Some(state)) = (inst.instance_id(), inst.state().and_then(|s| s.name()))
            else {
                continue;
            };
            let Some(state) = InstanceState::parse(state.as_str()) else {
                continue;
            };
            let cached = self.user_data.lock().unwrap().get(id).cloned();
            let user_data = match cached {
                Some(u) => u,
                None => {
                    let attr = self
                        .client
                        .describe_instance_attribute()
                        .instance_id(id)
                        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
                        .send()
                        .await
                        .ok();
                    let decoded = attr
                        .and_then(|a| a.user_data().and_then(|u| u.value()).map(str::to_owned))
                        .and_then(|b64| {
                            use base64::Engine;
                            base64::engine::general_purpose::STANDARD.decode(b64).ok()
                        })
                        .and_then(|b| String::from_utf8(b).ok());
                    self.user_data
                        .lock()
                        .unwrap()
                        .insert(id.to_owned(), decoded.clone());
                    decoded
                }
            };
            out.push(SimInstance {
                id: id.to_owned(),
                state,
                zone: inst
                    .placement()
                    .and_then(|p| p.availability_zone())
                    .unwrap_or("us-east-1a")
                    .to_owned(),
                instance_type: inst
                    .instance_type()
                    .map(|t| t.as_str().to_owned())
                    .unwrap_or_default(),
                private_dns_name: inst
                    .private_dns_name()
                    .filter(|n| !n.is_empty())
                    .unwrap_or(id)
                    .to_owned(),
                user_data,
            });
        }
        out
    }

    async fn power_off(&self, id: &str) {
        let _ = self.client.stop_instances().instance_ids(id).send().await;
    }
}

/// Delays of the simulated node lifecycle.
#[derive(Debug, Clone)]
pub struct KubeletOptions {
    /// Instance running → Node registered.
    pub register_after: Duration,
    /// Registered (or rebooted) → Ready.
    pub ready_after: Duration,
    /// Registered (or rebooted) → NetworkUnavailable=False.
    pub network_ready_after: Duration,
    /// Pod bound → Running/Ready.
    pub pod_start_after: Duration,
    /// How often the simulator looks at the cloud and the cluster.
    pub tick: Duration,
    /// Power the instance off this long after its node first became Ready, as the seeds'
    /// bootstrap scripts do; only on an instance's first boot.
    pub poweroff_after_ready: Option<Duration>,
    /// Labels every node registers with, besides its user data's `--node-labels` (as an
    /// EKS node group's labels).
    pub node_labels: BTreeMap<String, String>,
}

impl Default for KubeletOptions {
    fn default() -> Self {
        Self {
            register_after: Duration::from_millis(200),
            ready_after: Duration::from_millis(300),
            network_ready_after: Duration::from_millis(400),
            pod_start_after: Duration::from_millis(200),
            tick: Duration::from_millis(50),
            poweroff_after_ready: None,
            node_labels: BTreeMap::new(),
        }
    }
}

/// Annotation on a run-to-completion pod: how long it runs before succeeding.
pub const RUN_FOR_ANNOTATION: &str = "testkit.stratos.sh/run-for";

/// Annotation on a pod: how long its containers take to exit once it is deleted (a CI job
/// finishing its step, a server draining connections), at most its grace period. Without
/// it they exit at once. The pod stays Terminating meanwhile, as on a real node.
pub const SHUTDOWN_AFTER_ANNOTATION: &str = "testkit.stratos.sh/shutdown-after";

/// The labels and taints a node registers with, from its user data in any of the three
/// formats EKS nodes use: an Amazon Linux 2 bootstrap script (`--node-labels`,
/// `--register-with-taints`), an Amazon Linux 2023 nodeadm `NodeConfig` (plain or in a MIME
/// multipart part; `kubelet.config.registerWithTaints` and `kubelet.flags`), or Bottlerocket
/// TOML settings (`settings.kubernetes.node-labels` and `node-taints`).
pub fn registration(user_data: &str) -> (BTreeMap<String, String>, Vec<Value>) {
    if user_data.contains("[settings.kubernetes") || user_data.contains("[settings]") {
        return bottlerocket_settings(user_data);
    }
    if user_data.contains("kind: NodeConfig") {
        return node_config(user_data);
    }
    kubelet_flags(user_data)
}

/// Bottlerocket: `node-taints` map a key to `["value:Effect", ...]`.
fn bottlerocket_settings(user_data: &str) -> (BTreeMap<String, String>, Vec<Value>) {
    let Ok(settings) = user_data.parse::<toml::Table>() else {
        return Default::default();
    };
    let kubernetes = settings
        .get("settings")
        .and_then(|s| s.get("kubernetes"))
        .and_then(toml::Value::as_table);
    let labels = kubernetes
        .and_then(|k| k.get("node-labels"))
        .and_then(toml::Value::as_table)
        .map(|t| {
            t.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let mut taints = Vec::new();
    if let Some(t) = kubernetes
        .and_then(|k| k.get("node-taints"))
        .and_then(toml::Value::as_table)
    {
        for (key, values) in t {
            for v in values
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(toml::Value::as_str)
            {
                let (value, effect) = v.rsplit_once(':').unwrap_or(("", v));
                taints.push(json!({"key": key, "value": value, "effect": effect}));
            }
        }
    }
    (labels, taints)
}

/// AL2023: the `NodeConfig` documents of the user data (MIME parts of type
/// `application/node.eks.aws`, or the whole text).
fn node_config(user_data: &str) -> (BTreeMap<String, String>, Vec<Value>) {
    let mut labels = BTreeMap::new();
    let mut taints = Vec::new();
    // Every YAML document anywhere in the text that parses as a NodeConfig; MIME headers and
    // boundaries sit between documents and do not parse as one.
    let mut documents: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in user_data.lines() {
        if line == "---" || line.starts_with("--") || line.contains("Content-Type:") {
            documents.push(std::mem::take(&mut current));
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    documents.push(current);
    for doc in documents {
        let Ok(config) = serde_yaml::from_str::<Value>(&doc) else {
            continue;
        };
        if config["kind"] != "NodeConfig" {
            continue;
        }
        let kubelet = &config["spec"]["kubelet"];
        for t in kubelet["config"]["registerWithTaints"]
            .as_array()
            .into_iter()
            .flatten()
        {
            taints.push(json!({
                "key": t["key"], "value": t["value"].as_str().unwrap_or(""), "effect": t["effect"]
            }));
        }
        let flags: Vec<&str> = kubelet["flags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let (l, t) = kubelet_flags(&flags.join(" "));
        labels.extend(l);
        taints.extend(t);
    }
    (labels, taints)
}

/// `--node-labels` and `--register-with-taints` from a bootstrap script.
pub fn kubelet_flags(user_data: &str) -> (BTreeMap<String, String>, Vec<Value>) {
    let flag = |name: &str| -> Option<String> {
        let start = user_data.find(name)? + name.len();
        let rest = user_data[start..].trim_start_matches(['=', ' ']);
        let value: String = rest
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '\'' && *c != '"')
            .collect();
        (!value.is_empty()).then_some(value)
    };
    let labels = flag("--node-labels")
        .map(|v| {
            v.split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let taints = flag("--register-with-taints")
        .map(|v| {
            v.split(',')
                .filter_map(|t| {
                    let (kv, effect) = t.rsplit_once(':')?;
                    let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
                    Some(json!({"key": key, "value": value, "effect": effect}))
                })
                .collect()
        })
        .unwrap_or_default();
    (labels, taints)
}

/// Capacity by instance type: (cpu cores, memory GiB, max pods, gpus).
fn capacity(instance_type: &str) -> (u32, u32, u32, u32) {
    match instance_type {
        "m5.large" | "c5.large" => (2, 8, 29, 0),
        "m5.xlarge" => (4, 16, 58, 0),
        "m5.2xlarge" => (8, 32, 58, 0),
        "m5.4xlarge" => (16, 64, 234, 0),
        "g5.2xlarge" => (8, 32, 58, 1),
        _ => (2, 8, 29, 0),
    }
}

#[derive(Debug, Default)]
struct Boot {
    running_since: Option<Instant>,
    registered: bool,
    boots: u32,
    powered_off: bool,
    pods_started: HashMap<String, Instant>,
    /// Pods being deleted: when the kubelet began their shutdown.
    pods_stopping: HashMap<String, Instant>,
}

pub struct KubeletSim {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeletSim {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl KubeletSim {
    pub fn start(
        client: Client,
        source: Arc<dyn InstanceSource>,
        options: KubeletOptions,
    ) -> KubeletSim {
        let (pods, writer) = reflector::store::<Pod>();
        let pod_stream = reflector(
            writer,
            watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()),
        )
        .default_backoff()
        .touched_objects();
        let pod_task = tokio::spawn(async move {
            let mut s = std::pin::pin!(pod_stream);
            while s.next().await.is_some() {}
        });
        // A real kubelet reads and writes its own Node directly, so its view of it is never
        // behind after an API outage; a watch that retries within seconds stands in for that.
        // (Its pod source is a watch with client-go's backoff, as above.)
        let (nodes, node_writer) = reflector::store::<Node>();
        let node_stream = reflector(
            node_writer,
            watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
        )
        .backoff(stratos::controller::reflect::WatchBackoff::default())
        .touched_objects();
        let node_task = tokio::spawn(async move {
            let mut s = std::pin::pin!(node_stream);
            while s.next().await.is_some() {}
        });
        let main = tokio::spawn(async move {
            pods.wait_until_ready().await.ok();
            nodes.wait_until_ready().await.ok();
            let mut boots: HashMap<String, Boot> = HashMap::new();
            let mut known: BTreeSet<String> = BTreeSet::new();
            let mut last_lease = Instant::now() - Duration::from_secs(60);
            loop {
                let renew = last_lease.elapsed() >= Duration::from_secs(10);
                if renew {
                    last_lease = Instant::now();
                }
                sim_round(
                    &client,
                    source.as_ref(),
                    &nodes,
                    &pods,
                    &mut boots,
                    &mut known,
                    &options,
                    renew,
                )
                .await;
                tokio::time::sleep(options.tick).await;
            }
        });
        KubeletSim {
            tasks: vec![pod_task, node_task, main],
        }
    }
}

fn condition(type_: &str, status: &str, reason: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": reason, "lastHeartbeatTime": now(), "lastTransitionTime": now()})
}

fn node_condition<'a>(node: &'a Node, type_: &str) -> Option<&'a str> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

#[allow(clippy::too_many_arguments)]
async fn sim_round(
    client: &Client,
    source: &dyn InstanceSource,
    node_store: &Store<Node>,
    pods: &Store<Pod>,
    boots: &mut HashMap<String, Boot>,
    known: &mut BTreeSet<String>,
    options: &KubeletOptions,
    renew_leases: bool,
) {
    let nodes_api: Api<Node> = Api::all(client.clone());
    let nodes: HashMap<String, Arc<Node>> = node_store
        .state()
        .into_iter()
        .map(|n| (n.name_any(), n))
        .collect();
    // One pass over the pods per round, not one per node.
    let mut pods_by_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
    for pod in pods.state() {
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
            pods_by_node.entry(node).or_default().push(pod);
        }
    }
    let instances = source.instances().await;
    known.extend(instances.iter().map(|i| i.id.clone()));
    let live: BTreeSet<String> = instances
        .iter()
        .filter(|i| i.state != InstanceState::Terminated)
        .map(|i| i.private_dns_name.clone())
        .collect();

    for inst in &instances {
        let name = &inst.private_dns_name;
        let boot = boots.entry(inst.id.clone()).or_default();
        let node = nodes.get(name);
        match inst.state {
            InstanceState::Running => {
                let since = *boot.running_since.get_or_insert_with(|| {
                    boot.boots += 1;
                    Instant::now()
                });
                let up = since.elapsed();
                if up < options.register_after {
                    continue;
                }
                let Some(node) = node else {
                    register(&nodes_api, inst, options, boot).await;
                    continue;
                };
                let since_register = up - options.register_after;
                let want_ready = since_register >= options.ready_after;
                let want_network = since_register >= options.network_ready_after;
                let mut conditions = Vec::new();
                let ready_now = node_condition(node, "Ready") == Some("True");
                if want_ready != ready_now {
                    conditions.push(if want_ready {
                        condition("Ready", "True", "KubeletReady")
                    } else {
                        condition("Ready", "False", "KubeletNotReady")
                    });
                }
                let network_now = node_condition(node, "NetworkUnavailable") == Some("False");
                if want_network != network_now {
                    conditions.push(if want_network {
                        condition("NetworkUnavailable", "False", "RouteCreated")
                    } else {
                        condition("NetworkUnavailable", "True", "NoRouteCreated")
                    });
                }
                if !conditions.is_empty() {
                    let _ = nodes_api
                        .patch_status(
                            name,
                            &PatchParams::default(),
                            &Patch::Strategic(json!({"status": {"conditions": conditions}})),
                        )
                        .await;
                }
                if renew_leases {
                    renew_lease(client, name).await;
                }
                if want_ready {
                    let on_node = pods_by_node
                        .get(name)
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    run_pods(client, &nodes_api, node, on_node, boot, options).await;
                    if let Some(after) = options.poweroff_after_ready
                        && inst
                            .user_data
                            .as_deref()
                            .is_none_or(stratos::pool::bootstrap::powers_off)
                        && boot.boots == 1
                        && !boot.powered_off
                        && since_register >= options.ready_after + after
                    {
                        boot.powered_off = true;
                        source.power_off(&inst.id).await;
                    }
                }
            }
            InstanceState::Pending => {}
            InstanceState::Stopping | InstanceState::Stopped | InstanceState::ShuttingDown => {
                boot.running_since = None;
                boot.pods_started.clear();
                boot.pods_stopping.clear();
                if let Some(node) = node
                    && node_condition(node, "Ready") != Some("Unknown")
                {
                    let unknown = json!({"status": {"conditions": [
                        condition("Ready", "Unknown", "NodeStatusUnknown"),
                    ]}});
                    let _ = nodes_api
                        .patch_status(name, &PatchParams::default(), &Patch::Strategic(unknown))
                        .await;
                }
            }
            InstanceState::Terminated => {
                if node.is_some() {
                    let _ = nodes_api.delete(name, &DeleteParams::default()).await;
                }
                boots.remove(&inst.id);
            }
        }
    }
    // Nodes whose instance vanished from the cloud entirely; only this simulator's own
    // (other simulators may play other nodes of a shared cluster).
    for (name, node) in &nodes {
        let ours = node
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.as_deref())
            .and_then(stratos::cloud::parse_provider_id)
            .is_some_and(|(_, id)| known.contains(id));
        if ours && !live.contains(name) && !instances.iter().any(|i| &i.private_dns_name == name) {
            let _ = nodes_api.delete(name, &DeleteParams::default()).await;
        }
    }
}

async fn register(
    nodes_api: &Api<Node>,
    inst: &SimInstance,
    options: &KubeletOptions,
    boot: &mut Boot,
) {
    let (cpu, mem_gib, max_pods, gpus) = capacity(&inst.instance_type);
    let (flag_labels, taints) = inst
        .user_data
        .as_deref()
        .map(registration)
        .unwrap_or_default();
    let region = inst.zone.trim_end_matches(|c: char| c.is_ascii_lowercase());
    let mut labels: BTreeMap<String, String> = BTreeMap::from([
        (
            "kubernetes.io/hostname".into(),
            inst.private_dns_name.clone(),
        ),
        ("kubernetes.io/os".into(), "linux".into()),
        ("kubernetes.io/arch".into(), "amd64".into()),
        (
            "node.kubernetes.io/instance-type".into(),
            inst.instance_type.clone(),
        ),
        ("topology.kubernetes.io/zone".into(), inst.zone.clone()),
        ("topology.kubernetes.io/region".into(), region.to_owned()),
    ]);
    labels.extend(flag_labels);
    labels.extend(options.node_labels.clone());
    let mut capacity = json!({"cpu": cpu.to_string(), "memory": format!("{}Ki", mem_gib as u64 * 1024 * 1024), "pods": max_pods.to_string(), "ephemeral-storage": "100Gi"});
    let mut allocatable = json!({
        "cpu": format!("{}m", cpu * 1000 - 80),
        "memory": format!("{}Ki", mem_gib as u64 * 1024 * 1024 * 9 / 10),
        "pods": max_pods.to_string(),
        "ephemeral-storage": "95Gi",
    });
    if gpus > 0 {
        capacity["nvidia.com/gpu"] = json!(gpus.to_string());
        allocatable["nvidia.com/gpu"] = json!(gpus.to_string());
    }
    let mut conditions = vec![condition("Ready", "False", "KubeletNotReady")];
    if !options.network_ready_after.is_zero() {
        conditions.push(condition("NetworkUnavailable", "True", "NoRouteCreated"));
    }
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": inst.private_dns_name, "labels": labels},
        "spec": {"providerID": format!("aws:///{}/{}", inst.zone, inst.id), "taints": if boot.registered { json!([]) } else { json!(taints) }},
        "status": {
            "capacity": capacity, "allocatable": allocatable, "conditions": conditions,
            "addresses": [{"type": "InternalDNS", "address": inst.private_dns_name}, {"type": "Hostname", "address": inst.private_dns_name}],
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "v1.33.0", "kubeProxyVersion": "", "containerRuntimeVersion": "containerd://2.0.0", "kernelVersion": "6.1", "osImage": "testkit", "machineID": inst.id, "systemUUID": inst.id, "bootID": inst.id},
        }
    }))
    .expect("node json");
    if nodes_api
        .create(&PostParams::default(), &node)
        .await
        .is_ok()
    {
        // Some API servers drop status on create; set it explicitly.
        let status = json!({"status": node.status});
        let _ = nodes_api
            .patch_status(
                &inst.private_dns_name,
                &PatchParams::default(),
                &Patch::Merge(status),
            )
            .await;
        boot.registered = true;
    }
}

/// A `MicroTime` as kube-apiserver parses it: exactly six fractional digits (it answers 500
/// to a Lease whose renewTime has nanoseconds).
fn micro_time(t: jiff::Timestamp) -> String {
    format!(
        "{}.{:06}Z",
        t.strftime("%Y-%m-%dT%H:%M:%S"),
        t.subsec_microsecond()
    )
}

async fn renew_lease(client: &Client, node: &str) {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-node-lease");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": node},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": micro_time(jiff::Timestamp::now())}
    });
    let _ = leases
        .patch(
            node,
            &PatchParams::apply("testkit-kubelet").force(),
            &Patch::Apply(lease),
        )
        .await;
}

async fn run_pods(
    client: &Client,
    nodes_api: &Api<Node>,
    node: &Node,
    pods: &[Arc<Pod>],
    boot: &mut Boot,
    options: &KubeletOptions,
) {
    let name = node.name_any();
    let mut images: BTreeSet<String> = node
        .status
        .as_ref()
        .and_then(|s| s.images.as_ref())
        .map(|i| {
            i.iter()
                .flat_map(|i| i.names.clone().unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    let images_before = images.len();
    for pod in pods {
        let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
        let pod_name = pod.name_any();
        if pod.metadata.deletion_timestamp.is_some() {
            // The containers get SIGTERM and take their shutdown time, cut off at the
            // grace period; only then is the pod object gone.
            let uid = pod.uid().unwrap_or_default();
            let since = *boot.pods_stopping.entry(uid).or_insert_with(Instant::now);
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .map_or(Duration::MAX, |s| Duration::from_secs(s.max(0) as u64));
            let shutdown = pod
                .annotations()
                .get(SHUTDOWN_AFTER_ANNOTATION)
                .and_then(|d| d.parse::<stratos::api::Duration>().ok())
                .map(|d| d.as_std())
                .unwrap_or_default();
            if since.elapsed() < shutdown.min(grace) {
                continue;
            }
            let _ = api
                .delete(
                    &pod_name,
                    &DeleteParams {
                        grace_period_seconds: Some(0),
                        ..Default::default()
                    },
                )
                .await;
            continue;
        }
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            continue;
        }
        let uid = pod.uid().unwrap_or_default();
        let started = *boot.pods_started.entry(uid).or_insert_with(Instant::now);
        if started.elapsed() < options.pod_start_after {
            continue;
        }
        let spec = pod.spec.clone().unwrap_or_default();
        let pod_images: Vec<String> = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .filter_map(|c| c.image.clone())
            .collect();
        images.extend(pod_images);
        let run_to_completion =
            matches!(spec.restart_policy.as_deref(), Some("Never" | "OnFailure"));
        let run_for = pod
            .annotations()
            .get(RUN_FOR_ANNOTATION)
            .and_then(|d| d.parse::<stratos::api::Duration>().ok())
            .map(|d| d.as_std())
            .unwrap_or_default();
        let done = run_to_completion && started.elapsed() >= options.pod_start_after + run_for;
        let target_phase = if done { "Succeeded" } else { "Running" };
        if phase == target_phase {
            continue;
        }
        let ready = if done { "False" } else { "True" };
        let statuses: Vec<Value> = spec
            .containers
            .iter()
            .map(|c| {
                let state = if done {
                    json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now(), "finishedAt": now()}})
                } else {
                    json!({"running": {"startedAt": now()}})
                };
                json!({"name": c.name, "image": c.image, "imageID": c.image, "ready": !done, "restartCount": 0, "started": !done, "state": state})
            })
            .collect();
        let init_statuses: Vec<Value> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| json!({"name": c.name, "image": c.image, "imageID": c.image, "ready": true, "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now(), "finishedAt": now()}}}))
            .collect();
        let status = json!({"status": {
            "phase": target_phase,
            "hostIP": "10.0.0.1",
            "podIP": "10.1.0.1",
            "startTime": now(),
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": now()},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": now()},
                {"type": "Ready", "status": ready, "lastTransitionTime": now()},
            ],
            "containerStatuses": statuses,
            "initContainerStatuses": init_statuses,
        }});
        let _ = api
            .patch_status(
                &pod_name,
                &PatchParams::default(),
                &Patch::Strategic(status),
            )
            .await;
    }
    if images.len() != images_before {
        let list: Vec<Value> = images
            .iter()
            .map(|i| json!({"names": [i], "sizeBytes": 100_000_000}))
            .collect();
        let _ = nodes_api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"images": list}})),
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_times_have_exactly_six_fractional_digits() {
        let t = jiff::Timestamp::from_nanosecond(1_800_000_000_123_456_789).unwrap();
        assert_eq!(micro_time(t), "2027-01-15T08:00:00.123456Z");
        let whole = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        assert_eq!(micro_time(whole), "2027-01-15T08:00:00.000000Z");
    }

    #[test]
    fn kubelet_flags_come_from_the_bootstrap_script() {
        let script = "#!/bin/bash\n/etc/eks/bootstrap.sh my-cluster \\\n  --kubelet-extra-args '--register-with-taints=node.eks.amazonaws.com/not-ready=true:NoSchedule --node-labels=team=ci,stratos.sh/pool=workers'\npoweroff\n";
        let (labels, taints) = kubelet_flags(script);
        assert_eq!(labels.get("team").map(String::as_str), Some("ci"));
        assert_eq!(
            labels.get("stratos.sh/pool").map(String::as_str),
            Some("workers")
        );
        assert_eq!(
            taints,
            vec![
                json!({"key": "node.eks.amazonaws.com/not-ready", "value": "true", "effect": "NoSchedule"})
            ]
        );
        assert_eq!(kubelet_flags("echo hi"), (BTreeMap::new(), vec![]));
    }

    #[test]
    fn al2023_and_bottlerocket_user_data_register_their_labels_and_taints() {
        let not_ready = json!({"key": "node.eks.amazonaws.com/not-ready", "value": "true", "effect": "NoSchedule"});
        for example in ["al2023", "bottlerocket"] {
            let yaml = std::fs::read_to_string(format!(
                "{}/../examples/{example}.yaml",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap();
            let class: Value = serde_yaml::from_str(yaml.split("\n---\n").next().unwrap()).unwrap();
            let user_data = class["spec"]["userData"].as_str().unwrap();
            let (labels, taints) = registration(user_data);
            assert_eq!(
                labels.get("workload").map(String::as_str),
                Some("general"),
                "{example}"
            );
            assert_eq!(taints, vec![not_ready.clone()], "{example}");
            assert!(
                !stratos::pool::bootstrap::powers_off(user_data),
                "{example} powers off"
            );
        }
        // The seeds' AL2 scripts still register through their flags.
        let (labels, taints) = registration(
            "/etc/eks/bootstrap.sh c --kubelet-extra-args '--node-labels=a=b --register-with-taints=k=v:NoExecute'",
        );
        assert_eq!(labels.get("a").map(String::as_str), Some("b"));
        assert_eq!(
            taints,
            vec![json!({"key": "k", "value": "v", "effect": "NoExecute"})]
        );
    }
}
