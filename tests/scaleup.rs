//! End to end, the scale-up decision against the scheduler's verdicts (SPEC §6): pods that
//! kube-scheduler refuses for anti-affinity, spread, a taint or a cordon get standby nodes
//! started for them — never the running node's spare room; a pod two pools could serve
//! gets one start, or one launch; a start that fails is decided again at once.
//! Run against the embedded control plane, or a real one (`STRATOS_E2E_KUBECONFIG`).

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;
use stratos::cloud::{InstanceState, fake::Fault, ratelimit::Operation};
use testkit::harness::{ClusterOptions, TestCluster};

const QUICKSTART: &str = include_str!("../examples/quickstart.yaml");

/// A pod of the quickstart pool with `app: web`, 500m, and `extra` spec fields.
fn web_pod(name: &str, extra: serde_json::Value) -> String {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {
            "nodeSelector": {"stratos.sh/pool": "workers"},
            "containers": [{"name": "c", "image": "web:1", "resources": {"requests": {"cpu": "500m"}}}]
        }
    });
    if let (Some(spec), Some(extra)) = (pod["spec"].as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::to_string(&pod).unwrap()
}

/// The quickstart pool at rest with one running node for `web-0`; returns that node.
async fn one_running_replica(cluster: &TestCluster, extra: serde_json::Value) -> String {
    cluster.apply_yaml(QUICKSTART).await;
    cluster.wait_standby("workers", 3, 3).await;
    cluster.apply_yaml(&web_pod("web-0", extra)).await;
    let node = cluster
        .running_node_of("web-0", Duration::from_secs(30))
        .await;
    // Standby replenished behind it: one running node with free CPU, three in standby.
    cluster
        .wait_for("standby replenished", Duration::from_secs(30), || async {
            let s = cluster.pool_status("workers").await?;
            let stopped = cluster
                .pool_instances("workers")
                .iter()
                .filter(|i| i.state == InstanceState::Stopped)
                .count();
            (s.running == 1 && s.standby == 3 && s.warmup == 0 && stopped == 3).then_some(())
        })
        .await;
    node
}

/// Waits until pods `names` run; returns their nodes.
async fn nodes_of(cluster: &TestCluster, names: &[&str]) -> Vec<String> {
    let mut nodes = Vec::new();
    for name in names {
        nodes.push(cluster.running_node_of(name, Duration::from_secs(45)).await);
    }
    nodes
}

fn anti_affinity() -> serde_json::Value {
    json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_affinity_scale_out_starts_one_standby_node_per_refused_replica() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    let first = one_running_replica(&cluster, anti_affinity()).await;
    let before = cluster.cloud.call_count(Operation::StartInstances);
    // Scaled from 1 to 3: the running node has room, but anti-affinity keeps them off it.
    for name in ["web-1", "web-2"] {
        cluster.apply_yaml(&web_pod(name, anti_affinity())).await;
    }
    let nodes = nodes_of(&cluster, &["web-1", "web-2"]).await;
    let starts = cluster.starts_since(before, "anti-affinity 1 → 3");
    let started: Vec<String> = starts.iter().flat_map(|c| c.ids.clone()).collect();
    assert_eq!(started.len(), 2, "exactly two standby nodes: {started:?}");
    let distinct: BTreeSet<&String> = nodes.iter().chain([&first]).collect();
    assert_eq!(distinct.len(), 3, "one replica per node");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cluster.cloud.call_count(Operation::StartInstances),
        before + starts.len(),
        "nothing more started"
    );
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_spread_starts_a_node_for_each_refused_replica() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    let spread = json!({"topologySpreadConstraints": [{"maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {"app": "web"}}}]});
    let first = one_running_replica(&cluster, spread.clone()).await;
    let before = cluster.cloud.call_count(Operation::StartInstances);
    cluster.apply_yaml(&web_pod("web-1", spread)).await;
    let node = cluster
        .running_node_of("web-1", Duration::from_secs(45))
        .await;
    assert_ne!(node, first, "spread off the running node");
    let started: Vec<String> = cluster
        .starts_since(before, "topology spread")
        .iter()
        .flat_map(|c| c.ids.clone())
        .collect();
    assert_eq!(started.len(), 1, "{started:?}");
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tainted_or_cordoned_running_node_is_no_room() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    let running = one_running_replica(&cluster, json!({})).await;
    // Someone else taints the running node: a new pod cannot go there.
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let taint = json!({"spec": {"taints": [{"key": "team.example/maintenance", "value": "true", "effect": "NoSchedule"}]}});
    nodes
        .patch(&running, &PatchParams::default(), &Patch::Merge(&taint))
        .await
        .unwrap();
    cluster.invariants.foreign_node("none");
    let before = cluster.cloud.call_count(Operation::StartInstances);
    cluster.apply_yaml(&web_pod("web-1", json!({}))).await;
    let node = cluster
        .running_node_of("web-1", Duration::from_secs(45))
        .await;
    assert_ne!(node, running);
    assert_eq!(
        cluster
            .starts_since(before, "tainted running node")
            .iter()
            .map(|c| c.ids.len())
            .sum::<usize>(),
        1
    );
    // An admin cordons the node web-1 runs on: the next pod gets a node of its own.
    let before = cluster.cloud.call_count(Operation::StartInstances);
    nodes
        .patch(
            &node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    cluster.apply_yaml(&web_pod("web-2", json!({}))).await;
    let third = cluster
        .running_node_of("web-2", Duration::from_secs(45))
        .await;
    assert!(third != node && third != running);
    assert_eq!(
        cluster
            .starts_since(before, "cordoned running node")
            .iter()
            .map(|c| c.ids.len())
            .sum::<usize>(),
        1
    );
    cluster.invariants.assert_held().await;
}

/// Two pools whose template labels both satisfy `workload: shared`.
fn two_pools(min_standby: u32) -> String {
    let class = QUICKSTART.split("---").next().unwrap();
    let pool = |name: &str| {
        format!(
            "apiVersion: stratos.sh/v1alpha1\nkind: NodePool\nmetadata:\n  name: {name}\nspec:\n  poolSize: 5\n  minStandby: {min_standby}\n  template:\n    nodeClassRef:\n      kind: AWSNodeClass\n      name: workers\n    labels:\n      workload: shared\n    startupTaints:\n      - key: node.eks.amazonaws.com/not-ready\n        value: \"true\"\n        effect: NoSchedule\n"
        )
    };
    format!("{class}---\n{}---\n{}", pool("pool-a"), pool("pool-b"))
}

fn shared_pod(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeSelector:\n    workload: shared\n  containers:\n    - name: c\n      image: web:1\n      resources:\n        requests:\n          cpu: 500m\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_two_pools_could_serve_gets_one_start_then_one_launch() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster.apply_yaml(&two_pools(1)).await;
    cluster.wait_standby("pool-a", 1, 1).await;
    cluster.wait_standby("pool-b", 1, 1).await;
    let (starts_before, launched_before) = (
        cluster.cloud.call_count(Operation::StartInstances),
        cluster.launched(),
    );
    cluster.apply_yaml(&shared_pod("one")).await;
    cluster
        .running_node_of("one", Duration::from_secs(30))
        .await;
    let starts = cluster.starts_since(starts_before, "two pools, standby");
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0].ids.len(), 1, "one start for one pod");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cluster.launched() - launched_before,
        1,
        "only the pool that started a node replenishes"
    );

    // Without standby: one launch, in one pool.
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster.apply_yaml(&two_pools(0)).await;
    cluster
        .wait_for("both pools at rest", Duration::from_secs(20), || async {
            let a = cluster.pool_status("pool-a").await?;
            let b = cluster.pool_status("pool-b").await?;
            (a.conditions.iter().any(|c| c.type_ == "Ready")
                && b.conditions.iter().any(|c| c.type_ == "Ready"))
            .then_some(())
        })
        .await;
    cluster.apply_yaml(&shared_pod("one")).await;
    cluster
        .running_node_of("one", Duration::from_secs(45))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let launches: Vec<usize> = cluster
        .cloud
        .calls()
        .iter()
        .filter(|c| c.operation == Operation::RunInstances)
        .map(|c| c.ids.len())
        .collect();
    println!("two pools, no standby: RunInstances calls: {launches:?} (instances per call)");
    assert_eq!(cluster.launched(), 1, "exactly one launch: {launches:?}");
    let in_a = cluster.pool_instances("pool-a").len();
    let in_b = cluster.pool_instances("pool-b").len();
    assert_eq!(in_a + in_b, 1, "in one pool (a: {in_a}, b: {in_b})");
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_fails_for_capacity_is_served_by_another_standby_node() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster
        .apply_yaml(&QUICKSTART.replace("minStandby: 3", "minStandby: 2"))
        .await;
    cluster.wait_standby("workers", 2, 2).await;
    // EC2 has no capacity for one of them, whichever Stratos picks.
    let standby: Vec<String> = cluster
        .pool_instances("workers")
        .into_iter()
        .map(|i| i.id)
        .collect();
    let broken = standby.iter().max().unwrap().clone();
    cluster.cloud.inject_sticky(
        Operation::StartInstances,
        &broken,
        Fault::InsufficientCapacity,
    );
    let sound = standby.iter().find(|i| **i != broken).unwrap().clone();
    // Make the broken one the most recently used, so it is the first choice.
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let broken_node = cluster
        .cloud
        .instance(&broken)
        .unwrap()
        .private_dns_name
        .unwrap();
    nodes
        .patch(
            &broken_node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"stratos.sh/last-used": jiff::Timestamp::now().to_string()}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cluster.cloud.call_count(Operation::StartInstances);
    cluster.apply_yaml(&web_pod("web-0", json!({}))).await;
    let node = cluster
        .running_node_of("web-0", Duration::from_secs(30))
        .await;
    let ran_on = cluster.instance_of_node(&node);
    assert_eq!(ran_on.id, sound, "the other standby node");
    let starts = cluster.starts_since(before, "sticky InsufficientInstanceCapacity");
    assert_eq!(starts.len(), 2, "the failed start, then the other node");
    assert_eq!(starts[0].ids, std::slice::from_ref(&broken));
    // The failed instance is standby again: stopped, labelled, cordoned and tainted.
    let back = nodes.get(&broken_node).await.unwrap();
    assert_eq!(back.metadata.labels.unwrap()["stratos.sh/state"], "standby");
    let spec = back.spec.unwrap();
    assert_eq!(spec.unschedulable, Some(true));
    assert!(
        spec.taints
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == "stratos.sh/standby")
    );
    assert_eq!(
        cluster.cloud.instance(&broken).unwrap().state,
        InstanceState::Stopped
    );
    // Only the start that worked counts as a decision.
    let status = cluster.pool_status("workers").await.unwrap();
    assert_eq!(status.last_scale_up.map(|l| l.nodes), Some(1));
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_with_a_zonal_volume_gets_a_standby_node_in_that_zone() {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    // Standby nodes in two zones.
    let two_zones = QUICKSTART
        .replace(
            "subnetIds: [\"subnet-12345678\"]",
            "subnetIds: [\"subnet-12345678\", \"subnet-22345678\"]",
        )
        .replace("minStandby: 3", "minStandby: 4");
    cluster.apply_yaml(&two_zones).await;
    cluster.wait_standby("workers", 4, 4).await;
    // A volume in us-east-1b, bound to the pod's claim.
    let pv_name = cluster.name("data");
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": pv_name, "labels": {testkit::harness::TEST_LABEL: cluster.id}},
        "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
            "csi": {"driver": "ebs.csi.aws.com", "volumeHandle": "vol-0123456789abcdef0"},
            "claimRef": {"namespace": cluster.namespace, "name": "data"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["us-east-1b"]}]}]}}
        }
    }))
    .unwrap();
    let pvs: Api<PersistentVolume> = Api::all(cluster.client.clone());
    pvs.create(&Default::default(), &pv).await.unwrap();
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv_name,
            "resources": {"requests": {"storage": "1Gi"}}}
    }))
    .unwrap();
    let pvcs: Api<PersistentVolumeClaim> =
        Api::namespaced(cluster.client.clone(), &cluster.namespace);
    pvcs.create(&Default::default(), &pvc).await.unwrap();
    let before = cluster.cloud.call_count(Operation::StartInstances);
    cluster
        .apply_yaml(&web_pod(
            "db",
            json!({"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}),
        ))
        .await;
    let started = cluster
        .wait_for("a start", Duration::from_secs(20), || async {
            cluster
                .starts_since(before, "zonal volume")
                .first()
                .map(|c| c.ids.clone())
        })
        .await;
    assert_eq!(started.len(), 1);
    assert_eq!(
        cluster.cloud.instance(&started[0]).unwrap().zone,
        "us-east-1b",
        "the standby node in the volume's zone"
    );
    let _ = pvs.delete(&pv_name, &Default::default()).await;
    cluster.invariants.assert_held().await;
}

/// A pool without standby whose user data `powers_off` (the seeds' script) or not.
fn cold_pool(powers_off: bool) -> String {
    let pool = QUICKSTART.replace("minStandby: 3", "minStandby: 0");
    if powers_off {
        pool
    } else {
        pool.replace("    sleep 30\n    poweroff\n", "")
    }
}

/// Waits until the quickstart pool has been reconciled once (its conditions are written).
async fn pool_reconciled(cluster: &TestCluster) {
    cluster
        .wait_for("the pool reconciled", Duration::from_secs(20), || async {
            let s = cluster.pool_status("workers").await?;
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready")
                .then_some(())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_user_data_powers_off_reaches_pods_only_through_standby() {
    // The seeds' user data powers the instance off after its first boot: handed over at
    // once, the pod would be killed by it (I3, checked on the poweroff too).
    let mut options = ClusterOptions::default();
    options.kubelet.poweroff_after_ready = Some(Duration::from_secs(2));
    let cluster = TestCluster::start(options).await;
    let _operator = cluster.start_operator();
    cluster.apply_yaml(&cold_pool(true)).await;
    pool_reconciled(&cluster).await;
    cluster.apply_yaml(&web_pod("web-0", json!({}))).await;
    let node = cluster
        .running_node_of("web-0", Duration::from_secs(45))
        .await;
    let instance = cluster.instance_of_node(&node).id;
    // Launched, stopped (by Stratos or by itself), then started for the pod.
    let started: Vec<String> = cluster
        .cloud
        .calls()
        .iter()
        .filter(|c| c.operation == Operation::StartInstances)
        .flat_map(|c| c.ids.clone())
        .collect();
    assert!(
        started.contains(&instance),
        "started from standby: {started:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        cluster
            .running_node_of("web-0", Duration::from_secs(1))
            .await,
        node,
        "still running where it landed"
    );
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_user_data_does_not_power_off_is_handed_over_warm() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster.apply_yaml(&cold_pool(false)).await;
    pool_reconciled(&cluster).await;
    cluster.apply_yaml(&web_pod("web-0", json!({}))).await;
    cluster
        .running_node_of("web-0", Duration::from_secs(45))
        .await;
    assert_eq!(cluster.launched(), 1);
    assert_eq!(
        cluster.cloud.call_count(Operation::StopInstances),
        0,
        "handed over at once, never stopped"
    );
    cluster.invariants.assert_held().await;
}
