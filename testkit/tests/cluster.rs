//! The simulated control plane and nodes: scheduler, DaemonSet controller, kubelet.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Node, Pod},
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use stratos::cloud::{
    CloudProvider, InstanceState, LaunchRequest, LaunchSpec,
    fake::{FakeCloud, FakeCloudConfig},
    tags,
};
use testkit::{
    apiserver::ApiServer,
    controllers::Controllers,
    kubelet::{KubeletOptions, KubeletSim},
    scheduler::Scheduler,
};

async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn ready_node(nodes: &Api<Node>, name: &str, labels: Value, taints: Value, cpu: &str) {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels}, "spec": {"taints": taints}
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "10"},
                "conditions": [{"type": "Ready", "status": "True"}]
            }})),
        )
        .await
        .unwrap();
}

fn pod(name: &str, spec: Value) -> Pod {
    let mut spec = spec;
    if spec.get("containers").is_none() {
        spec["containers"] =
            json!([{"name": "c", "image": "app:1", "resources": {"requests": {"cpu": "1"}}}]);
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

fn scheduled(p: &Pod) -> Option<String> {
    p.spec.as_ref()?.node_name.clone()
}

fn unschedulable_message(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })?
        .message
        .clone()
}

#[tokio::test]
async fn the_scheduler_binds_what_fits_and_explains_what_does_not() {
    let server = ApiServer::start_with_repo_crds().await;
    let client = server.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    ready_node(
        &nodes,
        "ci-1",
        json!({"pool": "ci", "gen": "5"}),
        json!([]),
        "2",
    )
    .await;
    ready_node(
        &nodes,
        "gpu-1",
        json!({"pool": "gpu"}),
        json!([{"key": "gpu", "value": "true", "effect": "NoSchedule"}]),
        "2",
    )
    .await;
    let _scheduler = Scheduler::start(client.clone());
    // The node lifecycle controller takes the not-ready taint off Ready nodes.
    let _controllers = Controllers::start(client.clone());

    let cases = [
        (
            "selector",
            json!({"nodeSelector": {"pool": "ci"}}),
            Some("ci-1"),
        ),
        (
            "affinity-gt",
            json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "gen", "operator": "Gt", "values": ["4"]}]}]}}}}),
            Some("ci-1"),
        ),
        (
            "tolerates-gpu",
            json!({"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]}),
            Some("gpu-1"),
        ),
        ("taint", json!({"nodeSelector": {"pool": "gpu"}}), None),
        (
            "affinity-in",
            json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["tpu"]}]}]}}}}),
            None,
        ),
        (
            "too-big",
            json!({"containers": [{"name": "c", "image": "app:1", "resources": {"requests": {"cpu": "3"}}}]}),
            None,
        ),
    ];
    for (name, spec, _) in &cases {
        pods.create(&PostParams::default(), &pod(name, spec.clone()))
            .await
            .unwrap();
    }
    for (name, _, expected) in &cases {
        let p = eventually(name, Duration::from_secs(10), || async {
            let p = pods.get(name).await.unwrap();
            (scheduled(&p).is_some() || unschedulable_message(&p).is_some()).then_some(p)
        })
        .await;
        match expected {
            Some(node) => assert_eq!(scheduled(&p).as_deref(), Some(*node), "{name}"),
            None => {
                let msg = unschedulable_message(&p).unwrap();
                assert!(msg.starts_with("0/2 nodes are available:"), "{name}: {msg}");
                match *name {
                    "taint" => assert!(msg.contains("untolerated taint {gpu: true}"), "{msg}"),
                    // kube-scheduler runs TaintToleration before NodeAffinity and reports
                    // each node's first failing filter.
                    "affinity-in" => assert!(
                        msg.contains("1 node(s) didn't match Pod's node affinity/selector")
                            && msg.contains("1 node(s) had untolerated taint {gpu: true}"),
                        "{msg}"
                    ),
                    _ => assert!(msg.contains("Insufficient cpu"), "{msg}"),
                }
            }
        }
    }
    // ci-1 now holds two 1-CPU pods of its 2: a third waits, then fits on a new node.
    pods.create(
        &PostParams::default(),
        &pod("third", json!({"nodeSelector": {"pool": "ci"}})),
    )
    .await
    .unwrap();
    eventually("third unschedulable", Duration::from_secs(10), || async {
        unschedulable_message(&pods.get("third").await.unwrap())
    })
    .await;
    ready_node(&nodes, "ci-2", json!({"pool": "ci"}), json!([]), "2").await;
    let node = eventually(
        "third bound after a node joined",
        Duration::from_secs(10),
        || async { scheduled(&pods.get("third").await.unwrap()) },
    )
    .await;
    assert_eq!(node, "ci-2");
}

#[tokio::test]
async fn daemonset_pods_appear_on_new_nodes_and_go_with_them() {
    let server = ApiServer::start_with_repo_crds().await;
    let client = server.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let _controllers = Controllers::start(client.clone());
    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "aws-node", "namespace": "kube-system"},
        "spec": {"selector": {"matchLabels": {"k8s-app": "aws-node"}}, "template": {
            "metadata": {"labels": {"k8s-app": "aws-node"}},
            "spec": {
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "cni", "image": "amazon-k8s-cni:v1.19", "resources": {"requests": {"cpu": "25m"}}}]
            }
        }}
    }))
    .unwrap();
    let sets: Api<DaemonSet> = Api::namespaced(client.clone(), "kube-system");
    sets.create(&PostParams::default(), &ds).await.unwrap();
    // Without a toleration for the startup taint, a DaemonSet stays off that node.
    let picky: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "logs", "namespace": "kube-system"},
        "spec": {"selector": {"matchLabels": {"k8s-app": "logs"}}, "template": {
            "metadata": {"labels": {"k8s-app": "logs"}},
            "spec": {"containers": [{"name": "fluent", "image": "fluent-bit:3"}]}
        }}
    }))
    .unwrap();
    sets.create(&PostParams::default(), &picky).await.unwrap();
    // A tainted, not-ready, cordoned node still gets its DaemonSet pod.
    ready_node(&nodes, "n1", json!({}), json!([{"key": "node.eks.amazonaws.com/not-ready", "value": "true", "effect": "NoSchedule"}]), "2").await;
    nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    ready_node(&nodes, "n2", json!({}), json!([]), "2").await;
    let on_nodes = || async {
        let list = pods
            .list(&ListParams::default().labels("k8s-app=aws-node"))
            .await
            .unwrap();
        let mut names: Vec<String> = list.items.iter().filter_map(scheduled).collect();
        names.sort();
        names
    };
    eventually(
        "a DaemonSet pod per node",
        Duration::from_secs(10),
        || async { (on_nodes().await == ["n1", "n2"]).then_some(()) },
    )
    .await;
    eventually(
        "the picky DaemonSet only on the untainted node",
        Duration::from_secs(10),
        || async {
            let list = pods
                .list(&ListParams::default().labels("k8s-app=logs"))
                .await
                .unwrap();
            let names: Vec<String> = list.items.iter().filter_map(scheduled).collect();
            (names == ["n2"]).then_some(())
        },
    )
    .await;
    let p = pods
        .list(&ListParams::default().labels("k8s-app=aws-node"))
        .await
        .unwrap()
        .items
        .remove(0);
    let owner = &p.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("DaemonSet", Some(true))
    );
    assert!(
        p.spec
            .unwrap()
            .tolerations
            .unwrap()
            .iter()
            .any(|t| t.key.as_deref() == Some("node.kubernetes.io/unschedulable"))
    );

    nodes.delete("n2", &Default::default()).await.unwrap();
    eventually(
        "the pod of the deleted node collected",
        Duration::from_secs(10),
        || async { (on_nodes().await == ["n1"]).then_some(()) },
    )
    .await;
}

fn launch_request(user_data: &str) -> LaunchRequest {
    LaunchRequest {
        spec: LaunchSpec {
            instance_type: "m5.large".into(),
            ami: "ami-0123456789abcdef0".into(),
            subnet_ids: vec!["subnet-12345678".into()],
            security_group_ids: vec!["sg-12345678".into()],
            iam_instance_profile: "node-role".into(),
            user_data: Some(user_data.into()),
            block_device_mappings: vec![],
            metadata_http_tokens: Default::default(),
            metadata_hop_limit: 2,
            metadata_http_endpoint: Default::default(),
        },
        count: 1,
        tags: BTreeMap::from([
            (tags::CLUSTER.to_owned(), "test".to_owned()),
            (tags::POOL.to_owned(), "workers".to_owned()),
        ]),
        client_token: "kubelet-test".into(),
        existing_per_subnet: BTreeMap::new(),
    }
}

#[tokio::test]
async fn the_kubelet_simulator_walks_a_node_through_its_lifecycle() {
    let server = ApiServer::start_with_repo_crds().await;
    let client = server.client();
    let cloud = Arc::new(FakeCloud::new(FakeCloudConfig {
        pending_to_running: Duration::from_millis(100),
        stopping_to_stopped: Duration::from_millis(100),
        shutting_down_to_terminated: Duration::from_millis(100),
        ..Default::default()
    }));
    cloud.add_subnet("subnet-12345678", "us-east-1a");
    let _kubelet = KubeletSim::start(client.clone(), cloud.clone(), KubeletOptions::default());
    let _scheduler = Scheduler::start(client.clone());
    let _controllers = Controllers::start(client.clone());
    let user_data = "#!/bin/bash\n/etc/eks/bootstrap.sh c --kubelet-extra-args '--register-with-taints=node.eks.amazonaws.com/not-ready=true:NoSchedule --node-labels=team=ci'\n";
    let inst = cloud
        .launch(&launch_request(user_data))
        .await
        .instances
        .remove(0);
    let name = inst.private_dns_name.clone().unwrap();
    let nodes: Api<Node> = Api::all(client.clone());

    let node = eventually("registration", Duration::from_secs(10), || async {
        nodes.get_opt(&name).await.unwrap()
    })
    .await;
    assert_eq!(
        node.spec.as_ref().unwrap().provider_id.as_deref(),
        Some(format!("aws:///us-east-1a/{}", inst.id).as_str())
    );
    let labels = node.labels();
    assert_eq!(labels.get("team").map(String::as_str), Some("ci"));
    assert_eq!(
        labels
            .get("node.kubernetes.io/instance-type")
            .map(String::as_str),
        Some("m5.large")
    );
    assert_eq!(
        labels
            .get("topology.kubernetes.io/zone")
            .map(String::as_str),
        Some("us-east-1a")
    );
    let taints = node.spec.as_ref().unwrap().taints.clone().unwrap();
    assert_eq!(taints[0].key, "node.eks.amazonaws.com/not-ready");
    assert_eq!(
        node.status.as_ref().unwrap().allocatable.as_ref().unwrap()["cpu"].0,
        "1920m"
    );

    eventually(
        "Ready and network ready",
        Duration::from_secs(10),
        || async {
            let n = nodes.get(&name).await.unwrap();
            (condition(&n, "Ready").as_deref() == Some("True")
                && condition(&n, "NetworkUnavailable").as_deref() == Some("False"))
            .then_some(())
        },
    )
    .await;

    // A pod bound to the node runs, and its images land in status.images.
    nodes
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": null}})),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let job = pod(
        "job",
        json!({
            "restartPolicy": "Never",
            "initContainers": [{"name": "pull", "image": "llama:70b"}],
            "containers": [{"name": "c", "image": "runner:2", "resources": {"requests": {"cpu": "100m"}}}]
        }),
    );
    pods.create(&PostParams::default(), &job).await.unwrap();
    eventually("the job succeeded", Duration::from_secs(10), || async {
        let p = pods.get("job").await.unwrap();
        (p.status.as_ref()?.phase.as_deref() == Some("Succeeded")).then_some(())
    })
    .await;
    let images: Vec<String> = eventually("images recorded", Duration::from_secs(10), || async {
        let n = nodes.get(&name).await.unwrap();
        let images: Vec<String> = n
            .status?
            .images?
            .into_iter()
            .flat_map(|i| i.names.unwrap_or_default())
            .collect();
        (images.len() == 2).then_some(images)
    })
    .await;
    assert_eq!(images, ["llama:70b", "runner:2"]);

    // A deleted pod is terminated gracefully and the kubelet confirms the deletion.
    let server_pod = pod(
        "server",
        json!({"containers": [{"name": "c", "image": "server:1", "resources": {"requests": {"cpu": "100m"}}}]}),
    );
    pods.create(&PostParams::default(), &server_pod)
        .await
        .unwrap();
    eventually("the server running", Duration::from_secs(10), || async {
        (pods.get("server").await.unwrap().status?.phase.as_deref() == Some("Running"))
            .then_some(())
    })
    .await;
    pods.delete("server", &Default::default()).await.unwrap();
    eventually(
        "the deletion confirmed",
        Duration::from_secs(10),
        || async {
            pods.get_opt("server")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;

    // Stop: the node stays, Ready=Unknown. Start: Ready again, taints not re-added.
    cloud.stop_instances(std::slice::from_ref(&inst.id)).await;
    eventually(
        "Ready=Unknown after stop",
        Duration::from_secs(10),
        || async {
            let n = nodes.get_opt(&name).await.unwrap()?;
            (condition(&n, "Ready").as_deref() == Some("Unknown")).then_some(())
        },
    )
    .await;
    eventually("stopped", Duration::from_secs(5), || async {
        (cloud.instance(&inst.id)?.state == InstanceState::Stopped).then_some(())
    })
    .await;
    cloud.start_instances(std::slice::from_ref(&inst.id)).await;
    eventually("Ready after start", Duration::from_secs(10), || async {
        let n = nodes.get(&name).await.unwrap();
        (condition(&n, "Ready").as_deref() == Some("True")).then_some(())
    })
    .await;
    // The node lifecycle controller takes its unreachable taints off; the bootstrap's
    // taints are not registered again.
    eventually(
        "taints apply at first registration only",
        Duration::from_secs(10),
        || async {
            let n = nodes.get(&name).await.unwrap();
            n.spec?.taints.unwrap_or_default().is_empty().then_some(())
        },
    )
    .await;

    cloud
        .terminate_instances(std::slice::from_ref(&inst.id))
        .await;
    eventually(
        "node deleted after termination",
        Duration::from_secs(10),
        || async { nodes.get_opt(&name).await.unwrap().is_none().then_some(()) },
    )
    .await;
}

/// On the EC2 path the kubelet reads the instances from the emulator and takes labels and
/// taints from the user data, as with FakeCloud.
#[tokio::test]
async fn the_kubelet_simulator_plays_the_nodes_of_an_ec2_emulator() {
    use stratos::{
        cloud::{
            ec2::{Ec2Cloud, RetryPolicy},
            ratelimit::Limits,
        },
        metrics::CloudApiMetrics,
    };
    use testkit::{kubelet::Ec2Instances, moto::Moto};

    let Some(moto) = Moto::start() else { return };
    let account = moto.account().await;
    let raw = account.client.clone();
    let sdk = testkit::moto::sdk_config(&moto.endpoint()).await;
    let cloud = Ec2Cloud::new(
        &sdk,
        "e2e",
        Limits::default(),
        RetryPolicy::default(),
        Arc::new(CloudApiMetrics::detached()),
    );
    let mut request = launch_request(
        "#!/bin/bash\n/etc/eks/bootstrap.sh c --kubelet-extra-args '--register-with-taints=node.eks.amazonaws.com/not-ready=true:NoSchedule --node-labels=stratos.sh/pool=workers'\n",
    );
    request.spec.ami = account.ami.clone();
    // The subnet in us-east-1b.
    request.spec.subnet_ids = vec![account.subnets[1].0.clone()];
    request.spec.security_group_ids = vec![];
    let out = cloud.launch(&request).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let inst = out.instances[0].clone();

    let server = ApiServer::start_with_repo_crds().await;
    let client = server.client();
    let _kubelet = KubeletSim::start(
        client.clone(),
        Arc::new(Ec2Instances::new(raw.clone())),
        KubeletOptions::default(),
    );
    let nodes: Api<Node> = Api::all(client.clone());
    let name = inst.private_dns_name.clone().unwrap();
    let node = eventually(
        "the node of the moto instance",
        Duration::from_secs(15),
        || async { nodes.get_opt(&name).await.unwrap() },
    )
    .await;
    assert_eq!(
        node.spec.as_ref().unwrap().provider_id.as_deref(),
        Some(format!("aws:///us-east-1b/{}", inst.id).as_str())
    );
    assert_eq!(
        node.labels().get("stratos.sh/pool").map(String::as_str),
        Some("workers")
    );
    assert_eq!(
        node.spec.unwrap().taints.unwrap()[0].key,
        "node.eks.amazonaws.com/not-ready"
    );

    raw.terminate_instances()
        .instance_ids(&inst.id)
        .send()
        .await
        .unwrap();
    eventually(
        "the node deleted after termination",
        Duration::from_secs(15),
        || async { nodes.get_opt(&name).await.unwrap().is_none().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn instances_can_power_themselves_off_after_their_first_boot() {
    let server = ApiServer::start_with_repo_crds().await;
    let client = server.client();
    let cloud = Arc::new(FakeCloud::new(FakeCloudConfig {
        pending_to_running: Duration::from_millis(100),
        stopping_to_stopped: Duration::from_millis(100),
        ..Default::default()
    }));
    cloud.add_subnet("subnet-12345678", "us-east-1a");
    let options = KubeletOptions {
        poweroff_after_ready: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let _kubelet = KubeletSim::start(client.clone(), cloud.clone(), options);
    let inst = cloud
        .launch(&launch_request("#!/bin/bash\npoweroff\n"))
        .await
        .instances
        .remove(0);
    let nodes: Api<Node> = Api::all(client.clone());
    let name = inst.private_dns_name.clone().unwrap();
    eventually(
        "stopped by itself after registering",
        Duration::from_secs(10),
        || async {
            let stopped = cloud.instance(&inst.id)?.state == InstanceState::Stopped;
            (stopped && nodes.get_opt(&name).await.unwrap().is_some()).then_some(())
        },
    )
    .await;
    assert_eq!(
        cloud.call_count(stratos::cloud::ratelimit::Operation::StopInstances),
        0,
        "the OS, not the API, stopped it"
    );
    // The second boot stays up.
    cloud.start_instances(std::slice::from_ref(&inst.id)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cloud.instance(&inst.id).unwrap().state,
        InstanceState::Running
    );
}

fn condition(n: &Node, t: &str) -> Option<String> {
    n.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| c.status.clone())
}

/// A running instance's Ready node, with the simulator, scheduler and controllers.
async fn one_ready_node() -> (
    ApiServer,
    Arc<FakeCloud>,
    Vec<Box<dyn std::any::Any>>,
    String,
) {
    let server = ApiServer::start_with_repo_crds().await;
    let client = server.client();
    let cloud = Arc::new(FakeCloud::new(FakeCloudConfig {
        pending_to_running: Duration::from_millis(100),
        stopping_to_stopped: Duration::from_millis(100),
        shutting_down_to_terminated: Duration::from_millis(100),
        ..Default::default()
    }));
    cloud.add_subnet("subnet-12345678", "us-east-1a");
    let handles: Vec<Box<dyn std::any::Any>> = vec![
        Box::new(KubeletSim::start(
            client.clone(),
            cloud.clone(),
            KubeletOptions::default(),
        )),
        Box::new(Scheduler::start(client.clone())),
        Box::new(Controllers::start(client.clone())),
    ];
    let inst = cloud
        .launch(&launch_request("#!/bin/bash\n"))
        .await
        .instances
        .remove(0);
    let name = inst.private_dns_name.clone().unwrap();
    let nodes: Api<Node> = Api::all(client);
    eventually("the node Ready", Duration::from_secs(10), || async {
        let n = nodes.get_opt(&name).await.unwrap()?;
        (condition(&n, "Ready").as_deref() == Some("True")).then_some(())
    })
    .await;
    (server, cloud, handles, name)
}

fn taint_keys(node: &Node) -> Vec<String> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|t| format!("{}:{}", t.key, t.effect))
        .collect()
}

#[tokio::test]
async fn the_node_lifecycle_taints_follow_readiness_and_cordons() {
    let (server, cloud, _handles, name) = one_ready_node().await;
    let nodes: Api<Node> = Api::all(server.client());
    eventually(
        "not-ready taint removed",
        Duration::from_secs(10),
        || async {
            taint_keys(&nodes.get(&name).await.unwrap())
                .is_empty()
                .then_some(())
        },
    )
    .await;
    nodes
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    eventually("a cordon is a taint", Duration::from_secs(10), || async {
        (taint_keys(&nodes.get(&name).await.unwrap())
            == ["node.kubernetes.io/unschedulable:NoSchedule"])
        .then_some(())
    })
    .await;
    let id = cloud.all_instances()[0].id.clone();
    cloud.stop_instances(std::slice::from_ref(&id)).await;
    eventually(
        "unreachable when stopped",
        Duration::from_secs(10),
        || async {
            let keys = taint_keys(&nodes.get(&name).await.unwrap());
            (keys.contains(&"node.kubernetes.io/unreachable:NoSchedule".to_owned())
                && keys.contains(&"node.kubernetes.io/unreachable:NoExecute".to_owned()))
            .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_deleted_pod_stays_terminating_for_its_shutdown_time() {
    let (server, _cloud, _handles, name) = one_ready_node().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let mut p = pod(
        "job",
        json!({"nodeName": name, "terminationGracePeriodSeconds": 30}),
    );
    p.metadata.annotations = Some(BTreeMap::from([(
        testkit::kubelet::SHUTDOWN_AFTER_ANNOTATION.to_owned(),
        "2s".to_owned(),
    )]));
    pods.create(&PostParams::default(), &p).await.unwrap();
    eventually("running", Duration::from_secs(10), || async {
        (pods.get("job").await.unwrap().status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    let deleted = std::time::Instant::now();
    pods.delete("job", &Default::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let terminating = pods.get_opt("job").await.unwrap().expect("still there");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    eventually(
        "gone after its shutdown",
        Duration::from_secs(10),
        || async { pods.get_opt("job").await.unwrap().is_none().then_some(()) },
    )
    .await;
    let took = deleted.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn the_scheduler_refuses_anti_affinity_spread_ports_and_cordons_in_its_words() {
    let server = ApiServer::start_with_repo_crds().await;
    let client = server.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    for (name, zone) in [("n1", "a"), ("n2", "b")] {
        ready_node(
            &nodes,
            name,
            json!({"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone}),
            json!([]),
            "4",
        )
        .await;
    }
    let _scheduler = Scheduler::start(client.clone());
    let _controllers = Controllers::start(client.clone());
    let web = |name: &str, extra: Value| {
        let mut p = pod(name, extra);
        p.metadata.labels = Some(BTreeMap::from([("app".to_owned(), "web".to_owned())]));
        p
    };
    let anti = json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}});
    for i in 0..3 {
        pods.create(
            &PostParams::default(),
            &web(&format!("web-{i}"), anti.clone()),
        )
        .await
        .unwrap();
    }
    let placed: Vec<Option<String>> = {
        let mut out = Vec::new();
        for i in 0..3 {
            let name = format!("web-{i}");
            out.push(
                eventually(&name, Duration::from_secs(10), || async {
                    let p = pods.get(&name).await.unwrap();
                    if let Some(n) = scheduled(&p) {
                        return Some(Some(n));
                    }
                    unschedulable_message(&p).map(|m| {
                        assert_eq!(
                            m,
                            "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules."
                        );
                        None
                    })
                })
                .await,
            );
        }
        out
    };
    let bound: std::collections::BTreeSet<_> = placed.iter().flatten().collect();
    assert_eq!(bound.len(), 2, "one replica per node: {placed:?}");
    assert_eq!(placed.iter().filter(|p| p.is_none()).count(), 1);

    // Host ports: with n2 cordoned, a second pod wanting host port 8080 finds n1's taken.
    nodes
        .patch(
            "n2",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    let port = json!({"containers": [{"name": "c", "image": "app:1", "ports": [{"containerPort": 80, "hostPort": 8080}]}]});
    pods.create(&PostParams::default(), &pod("port-1", port.clone()))
        .await
        .unwrap();
    eventually("port-1 on n1", Duration::from_secs(10), || async {
        scheduled(&pods.get("port-1").await.unwrap()).filter(|n| n == "n1")
    })
    .await;
    pods.create(&PostParams::default(), &pod("port-2", port))
        .await
        .unwrap();
    let message = eventually("port-2 refused", Duration::from_secs(10), || async {
        unschedulable_message(&pods.get("port-2").await.unwrap())
    })
    .await;
    assert_eq!(
        message,
        "0/2 nodes are available: 1 node(s) didn't have free ports for the requested pod ports, 1 node(s) were unschedulable."
    );
}

#[tokio::test]
async fn a_paced_scheduler_marks_a_burst_over_time() {
    let server = ApiServer::start_with_repo_crds().await;
    let client = server.client();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    for i in 0..20 {
        pods.create(
            &PostParams::default(),
            &pod(&format!("p-{i}"), json!({"nodeSelector": {"pool": "none"}})),
        )
        .await
        .unwrap();
    }
    let started = std::time::Instant::now();
    let _scheduler = testkit::scheduler::Scheduler::start_with(
        client.clone(),
        testkit::scheduler::SchedulerOptions {
            api_qps: Some(10.0),
            api_burst: 5,
        },
    );
    eventually("every pod marked", Duration::from_secs(10), || async {
        let list = pods.list(&ListParams::default()).await.unwrap();
        list.items
            .iter()
            .all(|p| unschedulable_message(p).is_some())
            .then_some(())
    })
    .await;
    // 5 at once, then 15 at 10 a second.
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1300), "{took:?}");
}
