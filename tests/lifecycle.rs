//! End to end: the real Stratos controllers against the embedded API server, scheduler,
//! DaemonSet controller, kubelet simulator and FakeCloud (SPEC §5.1–§5.3, §5.7, §11).
//! Every test ends by asserting the invariants held throughout.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::json;
use stratos::{
    api::{AWSNodeClass, NodePool},
    cloud::{InstanceState, ratelimit::Operation, tags},
};
use testkit::{
    harness::{ClusterOptions, TestCluster},
    kubelet::KubeletOptions,
    scheduler::SchedulerOptions,
};

const QUICKSTART: &str = include_str!("../examples/quickstart.yaml");
const AWS_NODE: &str = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: aws-node
  namespace: kube-system
spec:
  selector:
    matchLabels: {k8s-app: aws-node}
  template:
    metadata:
      labels: {k8s-app: aws-node}
    spec:
      tolerations: [{operator: Exists}]
      containers:
        - name: aws-node
          image: amazon-k8s-cni:v1.19.0
          resources: {requests: {cpu: 25m}}
"#;

fn class_doc() -> &'static str {
    QUICKSTART.split("---").next().unwrap()
}

fn pool_doc() -> &'static str {
    QUICKSTART.split("---").nth(1).unwrap()
}

fn print_pools(cluster: &TestCluster) {
    if let Some(table) = cluster.kubectl(&["get", "np"]) {
        println!("$ kubectl get np\n{table}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_a_pool_to_min_standby() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    cluster.apply_yaml(AWS_NODE).await;
    let _operator = cluster.start_operator();
    cluster.apply_yaml(QUICKSTART).await;
    cluster
        .wait_for("warmup in progress", Duration::from_secs(10), || async {
            let s = cluster.pool_status("workers").await?;
            (s.warmup > 0).then_some(())
        })
        .await;
    print_pools(&cluster);
    cluster.wait_standby("workers", 3, 3).await;
    print_pools(&cluster);

    let instances = cluster.pool_instances("workers");
    assert_eq!(instances.len(), 3);
    assert_eq!(cluster.launched(), 3, "exactly minStandby launched");
    assert_eq!(
        cluster.cloud.call_count(Operation::RunInstances),
        1,
        "one batched launch"
    );
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    for inst in &instances {
        assert_eq!(inst.state, InstanceState::Stopped, "{}", inst.id);
        assert_eq!(inst.tag(tags::STATE), Some("standby"));
        assert_eq!(inst.tag(tags::CLUSTER), Some(cluster.cluster_name.as_str()));
        assert!(inst.tag(tags::NODECLASS_HASH).is_some());
        let node = nodes
            .get(inst.private_dns_name.as_deref().unwrap())
            .await
            .unwrap();
        let labels = node.labels();
        assert_eq!(
            labels.get("stratos.sh/pool"),
            Some(&cluster.name("workers"))
        );
        assert_eq!(
            labels.get("stratos.sh/state").map(String::as_str),
            Some("standby")
        );
        let spec = node.spec.unwrap();
        assert_eq!(spec.unschedulable, Some(true), "standby nodes are cordoned");
        let taints: Vec<String> = spec
            .taints
            .unwrap()
            .iter()
            .map(|t| {
                format!(
                    "{}={}:{}",
                    t.key,
                    t.value.clone().unwrap_or_default(),
                    t.effect
                )
            })
            .collect();
        assert!(
            taints.contains(&"stratos.sh/standby=true:NoSchedule".to_owned()),
            "{taints:?}"
        );
        assert!(
            taints.contains(&"node.eks.amazonaws.com/not-ready=true:NoSchedule".to_owned()),
            "startup taints are back for the next boot: {taints:?}"
        );
        // The DaemonSet pod ran on the node during warmup: its image is on disk.
        let images: Vec<String> = node
            .status
            .unwrap()
            .images
            .unwrap_or_default()
            .into_iter()
            .flat_map(|i| i.names.unwrap_or_default())
            .collect();
        assert!(
            images.contains(&"amazon-k8s-cni:v1.19.0".to_owned()),
            "{images:?}"
        );
    }
    let status = cluster.pool_status("workers").await.unwrap();
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True");
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "False");
    let class = Api::<AWSNodeClass>::all(cluster.client.clone())
        .get(&cluster.name("workers"))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(class.node_pools, vec![cluster.name("workers")]);
    assert_eq!(class.subnets[0].zone, "us-east-1a");
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warmup_cut_short_by_a_self_stop_is_resumed() {
    // DaemonSet pods take a while to start, so the bootstrap's poweroff comes first: the
    // node is not warm (its DaemonSet image is not on disk), and must not count as standby.
    let options = ClusterOptions {
        kubelet: KubeletOptions {
            pod_start_after: Duration::from_millis(1500),
            poweroff_after_ready: Some(Duration::from_millis(200)),
            ..Default::default()
        },
        ..Default::default()
    };
    let cluster = TestCluster::start(options).await;
    cluster.apply_yaml(AWS_NODE).await;
    let operator = cluster.start_operator();
    let t0 = tokio::time::Instant::now();
    // The model image too: its pull outlasts the user data's poweroff delay.
    cluster
        .apply_yaml(&QUICKSTART.replace(
            "minStandby: 3",
            "minStandby: 3\n  preWarm:\n    imagesToPull:\n      - \"my-registry.com/llama-3:70b\"",
        ))
        .await;
    cluster.wait_standby("workers", 3, 3).await;
    assert_eq!(cluster.launched(), 3);
    for c in cluster.cloud.calls() {
        if matches!(
            c.operation,
            Operation::RunInstances | Operation::StartInstances | Operation::StopInstances
        ) {
            println!(
                "resumed warmup: +{:.1}s {} {:?}",
                (c.at - t0).as_secs_f64(),
                c.operation.as_str(),
                c.ids
            );
        }
    }
    // Each was started again (no user data runs then), finished warming up, and was stopped
    // by Stratos itself.
    let restarted: std::collections::BTreeSet<String> = cluster
        .cloud
        .calls()
        .iter()
        .filter(|c| c.operation == Operation::StartInstances)
        .flat_map(|c| c.ids.clone())
        .collect();
    assert_eq!(restarted.len(), 3, "every cut-short warmup resumed");
    assert!(cluster.cloud.call_count(Operation::StopInstances) >= 1);
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    for inst in cluster.pool_instances("workers") {
        let node = nodes
            .get(inst.private_dns_name.as_deref().unwrap())
            .await
            .unwrap();
        let images: Vec<String> = node
            .status
            .unwrap()
            .images
            .unwrap_or_default()
            .into_iter()
            .flat_map(|i| i.names.unwrap_or_default())
            .collect();
        assert!(
            images.contains(&"amazon-k8s-cni:v1.19.0".to_owned())
                && images.contains(&"my-registry.com/llama-3:70b".to_owned()),
            "standby only once the DaemonSet and model images are on disk: {images:?}"
        );
    }
    let metrics = operator.metrics.render();
    assert!(
        metrics.contains(&format!(
            "stratos_warmup_results_total{{pool=\"{}\",result=\"resumed\"}} 3",
            cluster.name("workers")
        )),
        "{metrics}"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(cluster.client.clone());
    let resumed = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .any(|e| {
            e.reason.as_deref() == Some("WarmupResumed")
                && e.regarding.and_then(|r| r.name) == Some(cluster.name("workers"))
        });
    assert!(resumed, "a WarmupResumed event on the pool");
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_warmup_deadline_terminates_or_stops() {
    for action in ["terminate", "stop"] {
        // The node never registers.
        let options = ClusterOptions {
            kubelet: KubeletOptions {
                register_after: Duration::from_secs(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let cluster = TestCluster::start(options).await;
        let _operator = cluster.start_operator();
        cluster.apply_yaml(class_doc()).await;
        let pool = pool_doc().replace(
            "minStandby: 3",
            &format!("minStandby: 1\n  preWarm:\n    timeout: 2s\n    timeoutAction: {action}"),
        );
        cluster.apply_yaml(&pool).await;
        if action == "terminate" {
            cluster
                .wait_for(
                    "a timed-out instance terminated and replaced",
                    Duration::from_secs(20),
                    || async {
                        (cluster.cloud.call_count(Operation::TerminateInstances) >= 1
                            && cluster.launched() >= 2)
                            .then_some(())
                    },
                )
                .await;
            assert!(
                cluster.pool_instances("workers").len() <= 1,
                "never more than minStandby warming"
            );
        } else {
            cluster.wait_standby("workers", 1, 1).await;
            let inst = &cluster.pool_instances("workers")[0];
            assert_eq!(inst.state, InstanceState::Stopped);
            assert_eq!(inst.tag(tags::STATE), Some("standby"));
            assert_eq!(cluster.launched(), 1);
        }
        cluster.invariants.assert_held().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_pool_size_trims_standby_nodes() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster.apply_yaml(QUICKSTART).await;
    cluster.wait_standby("workers", 3, 3).await;
    cluster
        .apply_yaml(
            &pool_doc()
                .replace("poolSize: 10", "poolSize: 1")
                .replace("minStandby: 3", "minStandby: 1"),
        )
        .await;
    cluster.wait_standby("workers", 1, 1).await;
    print_pools(&cluster);
    assert_eq!(cluster.pool_instances("workers").len(), 1);
    assert_eq!(cluster.launched(), 3);
    let nodes = Api::<Node>::all(cluster.client.clone())
        .list(
            &ListParams::default().labels(&format!("stratos.sh/pool={}", cluster.name("workers"))),
        )
        .await
        .unwrap();
    cluster
        .wait_for("trimmed nodes deleted", Duration::from_secs(10), || async {
            let n = Api::<Node>::all(cluster.client.clone())
                .list(
                    &ListParams::default()
                        .labels(&format!("stratos.sh/pool={}", cluster.name("workers"))),
                )
                .await
                .ok()?;
            (n.items.len() == 1).then_some(())
        })
        .await;
    drop(nodes);
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_ami_replaces_standby_nodes() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    cluster.cloud.add_image("ami-0fedcba9876543210");
    let _operator = cluster.start_operator();
    cluster.apply_yaml(QUICKSTART).await;
    cluster.wait_standby("workers", 3, 3).await;
    let old: Vec<String> = cluster
        .pool_instances("workers")
        .into_iter()
        .map(|i| i.id)
        .collect();
    cluster
        .apply_yaml(&class_doc().replace("ami-0123456789abcdef0", "ami-0fedcba9876543210"))
        .await;
    cluster
        .wait_for(
            "every standby node replaced",
            Duration::from_secs(40),
            || async {
                let now = cluster.pool_instances("workers");
                let s = cluster.pool_status("workers").await?;
                (now.len() == 3
                    && now.iter().all(|i| !old.contains(&i.id))
                    && s.standby == 3
                    && s.warmup == 0)
                    .then_some(())
            },
        )
        .await;
    let hashes: std::collections::BTreeSet<String> = cluster
        .pool_instances("workers")
        .iter()
        .filter_map(|i| i.tag(tags::NODECLASS_HASH).map(str::to_owned))
        .collect();
    assert_eq!(hashes.len(), 1);
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_pool_leaves_nothing_behind() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster.apply_yaml(QUICKSTART).await;
    cluster.wait_standby("workers", 3, 3).await;
    // The class is in use: deleting it waits for the pool.
    let classes: Api<AWSNodeClass> = Api::all(cluster.client.clone());
    classes
        .delete(&cluster.name("workers"), &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = classes.get(&cluster.name("workers")).await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    assert_eq!(
        held.status.unwrap().node_pools,
        vec![cluster.name("workers")],
        "the status names the pools holding it"
    );
    let pools: Api<NodePool> = Api::all(cluster.client.clone());
    pools
        .delete(&cluster.name("workers"), &DeleteParams::default())
        .await
        .unwrap();
    cluster
        .wait_for(
            "the pool, its instances and nodes gone",
            Duration::from_secs(30),
            || async {
                let gone = pools
                    .get_opt(&cluster.name("workers"))
                    .await
                    .ok()?
                    .is_none();
                let nodes = Api::<Node>::all(cluster.client.clone())
                    .list(
                        &ListParams::default()
                            .labels(&format!("stratos.sh/pool={}", cluster.name("workers"))),
                    )
                    .await
                    .ok()?;
                (gone && cluster.pool_instances("workers").is_empty() && nodes.items.is_empty())
                    .then_some(())
            },
        )
        .await;
    // Once the pool is gone, the class goes too.
    cluster
        .wait_for("the class deleted", Duration::from_secs(10), || async {
            classes
                .get_opt(&cluster.name("workers"))
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await;
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_node_class_degrades_the_pool_until_it_exists() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster.apply_yaml(pool_doc()).await;
    let degraded = |reason: &'static str| {
        let cluster = &cluster;
        move || async move {
            let s = cluster.pool_status("workers").await?;
            let c = s.conditions.iter().find(|c| c.type_ == "Degraded")?;
            (c.reason == reason).then_some(c.status.clone())
        }
    };
    let status = cluster
        .wait_for(
            "Degraded NodeClassNotFound",
            Duration::from_secs(10),
            degraded("NodeClassNotFound"),
        )
        .await;
    assert_eq!(status, "True");
    assert_eq!(cluster.launched(), 0);
    // A class referring to a subnet that does not exist: not ready, still nothing launched.
    cluster
        .apply_yaml(&class_doc().replace("subnet-12345678", "subnet-0badbad0"))
        .await;
    cluster
        .wait_for(
            "Degraded NodeClassNotReady",
            Duration::from_secs(10),
            degraded("NodeClassNotReady"),
        )
        .await;
    let class = Api::<AWSNodeClass>::all(cluster.client.clone())
        .get(&cluster.name("workers"))
        .await
        .unwrap();
    let ready = class
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("subnet-0badbad0"),
        "{}",
        ready.message
    );
    assert_eq!(cluster.launched(), 0);
    // Fixed: the pool recovers and the condition clears.
    cluster.apply_yaml(class_doc()).await;
    cluster.wait_standby("workers", 3, 3).await;
    let status = cluster
        .wait_for(
            "Degraded cleared",
            Duration::from_secs(10),
            degraded("AsExpected"),
        )
        .await;
    assert_eq!(status, "False");
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_warmup_launches_nothing_extra() {
    let options = ClusterOptions {
        kubelet: KubeletOptions {
            ready_after: Duration::from_secs(2),
            ..Default::default()
        },
        ..Default::default()
    };
    let cluster = TestCluster::start(options).await;
    let operator = cluster.start_operator();
    cluster.apply_yaml(QUICKSTART).await;
    cluster
        .wait_for("instances launched", Duration::from_secs(10), || async {
            (cluster.launched() == 3).then_some(())
        })
        .await;
    operator.kill();
    // A new operator process: nothing in memory, only EC2 and the API server.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _operator = cluster.start_operator();
    cluster.wait_standby("workers", 3, 3).await;
    assert_eq!(
        cluster.launched(),
        3,
        "the restarted operator launched nothing extra"
    );
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_errors_are_conditions_not_crash_loops() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    cluster.cloud.inject(
        Operation::RunInstances,
        stratos::cloud::fake::Fault::InsufficientCapacity,
        2,
    );
    let _operator = cluster.start_operator();
    cluster.apply_yaml(QUICKSTART).await;
    cluster
        .wait_for(
            "Degraded InsufficientCapacity",
            Duration::from_secs(10),
            || async {
                let s = cluster.pool_status("workers").await?;
                s.conditions
                    .iter()
                    .any(|c| {
                        c.type_ == "Degraded"
                            && c.reason == "InsufficientCapacity"
                            && c.status == "True"
                    })
                    .then_some(())
            },
        )
        .await;
    cluster.wait_standby("workers", 3, 3).await;
    let s = cluster.pool_status("workers").await.unwrap();
    assert!(
        s.conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.status == "False")
    );
    // The listing fails for a while: Degraded with CloudError, counts kept, then recovery.
    cluster.cloud.inject(
        Operation::DescribeInstances,
        stratos::cloud::fake::Fault::ApiError("InternalError: EC2 is having a bad day".into()),
        3,
    );
    cluster
        .wait_for("Degraded CloudError", Duration::from_secs(10), || async {
            let s = cluster.pool_status("workers").await?;
            let c = s.conditions.iter().find(|c| c.type_ == "Degraded")?;
            (c.reason == "CloudError"
                && c.status == "True"
                && c.message.contains("bad day")
                && s.standby == 3)
                .then_some(())
        })
        .await;
    cluster
        .wait_for(
            "Degraded cleared after the listing recovers",
            Duration::from_secs(20),
            || async {
                let s = cluster.pool_status("workers").await?;
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Degraded" && c.status == "False")
                    .then_some(())
            },
        )
        .await;
    let _ = Api::<NodePool>::all(cluster.client.clone())
        .patch(
            &cluster.name("workers"),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await;
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_to_pull_are_pulled_during_warmup() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster.apply_yaml(class_doc()).await;
    let pool = pool_doc().replace(
        "minStandby: 3",
        "minStandby: 1\n  preWarm:\n    imagesToPull:\n      - \"my-registry.com/llama-3:70b\"",
    );
    cluster.apply_yaml(&pool).await;
    cluster.wait_standby("workers", 1, 1).await;
    let inst = &cluster.pool_instances("workers")[0];
    let node = Api::<Node>::all(cluster.client.clone())
        .get(inst.private_dns_name.as_deref().unwrap())
        .await
        .unwrap();
    let images: Vec<String> = node
        .status
        .unwrap()
        .images
        .unwrap_or_default()
        .into_iter()
        .flat_map(|i| i.names.unwrap_or_default())
        .collect();
    assert!(
        images.contains(&"my-registry.com/llama-3:70b".to_owned()),
        "the model image is on disk: {images:?}"
    );
    let pod = cluster
        .pods()
        .get(&format!("stratos-prepull-{}", node.metadata.name.unwrap()))
        .await
        .unwrap();
    let spec = pod.spec.unwrap();
    let init = spec.init_containers.unwrap();
    assert_eq!(
        init[0].command.as_deref(),
        Some(
            &[
                "/stratos".to_owned(),
                "install-noop".to_owned(),
                "/stratos-bin/noop".to_owned()
            ][..]
        )
    );
    assert_eq!(
        init[1].image.as_deref(),
        Some("my-registry.com/llama-3:70b")
    );
    assert_eq!(
        init[1].command.as_deref(),
        Some(&["/stratos-bin/noop".to_owned()][..]),
        "no shell needed in the pulled image"
    );
    assert_eq!(init[1].image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Succeeded"));
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_vanished_pools_and_nodes_of_gone_instances_are_collected() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster.apply_yaml(QUICKSTART).await;
    cluster.wait_standby("workers", 3, 3).await;
    // An instance of this cluster whose pool no longer exists (its finalizer was forced off).
    let tags_of = |pool: &str| {
        [
            (tags::CLUSTER, cluster.cluster_name.as_str()),
            (tags::POOL, pool),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    };
    let orphan = cluster
        .cloud
        .insert_foreign_instance(tags_of("ghost"), InstanceState::Stopped);
    // Another cluster's instance with the same pool name is not ours to touch.
    let mut foreign_tags: std::collections::BTreeMap<String, String> = tags_of("ghost");
    foreign_tags.insert(tags::CLUSTER.into(), "other".into());
    let foreign = cluster
        .cloud
        .insert_foreign_instance(foreign_tags, InstanceState::Stopped);
    cluster
        .wait_for("the orphan terminated", Duration::from_secs(20), || async {
            cluster
                .cloud
                .instance(&orphan)
                .is_none_or(|i| !i.state.is_live())
                .then_some(())
        })
        .await;
    assert_eq!(
        cluster.cloud.instance(&foreign).unwrap().state,
        InstanceState::Stopped
    );

    // A pool node whose instance vanished from EC2 is deleted.
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let ghost_name = format!("ip-10-99-0-1.{}", cluster.dns_domain());
    let ghost: Node = serde_json::from_value(json!({
        "metadata": {"name": ghost_name, "labels": {"stratos.sh/pool": cluster.name("workers")}},
        "spec": {"providerID": "aws:///us-east-1a/i-0000000000dead01"}
    }))
    .unwrap();
    nodes.create(&Default::default(), &ghost).await.unwrap();
    cluster
        .wait_for(
            "the node of the gone instance deleted",
            Duration::from_secs(30),
            || async {
                nodes
                    .get_opt(&ghost_name)
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())
            },
        )
        .await;
    assert_eq!(
        cluster.pool_instances("workers").len(),
        3,
        "the pool itself is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_starts_the_bin_packed_number_of_standby_nodes_in_a_handful_of_calls() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let operator = cluster.start_operator();
    cluster.apply_yaml(QUICKSTART).await;
    cluster.wait_standby("workers", 3, 3).await;
    let starts_before = cluster.cloud.call_count(Operation::StartInstances);
    // m5.large nodes have 1920m allocatable: two 900m pods per node, so three nodes. The
    // six arrive together, as a burst does.
    let jobs: Vec<String> = (0..6)
        .map(|i| format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: job-{i}\n  namespace: default\nspec:\n  nodeSelector:\n    stratos.sh/pool: workers\n  containers:\n    - name: c\n      image: runner:1\n      resources:\n        requests:\n          cpu: 900m\n"
        ))
        .collect();
    futures::future::join_all(jobs.iter().map(|job| cluster.apply_yaml(job))).await;
    cluster.wait_pods_running(6, Duration::from_secs(30)).await;
    let starts = cluster.starts_since(starts_before, "burst of 6");
    // Group commit (SPEC §6): one call when the scheduler marks the six together; a real
    // scheduler under load may mark them more than the idle gap apart, and the burst is then
    // served by a handful of calls — never by more nodes.
    assert!(
        (1..=3).contains(&starts.len()),
        "a handful of StartInstances calls for the burst"
    );
    let nodes: Vec<&String> = starts.iter().flat_map(|c| &c.ids).collect();
    assert_eq!(nodes.len(), 3, "exactly the bin-packed number of nodes");
    let status = cluster.pool_status("workers").await.unwrap();
    let last = status.last_scale_up.expect("lastScaleUp recorded");
    if starts.len() == 1 {
        assert_eq!((last.nodes, last.pods), (3, 6));
    } else {
        assert_eq!(last.nodes as usize, starts.last().unwrap().ids.len());
    }
    cluster
        .wait_for(
            "running nodes counted and standby replenished",
            Duration::from_secs(30),
            || async {
                let s = cluster.pool_status("workers").await?;
                (s.running == 3 && s.standby == 3).then_some(())
            },
        )
        .await;
    // The latencies users feel, as Prometheus sees them.
    let metrics = operator.metrics.render();
    let count = |family: &str| -> f64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "{family}_count{{pool=\"{}\"}}",
                    cluster.name("workers")
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    for line in metrics
        .lines()
        .filter(|l| l.contains("_count{") || l.contains("scale_up_nodes_total"))
    {
        println!("{line}");
    }
    assert_eq!(
        count("stratos_scale_up_decision_seconds"),
        6.0,
        "one decision latency per pod"
    );
    assert_eq!(
        count("stratos_pod_pending_to_scheduled_seconds"),
        6.0,
        "every pod's wait until scheduled"
    );
    assert_eq!(
        count("stratos_node_start_to_ready_seconds"),
        3.0,
        "every started node's start to Ready"
    );
    assert!(
        metrics.contains(&format!(
            "stratos_scale_up_nodes_total{{pool=\"{}\",source=\"standby\"}} 3",
            cluster.name("workers")
        )),
        "{metrics}"
    );
    print_pools(&cluster);
    cluster.invariants.assert_held().await;
}

const SCALE_TO_ZERO: &str = include_str!("../examples/scale-to-zero.yaml");

fn pod_yaml(name: &str, pool: &str, cpu: &str, extra_labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    app: web\n{extra_labels}spec:\n  nodeSelector:\n    stratos.sh/pool: {pool}\n  containers:\n    - name: c\n      image: web:1\n      resources:\n        requests:\n          cpu: {cpu}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_to_zero_starts_one_node_and_returns_it_to_standby() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster
        .apply_yaml(&SCALE_TO_ZERO.replace("emptyNodeTTL: 2m", "emptyNodeTTL: 2s"))
        .await;
    cluster.wait_standby("on-demand", 2, 2).await;
    assert_eq!(
        cluster.pool_status("on-demand").await.unwrap().running,
        0,
        "no running nodes"
    );
    let stops_before = cluster.cloud.call_count(Operation::StopInstances);
    cluster
        .apply_yaml(&pod_yaml("web", "on-demand", "500m", ""))
        .await;
    let pods = cluster.pods();
    let node = cluster
        .wait_for(
            "the pod running on a started node",
            Duration::from_secs(30),
            || async {
                let p = pods.get("web").await.ok()?;
                (p.status.as_ref()?.phase.as_deref() == Some("Running"))
                    .then(|| p.spec.unwrap().node_name.unwrap())
            },
        )
        .await;
    let started: std::collections::BTreeSet<String> = cluster
        .cloud
        .calls()
        .iter()
        .filter(|c| c.operation == Operation::StartInstances)
        .flat_map(|c| c.ids.clone())
        .collect();
    assert_eq!(started.len(), 1, "one pod, one node");
    assert_eq!(
        cluster.cloud.call_count(Operation::StartInstances),
        1,
        "and one call"
    );
    // The service scales to zero: the node is empty, and after the TTL back in standby.
    pods.delete("web", &DeleteParams::default()).await.unwrap();
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    cluster
        .wait_for(
            "the node back in standby",
            Duration::from_secs(30),
            || async {
                let n = nodes.get(&node).await.ok()?;
                (n.labels().get("stratos.sh/state").map(String::as_str) == Some("standby"))
                    .then_some(())
            },
        )
        .await;
    cluster
        .wait_for("no running nodes", Duration::from_secs(30), || async {
            let s = cluster.pool_status("on-demand").await?;
            (s.running == 0 && s.draining == 0 && s.standby >= 2).then_some(())
        })
        .await;
    assert!(cluster.cloud.call_count(Operation::StopInstances) > stops_before);
    let inst = cluster.instance_of_node(&node);
    assert!(matches!(
        inst.state,
        InstanceState::Stopped | InstanceState::Stopping
    ));
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdb_blocked_drain_is_aborted_and_the_node_runs_again() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster
        .apply_yaml(
            &SCALE_TO_ZERO
                .replace("emptyNodeTTL: 2m", "emptyNodeTTL: 1s")
                .replace("drainTimeout: 30s", "drainTimeout: 2s"),
        )
        .await;
    cluster.wait_standby("on-demand", 2, 2).await;
    cluster
        .apply_yaml("apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: web\n  namespace: default\nspec:\n  minAvailable: 1\n  selector:\n    matchLabels:\n      app: web\n")
        .await;
    cluster
        .apply_yaml(&pod_yaml("web", "on-demand", "500m", ""))
        .await;
    let pods = cluster.pods();
    let node = cluster
        .running_node_of("web", Duration::from_secs(30))
        .await;
    // The race a drain can meet: the pod landed as the drain began. Its PDB forbids eviction.
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    cluster.begin_drain(&node).await;
    cluster
        .wait_for(
            "the drain aborted: running and schedulable again",
            Duration::from_secs(20),
            || async {
                let n = nodes.get(&node).await.ok()?;
                let running =
                    n.labels().get("stratos.sh/state").map(String::as_str) == Some("running");
                (running && n.spec?.unschedulable != Some(true)).then_some(())
            },
        )
        .await;
    let p = pods.get("web").await.unwrap();
    assert!(
        p.metadata.deletion_timestamp.is_none(),
        "nothing is force-deleted"
    );
    assert_eq!(p.status.unwrap().phase.as_deref(), Some("Running"));
    let inst = cluster.instance_of_node(&node);
    assert_eq!(
        inst.state,
        InstanceState::Running,
        "never stopped under its pod"
    );
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_standby_exhausted_the_burst_launches_new_nodes_up_to_pool_size() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster
        .apply_yaml(&QUICKSTART.replace("poolSize: 10", "poolSize: 6"))
        .await;
    cluster.wait_standby("workers", 3, 3).await;
    // Ten 900m pods: two per m5.large, five nodes; three are in standby, two must be launched.
    for i in 0..10 {
        cluster
            .apply_yaml(&pod_yaml(&format!("job-{i}"), "workers", "900m", ""))
            .await;
    }
    cluster.wait_pods_running(10, Duration::from_secs(45)).await;
    assert!(
        cluster.pool_instances("workers").len() <= 6,
        "never above poolSize"
    );
    let s = cluster.pool_status("workers").await.unwrap();
    println!(
        "after the burst: running={} standby={} warmup={} total={}",
        s.running, s.standby, s.warmup, s.total
    );
    assert!(s.running >= 5);
    print_pools(&cluster);
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_no_pool_can_serve_starts_nothing() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster.apply_yaml(QUICKSTART).await;
    cluster.wait_standby("workers", 3, 3).await;
    cluster
        .apply_yaml(&pod_yaml(
            "misfit",
            "gpu-pool-that-does-not-exist",
            "100m",
            "",
        ))
        .await;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster.client.clone(), &cluster.namespace);
    cluster
        .wait_for(
            "a NoMatchingPool event on the pod",
            Duration::from_secs(15),
            || async {
                let list = events.list(&ListParams::default()).await.ok()?;
                list.items
                    .iter()
                    .any(|e| {
                        e.reason.as_deref() == Some("NoMatchingPool")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                                == Some("misfit")
                    })
                    .then_some(())
            },
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        cluster.cloud.call_count(Operation::StartInstances),
        0,
        "nothing started for a pod no pool matches"
    );
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_node_holding_the_model_image_is_started() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster
        .apply_yaml(&QUICKSTART.replace("minStandby: 3", "minStandby: 2"))
        .await;
    cluster.wait_standby("workers", 2, 2).await;
    // One standby node ran the model before: its disk holds the image.
    let instances = cluster.pool_instances("workers");
    let warm = instances.iter().max_by_key(|i| i.id.clone()).unwrap();
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    nodes
        .patch_status(
            warm.private_dns_name.as_deref().unwrap(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"images": [{"names": ["my-registry.com/llama-3:70b"], "sizeBytes": 40_000_000_000u64}]}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster
        .apply_yaml(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: llm\n  namespace: default\nspec:\n  nodeSelector:\n    stratos.sh/pool: workers\n  containers:\n    - name: serve\n      image: my-registry.com/llama-3:70b\n      resources:\n        requests:\n          cpu: 1\n",
        )
        .await;
    let started = cluster
        .wait_for("a start", Duration::from_secs(15), || async {
            cluster
                .cloud
                .calls()
                .into_iter()
                .find(|c| c.operation == Operation::StartInstances)
                .map(|c| c.ids)
        })
        .await;
    assert_eq!(
        started,
        vec![warm.id.clone()],
        "the node with the model image on disk"
    );
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_scale_up_starts_nothing_twice() {
    let options = ClusterOptions {
        kubelet: KubeletOptions {
            ready_after: Duration::from_secs(1),
            ..Default::default()
        },
        ..Default::default()
    };
    let cluster = TestCluster::start(options).await;
    let operator = cluster.start_operator();
    cluster.apply_yaml(QUICKSTART).await;
    cluster.wait_standby("workers", 3, 3).await;
    for i in 0..6 {
        cluster
            .apply_yaml(&pod_yaml(&format!("job-{i}"), "workers", "900m", ""))
            .await;
    }
    cluster
        .wait_for("the start issued", Duration::from_secs(15), || async {
            (cluster.cloud.call_count(Operation::StartInstances) >= 1).then_some(())
        })
        .await;
    operator.kill();
    let _operator = cluster.start_operator();
    cluster.wait_pods_running(6, Duration::from_secs(30)).await;
    let started: std::collections::BTreeSet<String> = cluster
        .cloud
        .calls()
        .iter()
        .filter(|c| c.operation == Operation::StartInstances)
        .flat_map(|c| c.ids.clone())
        .collect();
    assert_eq!(
        started.len(),
        3,
        "the restarted operator counted the starting nodes as capacity"
    );
    cluster.invariants.assert_held().await;
}

const CI_RUNNERS: &str = include_str!("../examples/ci-runners.yaml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ci_burst_of_40_jobs_starts_five_nodes_in_one_call_and_they_return_to_standby() {
    // The scheduler marks the burst at a real kube-scheduler's pace (as the jobs arrive,
    // within its client's rate limit), and EC2 answers as EC2 does: its request buckets,
    // and a StartInstances that takes a few hundred milliseconds.
    let mut options = ClusterOptions {
        scheduler: SchedulerOptions::kube_scheduler_pace(),
        ..Default::default()
    };
    options.cloud.api_latency = Duration::from_millis(300);
    options.cloud.limits = Some(stratos::cloud::ratelimit::Limits::default());
    let cluster = TestCluster::start(options).await;
    let operator = cluster.start_operator();
    cluster
        .apply_yaml(&CI_RUNNERS.replace("emptyNodeTTL: 10m", "emptyNodeTTL: 3s"))
        .await;
    cluster.wait_standby("ci-runners", 5, 5).await;
    let standby: std::collections::BTreeSet<String> = cluster
        .pool_instances("ci-runners")
        .into_iter()
        .map(|i| i.id)
        .collect();
    let starts_before = cluster.cloud.call_count(Operation::StartInstances);
    // m5.2xlarge nodes have 7920m allocatable: eight 900m jobs per node, so five nodes.
    for i in 0..40 {
        cluster
            .apply_yaml(&pod_yaml(&format!("job-{i}"), "ci-runners", "900m", ""))
            .await;
    }
    cluster.wait_pods_running(40, Duration::from_secs(60)).await;
    let starts = cluster.starts_since(starts_before, "CI burst of 40 jobs");
    // Group commit: a burst marked over a second is served by a handful of calls (SPEC §6).
    assert!(
        (1..=3).contains(&starts.len()),
        "at most three StartInstances calls for the burst"
    );
    let calls: Vec<String> = starts.iter().flat_map(|c| c.ids.clone()).collect();
    let started: std::collections::BTreeSet<String> = calls.iter().cloned().collect();
    assert_eq!(calls.len(), 5, "no node started twice: {calls:?}");
    assert_eq!(
        started, standby,
        "exactly the five bin-packed standby nodes"
    );
    let status = cluster.pool_status("ci-runners").await.unwrap();
    let last = status.last_scale_up.expect("lastScaleUp recorded");
    assert_eq!(
        last.nodes as usize,
        starts.last().unwrap().ids.len(),
        "lastScaleUp is the last start's"
    );
    let metrics = operator.metrics.render();
    let pool = cluster.name("ci-runners");
    assert!(
        metrics.contains(&format!(
            "stratos_scale_up_nodes_total{{pool=\"{pool}\",source=\"standby\"}} 5"
        )),
        "{metrics}"
    );

    // The jobs finish; after the TTL every started node drains and stops back to standby.
    let pods = cluster.pods();
    pods.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .unwrap();
    cluster
        .wait_for(
            "the five started nodes stopped in standby",
            Duration::from_secs(60),
            || async {
                let s = cluster.pool_status("ci-runners").await?;
                let stopped = cluster
                    .cloud
                    .all_instances()
                    .into_iter()
                    .filter(|i| started.contains(&i.id) && i.state == InstanceState::Stopped)
                    .count();
                (s.running == 0 && s.draining == 0 && stopped == 5).then_some(())
            },
        )
        .await;
    assert_eq!(
        cluster.cloud.call_count(Operation::StartInstances),
        starts_before + starts.len(),
        "no start beyond the burst's"
    );
    print_pools(&cluster);
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_without_standby_launches_exactly_what_the_pods_need() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster
        .apply_yaml(&QUICKSTART.replace("minStandby: 3", "minStandby: 0"))
        .await;
    cluster
        .wait_for(
            "the pool ready and empty",
            Duration::from_secs(20),
            || async {
                let s = cluster.pool_status("workers").await?;
                (s.total == 0).then_some(())
            },
        )
        .await;
    // 1500m pods: one per m5.large (1920m allocatable), so four nodes.
    for i in 0..4 {
        cluster
            .apply_yaml(&pod_yaml(&format!("job-{i}"), "workers", "1500m", ""))
            .await;
    }
    cluster.wait_pods_running(4, Duration::from_secs(60)).await;
    // Let a few more rounds pass: nothing more may be launched for these pods.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let launches = cluster.launched();
    println!(
        "launched {launches} for 4 pods; pool instances {}",
        cluster.pool_instances("workers").len()
    );
    assert_eq!(launches, 4, "exactly the bin-packed number of launches");
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pool_packs_its_first_launch_by_a_known_node_size() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster.apply_yaml(QUICKSTART).await;
    cluster.wait_standby("workers", 3, 3).await;
    // A second pool of the same class, without standby: no node of its own yet, but the
    // first pool's m5.large nodes tell the size.
    let cold = pool_doc()
        .replace("name: workers\nspec:", "name: cold\nspec:")
        .replace("minStandby: 3", "minStandby: 0")
        .replace("stratos.sh/pool: workers", "stratos.sh/pool: cold");
    cluster.apply_yaml(&cold).await;
    let launched_before = cluster.launched();
    // Eight 900m pods: two per m5.large (1920m allocatable), so four nodes.
    for i in 0..8 {
        cluster
            .apply_yaml(&pod_yaml(&format!("job-{i}"), "cold", "900m", ""))
            .await;
    }
    cluster.wait_pods_running(8, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let launches = cluster.launched() - launched_before;
    println!("launched {launches} for 8 pods of 900m");
    assert_eq!(launches, 4, "bin-packed by the known node size");
    cluster.invariants.assert_held().await;
}

/// Today's node images (docs/src/aws-setup.md): Amazon Linux 2023 (nodeadm `NodeConfig` in
/// MIME multipart) and Bottlerocket (TOML) register with the labels and taints of their own
/// user data, never power themselves off, and warm up to standby because Stratos stops them.
/// The kubelet simulator would power off any node whose user data does, as the seeds' do.
async fn warms_up_from_example(example: &str, yaml: &str) {
    let mut options = ClusterOptions::default();
    options.kubelet.poweroff_after_ready = Some(Duration::from_millis(300));
    let cluster = TestCluster::start(options).await;
    cluster.apply_yaml(AWS_NODE).await;
    let _operator = cluster.start_operator();
    cluster.apply_yaml(yaml).await;
    cluster.wait_standby(example, 3, 3).await;
    print_pools(&cluster);
    let instances = cluster.pool_instances(example);
    assert_eq!(instances.len(), 3);
    // Every one of them was stopped by a StopInstances call of Stratos.
    let stopped: std::collections::BTreeSet<String> = cluster
        .cloud
        .calls()
        .into_iter()
        .filter(|c| c.operation == Operation::StopInstances)
        .flat_map(|c| c.ids)
        .collect();
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    for inst in &instances {
        assert!(
            stopped.contains(&inst.id),
            "{example}: {} was not stopped by Stratos",
            inst.id
        );
        let node = nodes
            .get(inst.private_dns_name.as_deref().unwrap())
            .await
            .unwrap();
        assert_eq!(
            node.labels().get("workload").map(String::as_str),
            Some("general"),
            "{example}: the label of the user data"
        );
        assert_eq!(
            node.labels().get("stratos.sh/state").map(String::as_str),
            Some("standby")
        );
    }
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn al2023_nodes_warm_up_to_standby() {
    warms_up_from_example("al2023", include_str!("../examples/al2023.yaml")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bottlerocket_nodes_warm_up_to_standby() {
    warms_up_from_example(
        "bottlerocket",
        include_str!("../examples/bottlerocket.yaml"),
    )
    .await;
}
