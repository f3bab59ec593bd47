//! End to end, SPEC §5.6 and I3: a drain is finished only when every evicted pod object is
//! gone. Pods here take seconds to shut down (a CI job finishing its step, a server
//! draining connections); no instance may stop or terminate under them, on scale-down or
//! on pool deletion. The invariant checks confirm it on every cloud call.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{DeleteParams, ListParams},
};
use serde_json::json;
use stratos::{api::NodePool, cloud::ratelimit::Operation};
use testkit::{
    harness::{ClusterOptions, TestCluster},
    kubelet::SHUTDOWN_AFTER_ANNOTATION,
};

const SCALE_TO_ZERO: &str = include_str!("../examples/scale-to-zero.yaml");

/// A pod of the scale-to-zero pool that takes `shutdown` to exit once deleted.
fn slow_pod(name: &str, shutdown: &str) -> String {
    serde_json::to_string(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "web"},
            "annotations": {SHUTDOWN_AFTER_ANNOTATION: shutdown}},
        "spec": {
            "terminationGracePeriodSeconds": 30,
            "nodeSelector": {"stratos.sh/pool": "on-demand"},
            "containers": [{"name": "c", "image": "web:1", "resources": {"requests": {"cpu": "500m"}}}]
        }
    }))
    .unwrap()
}

async fn gone_at(cluster: &TestCluster, name: &str) -> tokio::time::Instant {
    let pods = cluster.pods();
    cluster
        .wait_for(&format!("{name} gone"), Duration::from_secs(60), || async {
            pods.get_opt(name)
                .await
                .ok()?
                .is_none()
                .then(tokio::time::Instant::now)
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_pool_waits_for_its_pods_to_terminate() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster.apply_yaml(SCALE_TO_ZERO).await;
    cluster.wait_standby("on-demand", 2, 2).await;
    cluster.apply_yaml(&slow_pod("server", "10s")).await;
    let node = cluster
        .running_node_of("server", Duration::from_secs(30))
        .await;
    let instance = cluster.instance_of_node(&node).id;
    Api::<NodePool>::all(cluster.client.clone())
        .delete(&cluster.name("on-demand"), &DeleteParams::default())
        .await
        .unwrap();
    let deleted = tokio::time::Instant::now();
    // Evicted at once, then ten seconds of shutdown with the object still there.
    let pods = cluster.pods();
    let evicted = cluster
        .wait_for("the pod evicted", Duration::from_secs(20), || async {
            pods.get_opt("server")
                .await
                .ok()??
                .metadata
                .deletion_timestamp
                .map(|_| tokio::time::Instant::now())
        })
        .await;
    let gone = gone_at(&cluster, "server").await;
    cluster
        .wait_for("the pool gone", Duration::from_secs(60), || async {
            cluster
                .pool_status("on-demand")
                .await
                .is_none()
                .then_some(())
        })
        .await;
    let terminated = cluster
        .cloud
        .calls()
        .into_iter()
        .find(|c| c.operation == Operation::TerminateInstances && c.ids.contains(&instance))
        .expect("the instance was terminated");
    println!(
        "pool deletion drain: evicted at +{:.1}s, pod gone at +{:.1}s, TerminateInstances at +{:.1}s",
        (evicted - deleted).as_secs_f64(),
        (gone - deleted).as_secs_f64(),
        (terminated.at - deleted).as_secs_f64()
    );
    assert!(
        terminated.at >= gone,
        "terminated {:?} before its pod was gone",
        gone - terminated.at
    );
    assert!(
        gone - evicted >= Duration::from_secs(9),
        "the pod took its shutdown time"
    );
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    assert!(nodes.get_opt(&node).await.unwrap().is_none());
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_pod_keeps_its_node_from_scale_down() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let _operator = cluster.start_operator();
    cluster
        .apply_yaml(&SCALE_TO_ZERO.replace("emptyNodeTTL: 2m", "emptyNodeTTL: 1s"))
        .await;
    cluster.wait_standby("on-demand", 2, 2).await;
    cluster.apply_yaml(&slow_pod("job", "10s")).await;
    let node = cluster
        .running_node_of("job", Duration::from_secs(30))
        .await;
    let stops_before = cluster.cloud.call_count(Operation::StopInstances);
    // The job is deleted and finishes its step for ten seconds: the node is not empty.
    let deleted = tokio::time::Instant::now();
    cluster
        .pods()
        .delete("job", &DeleteParams::default())
        .await
        .unwrap();
    let gone = gone_at(&cluster, "job").await;
    cluster
        .wait_for(
            "the node back in standby",
            Duration::from_secs(30),
            || async {
                let s = cluster.pool_status("on-demand").await?;
                (s.running == 0 && s.draining == 0).then_some(())
            },
        )
        .await;
    let stopped = cluster
        .cloud
        .calls()
        .into_iter()
        .filter(|c| c.operation == Operation::StopInstances)
        .skip(stops_before)
        .find(|c| {
            c.ids.iter().any(|id| {
                cluster.cloud.instance(id).and_then(|i| i.private_dns_name) == Some(node.clone())
            })
        })
        .expect("the node was stopped into standby");
    println!(
        "scale-down: pod deleted at +0.0s, gone at +{:.1}s, StopInstances at +{:.1}s",
        (gone - deleted).as_secs_f64(),
        (stopped.at - deleted).as_secs_f64()
    );
    assert!(stopped.at >= gone, "stopped before the pod was gone");
    assert!(
        gone - deleted >= Duration::from_secs(9),
        "the pod took its shutdown time"
    );
    let left = cluster.pods().list(&ListParams::default()).await.unwrap();
    assert!(left.items.is_empty());
    cluster.invariants.assert_held().await;
}
