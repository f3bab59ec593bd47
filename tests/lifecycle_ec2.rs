//! The real EC2 code path end to end: the Stratos controllers drive `Ec2Cloud` against the
//! EC2 emulator (moto), and the kubelet simulator plays the nodes of moto's instances,
//! taking their labels and taints from the user data. The quickstart example fills up.

use std::{sync::Arc, time::Duration};

use kube::Api;
use stratos::{
    api::NodePool,
    cloud::{
        CloudProvider,
        ec2::{Ec2Cloud, RetryPolicy},
        ratelimit::Limits,
        tags,
    },
    controller::OperatorConfig,
    metrics::{CloudApiMetrics, PoolMetrics},
};
use testkit::{
    apiserver::ApiServer,
    controllers::Controllers,
    kubelet::{Ec2Instances, KubeletOptions, KubeletSim},
    moto::Moto,
    scheduler::Scheduler,
};

const QUICKSTART: &str = include_str!("../examples/quickstart.yaml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_pool_fills_on_the_ec2_path() {
    let Some(moto) = Moto::start() else { return };
    let account = moto.account().await;
    let raw = account.client.clone();
    let sdk = testkit::moto::sdk_config(&moto.endpoint()).await;
    // The example, unchanged but for the ids that exist in this emulated account.
    let quickstart = account.localize(QUICKSTART);

    let server = ApiServer::start_with_repo_crds().await;
    let client = server.client();
    let _scheduler = Scheduler::start(client.clone());
    let _controllers = Controllers::start(client.clone());
    let _kubelet = KubeletSim::start(
        client.clone(),
        Arc::new(Ec2Instances::new(raw.clone())),
        KubeletOptions::default(),
    );
    let cloud_metrics = Arc::new(CloudApiMetrics::detached());
    let cloud: Arc<dyn CloudProvider> = Arc::new(Ec2Cloud::new(
        &sdk,
        "e2e",
        Limits::default(),
        RetryPolicy::default(),
        cloud_metrics.clone(),
    ));
    let mut config = OperatorConfig::new("e2e");
    config.resync = Duration::from_secs(2);
    config.listing_ttl = Duration::from_millis(300);
    let operator = tokio::spawn(stratos::controller::run(
        client.clone(),
        server.client_without_retry(),
        cloud,
        config,
        Arc::new(PoolMetrics::detached()),
        stratos::http::Health::new(),
        futures::future::pending(),
    ));

    for doc in quickstart.split("---") {
        let value: serde_json::Value = serde_yaml::from_str(doc).unwrap();
        let name = value["metadata"]["name"].as_str().unwrap().to_owned();
        let pp = kube::api::PatchParams::apply("e2e").force();
        match value["kind"].as_str().unwrap() {
            "AWSNodeClass" => {
                Api::<stratos::api::AWSNodeClass>::all(client.clone())
                    .patch(&name, &pp, &kube::api::Patch::Apply(&value))
                    .await
                    .unwrap();
            }
            _ => {
                Api::<NodePool>::all(client.clone())
                    .patch(&name, &pp, &kube::api::Patch::Apply(&value))
                    .await
                    .unwrap();
            }
        }
    }
    let pools: Api<NodePool> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = pools
            .get("workers")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        if status.standby == 3 && status.total == 3 && status.warmup == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pool did not fill: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let described = raw.describe_instances().send().await.unwrap();
    let ours: Vec<_> = described
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| {
            i.tags()
                .iter()
                .any(|t| t.key() == Some(tags::POOL) && t.value() == Some("workers"))
        })
        .collect();
    assert_eq!(ours.len(), 3, "exactly minStandby instances in EC2");
    for i in &ours {
        assert_eq!(
            i.state().and_then(|s| s.name()).map(|s| s.as_str()),
            Some("stopped")
        );
        let tag = |k: &str| {
            i.tags()
                .iter()
                .find(|t| t.key() == Some(k))
                .and_then(|t| t.value())
                .map(str::to_owned)
        };
        assert_eq!(tag(tags::STATE).as_deref(), Some("standby"));
        assert_eq!(tag(tags::CLUSTER).as_deref(), Some("e2e"));
    }
    let calls = |op: stratos::cloud::ratelimit::Operation| cloud_metrics.calls(op, "success");
    assert_eq!(
        calls(stratos::cloud::ratelimit::Operation::RunInstances),
        1,
        "one batched launch"
    );
    assert_eq!(
        calls(stratos::cloud::ratelimit::Operation::StopInstances),
        1,
        "one batched stop"
    );
    operator.abort();
}
