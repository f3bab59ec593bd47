//! The e2e harness and its invariant checks: they must pass a clean run and catch each
//! kind of violation.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, api::PostParams};
use serde_json::json;
use stratos::cloud::{CloudProvider, InstanceState, LaunchRequest, LaunchSpec, tags};
use testkit::harness::{ClusterOptions, TestCluster};

const QUICKSTART: &str = include_str!("../../examples/quickstart.yaml");

fn launch(cluster: &TestCluster, pool: &str, count: usize, token: &str) -> LaunchRequest {
    LaunchRequest {
        spec: LaunchSpec {
            instance_type: "m5.large".into(),
            ami: "ami-0123456789abcdef0".into(),
            subnet_ids: vec!["subnet-12345678".into(), "subnet-22345678".into()],
            security_group_ids: vec!["sg-12345678".into()],
            iam_instance_profile: "node-role".into(),
            user_data: None,
            block_device_mappings: vec![],
            metadata_http_tokens: Default::default(),
            metadata_hop_limit: 2,
            metadata_http_endpoint: Default::default(),
        },
        count,
        tags: BTreeMap::from([
            (tags::CLUSTER.to_owned(), cluster.cluster_name.clone()),
            (tags::POOL.to_owned(), cluster.name(pool)),
        ]),
        client_token: token.into(),
        existing_per_subnet: BTreeMap::new(),
    }
}

async fn ready_node_of(cluster: &TestCluster, instance: &str) -> String {
    let name = cluster
        .cloud
        .instance(instance)
        .unwrap()
        .private_dns_name
        .unwrap();
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    cluster
        .wait_for(
            &format!("node {name} Ready"),
            Duration::from_secs(15),
            || async {
                let n = nodes.get_opt(&name).await.ok()??;
                n.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
                    .then_some(())
            },
        )
        .await;
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_run_holds_the_invariants() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    cluster.apply_yaml(QUICKSTART).await;
    let out = cluster
        .cloud
        .launch(&launch(&cluster, "workers", 3, "clean"))
        .await;
    assert_eq!(out.instances.len(), 3);
    let id = out.instances[0].id.clone();
    let node = ready_node_of(&cluster, &id).await;
    // An evicted (being deleted) pod does not block a stop; a finished pod neither.
    let pods: Api<Pod> = cluster.pods();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "done"},
        "spec": {"nodeName": node, "restartPolicy": "Never", "containers": [{"name": "c", "image": "job:1"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    cluster
        .wait_for("the job finished", Duration::from_secs(10), || async {
            (pods.get("done").await.ok()?.status?.phase.as_deref() == Some("Succeeded"))
                .then_some(())
        })
        .await;
    cluster
        .cloud
        .stop_instances(std::slice::from_ref(&id))
        .await;
    cluster
        .wait_for("stopped", Duration::from_secs(5), || async {
            (cluster.cloud.instance(&id)?.state == InstanceState::Stopped).then_some(())
        })
        .await;
    if let Some(table) = cluster.kubectl(&["get", "np"]) {
        println!("{table}");
        assert!(table.contains("STANDBY"), "{table}");
    }
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_violation_is_caught() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    cluster.apply_yaml(QUICKSTART).await;

    // I1: the quickstart pool holds at most 10.
    cluster
        .cloud
        .launch(&launch(&cluster, "workers", 8, "a"))
        .await;
    cluster
        .cloud
        .launch(&launch(&cluster, "workers", 3, "b"))
        .await;
    // I2: an instance of another cluster.
    let foreign = cluster.cloud.insert_foreign_instance(
        BTreeMap::from([(tags::CLUSTER.to_owned(), "someone-else".to_owned())]),
        InstanceState::Running,
    );
    cluster
        .cloud
        .terminate_instances(std::slice::from_ref(&foreign))
        .await;
    // I3: a running pod on the node whose instance is stopped.
    let id = cluster
        .cloud
        .list_instances()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.tag(tags::POOL) == Some(cluster.name("workers").as_str()))
        .unwrap()
        .id;
    let node = ready_node_of(&cluster, &id).await;
    let pods: Api<Pod> = cluster.pods();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "busy"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "server:1"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    cluster
        .wait_for("the pod cached", Duration::from_secs(5), || async {
            pods.get("busy")
                .await
                .ok()?
                .status?
                .phase
                .filter(|p| p == "Running")
        })
        .await;
    cluster
        .cloud
        .stop_instances(std::slice::from_ref(&id))
        .await;

    cluster.invariants.settle().await;
    let violations = cluster.invariants.violations();
    let has = |prefix: &str| violations.iter().any(|v| v.starts_with(prefix));
    assert!(
        has(&format!(
            "I1: launch of 3 into pool {} holding 8 exceeds poolSize 10",
            cluster.name("workers")
        )),
        "{violations:#?}"
    );
    assert!(
        has(&format!("I2: TerminateInstances on {foreign}")),
        "{violations:#?}"
    );
    assert!(
        has(&format!(
            "I3: stopping {id} while its node {node} runs {}/busy",
            cluster.namespace
        )),
        "{violations:#?}"
    );
    assert_eq!(violations.len(), 3, "{violations:#?}");
}
