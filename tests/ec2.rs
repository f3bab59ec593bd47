//! `Ec2Cloud` against a real EC2 API emulator (moto), with a fault-injecting proxy in
//! between for what moto cannot do: throttling, capacity errors, lost responses and
//! ClientToken idempotency. Nothing here is mocked above the HTTP wire.
//!
//! Needs `moto_server` (see testkit::moto); under CI a missing moto fails the run.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use base64::Engine;
use stratos::{
    api::awsnodeclass::{BlockDeviceMapping, HttpEndpoint, HttpTokens, VolumeType},
    cloud::{
        CloudError, CloudProvider, InstanceState, LaunchRequest, LaunchSpec, NodeClassRefs,
        ec2::{Ec2Cloud, RetryPolicy},
        ratelimit::{Limits, Operation},
        tags,
    },
    metrics::CloudApiMetrics,
};
use testkit::{
    ec2_faults::{Fault, FaultProxy},
    moto::{Moto, sdk_config},
};

const PROFILE_ARN: &str = "arn:aws:iam::123456789012:instance-profile/node-role";

struct Env {
    _moto: Moto,
    proxy: FaultProxy,
    cloud: Ec2Cloud,
    /// Straight to moto, for set-up and for reading back what Ec2Cloud did.
    raw: aws_sdk_ec2::Client,
    subnets: Vec<(String, String)>,
    security_group: String,
    ami: String,
    metrics: Arc<CloudApiMetrics>,
    cluster: String,
}

async fn env(cluster: &str) -> Option<Env> {
    let moto = Moto::start()?;
    let proxy = FaultProxy::start(moto.port()).await;
    let account = moto.account().await;
    let raw = account.client.clone();

    let metrics = Arc::new(CloudApiMetrics::detached());
    let retry = RetryPolicy {
        max_attempts: 5,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
    };
    let cloud = Ec2Cloud::new(
        &sdk_config(&proxy.endpoint()).await,
        cluster,
        Limits::default(),
        retry,
        metrics.clone(),
    );
    Some(Env {
        _moto: moto,
        proxy,
        cloud,
        raw,
        subnets: account.subnets,
        security_group: account.security_group,
        ami: account.ami,
        metrics,
        cluster: cluster.to_owned(),
    })
}

impl Env {
    fn spec(&self) -> LaunchSpec {
        LaunchSpec {
            instance_type: "m5.large".into(),
            ami: self.ami.clone(),
            subnet_ids: self.subnets.iter().map(|(id, _)| id.clone()).collect(),
            security_group_ids: vec![self.security_group.clone()],
            iam_instance_profile: PROFILE_ARN.into(),
            user_data: Some("#!/bin/bash\necho warm\npoweroff\n".into()),
            block_device_mappings: vec![],
            metadata_http_tokens: HttpTokens::Required,
            metadata_hop_limit: 2,
            metadata_http_endpoint: HttpEndpoint::Enabled,
        }
    }

    fn request(&self, count: usize, token: &str) -> LaunchRequest {
        LaunchRequest {
            spec: self.spec(),
            count,
            tags: BTreeMap::from([
                (tags::CLUSTER.to_owned(), self.cluster.clone()),
                (tags::POOL.to_owned(), "workers".to_owned()),
                (tags::NODECLASS_HASH.to_owned(), "abc123".to_owned()),
                (tags::STATE.to_owned(), "warmup".to_owned()),
                ("team".to_owned(), "ci".to_owned()),
            ]),
            client_token: token.into(),
            existing_per_subnet: BTreeMap::new(),
        }
    }

    async fn launch(&self, count: usize, token: &str) -> Vec<String> {
        let out = self.cloud.launch(&self.request(count, token)).await;
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        out.instances.into_iter().map(|i| i.id).collect()
    }

    async fn states(&self) -> BTreeMap<String, InstanceState> {
        self.cloud
            .list_instances()
            .await
            .unwrap()
            .into_iter()
            .map(|i| (i.id, i.state))
            .collect()
    }
}

#[tokio::test]
async fn a_launch_carries_the_full_spec() {
    let Some(env) = env("launch").await else {
        return;
    };
    let mut request = env.request(3, "full-spec");
    request.spec.block_device_mappings = vec![
        BlockDeviceMapping {
            device_name: "/dev/xvda".into(),
            volume_size: Some(200),
            volume_type: Some(VolumeType::Gp3),
            iops: Some(4000),
            throughput: Some(250),
            encrypted: Some(true),
            kms_key_id: None,
            delete_on_termination: false,
        },
        BlockDeviceMapping {
            device_name: "/dev/xvdb".into(),
            volume_size: Some(50),
            // Not io1/io2: moto drops Iops when it creates an instance's volumes and then
            // rejects those types. Provisioned IOPS are checked on the wire above (gp3).
            volume_type: Some(VolumeType::Gp2),
            iops: None,
            throughput: None,
            encrypted: None,
            kms_key_id: None,
            delete_on_termination: true,
        },
    ];
    request.spec.metadata_hop_limit = 3;
    let out = env.cloud.launch(&request).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.instances.len(), 3);

    // One per zone: three subnets, three instances.
    let mut zones: Vec<&str> = out.instances.iter().map(|i| i.zone.as_str()).collect();
    zones.sort();
    assert_eq!(zones, vec!["us-east-1a", "us-east-1b", "us-east-1c"]);
    assert_eq!(
        env.proxy.received("RunInstances"),
        3,
        "one RunInstances per subnet"
    );

    let ids: Vec<String> = out.instances.iter().map(|i| i.id.clone()).collect();
    // Name tags are set in the background after the launch returned.
    let mut described;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        described = env
            .raw
            .describe_instances()
            .set_instance_ids(Some(ids.clone()))
            .send()
            .await
            .unwrap();
        let named = described
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| i.tags().iter().any(|t| t.key() == Some(tags::NAME)))
            .count();
        if named == ids.len() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for inst in described.reservations().iter().flat_map(|r| r.instances()) {
        let id = inst.instance_id().unwrap();
        let tag = |k: &str| {
            inst.tags()
                .iter()
                .find(|t| t.key() == Some(k))
                .and_then(|t| t.value())
                .map(str::to_owned)
        };
        assert_eq!(tag(tags::CLUSTER).as_deref(), Some("launch"), "{id}");
        assert_eq!(tag(tags::POOL).as_deref(), Some("workers"));
        assert_eq!(tag(tags::NODECLASS_HASH).as_deref(), Some("abc123"));
        assert_eq!(tag(tags::STATE).as_deref(), Some("warmup"));
        assert_eq!(tag("team").as_deref(), Some("ci"));
        let name = tag(tags::NAME).expect("Name tag");
        assert!(
            name.starts_with("workers-") && id.ends_with(&name["workers-".len()..]),
            "{name} for {id}"
        );
        assert_eq!(inst.instance_type().unwrap().as_str(), "m5.large");
        assert_eq!(inst.image_id(), Some(env.ami.as_str()));
        let groups: Vec<&str> = inst
            .security_groups()
            .iter()
            .filter_map(|g| g.group_id())
            .collect();
        assert_eq!(groups, vec![env.security_group.as_str()]);
        assert_eq!(
            inst.iam_instance_profile().and_then(|p| p.arn()),
            Some(PROFILE_ARN)
        );
        let meta = inst.metadata_options().expect("metadata options");
        assert_eq!(meta.http_tokens().map(|t| t.as_str()), Some("required"));
        assert_eq!(meta.http_endpoint().map(|t| t.as_str()), Some("enabled"));

        let user_data = env
            .raw
            .describe_instance_attribute()
            .instance_id(id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .unwrap();
        let encoded = user_data
            .user_data()
            .and_then(|v| v.value())
            .expect("user data");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "#!/bin/bash\necho warm\npoweroff\n"
        );

        let volume_ids: Vec<String> = inst
            .block_device_mappings()
            .iter()
            .filter_map(|b| b.ebs().and_then(|e| e.volume_id()).map(str::to_owned))
            .collect();
        let volumes = env
            .raw
            .describe_volumes()
            .set_volume_ids(Some(volume_ids))
            .send()
            .await
            .unwrap();
        let root = volumes
            .volumes()
            .iter()
            .find(|v| {
                v.attachments()
                    .iter()
                    .any(|a| a.device() == Some("/dev/xvda"))
            })
            .expect("root volume");
        assert_eq!(root.size(), Some(200));
        assert_eq!(root.volume_type().map(|t| t.as_str()), Some("gp3"));
        assert_eq!(root.encrypted(), Some(true));
        let vtag = |k: &str| {
            root.tags()
                .iter()
                .find(|t| t.key() == Some(k))
                .and_then(|t| t.value())
                .map(str::to_owned)
        };
        assert_eq!(
            vtag(tags::CLUSTER).as_deref(),
            Some("launch"),
            "volumes carry the cluster tag"
        );
        assert_eq!(vtag(tags::POOL).as_deref(), Some("workers"));
        assert_eq!(vtag("team").as_deref(), Some("ci"));
        assert_eq!(
            vtag(tags::STATE),
            None,
            "the lifecycle mirror is an instance tag only"
        );
    }

    // Fields moto does not model are checked on the wire.
    let body = &env.proxy.bodies("RunInstances")[0];
    for field in [
        "BlockDeviceMapping.1.Ebs.Throughput=250",
        "BlockDeviceMapping.1.Ebs.Iops=4000",
        "BlockDeviceMapping.1.Ebs.DeleteOnTermination=false",
        "BlockDeviceMapping.2.Ebs.VolumeType=gp2",
        "BlockDeviceMapping.2.Ebs.VolumeSize=50",
        "MetadataOptions.HttpPutResponseHopLimit=3",
        "MetadataOptions.HttpTokens=required",
        "IamInstanceProfile.Arn=",
        "ClientToken=full-spec-",
    ] {
        assert!(body.contains(field), "RunInstances lacks {field}: {body}");
    }
}

#[tokio::test]
async fn an_instance_profile_name_is_sent_as_a_name() {
    let Some(env) = env("profile-name").await else {
        return;
    };
    let mut request = env.request(1, "by-name");
    request.spec.iam_instance_profile = "node-role".into();
    let out = env.cloud.launch(&request).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let body = &env.proxy.bodies("RunInstances")[0];
    assert!(body.contains("IamInstanceProfile.Name=node-role"), "{body}");
    assert!(!body.contains("IamInstanceProfile.Arn"), "{body}");
}

#[tokio::test]
async fn start_stop_and_terminate_act_on_many_ids_in_one_call() {
    let Some(env) = env("batch").await else {
        return;
    };
    let ids = env.launch(5, "batch").await;
    let stop = env.cloud.stop_instances(&ids).await;
    assert_eq!(stop.succeeded.len(), 5, "{:?}", stop.failed);
    assert_eq!(env.proxy.received("StopInstances"), 1);
    assert!(
        env.states()
            .await
            .values()
            .all(|s| *s == InstanceState::Stopped)
    );

    let start = env.cloud.start_instances(&ids).await;
    assert_eq!(start.succeeded.len(), 5);
    assert_eq!(env.proxy.received("StartInstances"), 1);
    assert!(
        env.states()
            .await
            .values()
            .all(|s| *s == InstanceState::Running)
    );

    let term = env.cloud.terminate_instances(&ids).await;
    assert_eq!(term.succeeded.len(), 5);
    assert_eq!(env.proxy.received("TerminateInstances"), 1);
    assert!(
        env.states()
            .await
            .values()
            .all(|s| *s == InstanceState::Terminated)
    );
    assert_eq!(env.metrics.calls(Operation::StartInstances, "success"), 1);
}

#[tokio::test]
async fn one_unknown_id_does_not_stop_the_others() {
    let Some(env) = env("unknown-id").await else {
        return;
    };
    let ids = env.launch(2, "unknown").await;
    let unknown = "i-0123456789abcdef0".to_owned();
    let batch = vec![ids[0].clone(), unknown.clone(), ids[1].clone()];
    let out = env.cloud.stop_instances(&batch).await;
    let mut succeeded = out.succeeded.clone();
    succeeded.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(succeeded, expected);
    assert_eq!(out.failed.len(), 1);
    assert_eq!(out.failed[0].0, unknown);
    assert!(
        matches!(out.failed[0].1, CloudError::NotFound(_)),
        "{:?}",
        out.failed
    );
    assert_eq!(
        env.proxy.received("StopInstances"),
        2,
        "one failed call, one retry without the bad id"
    );
    let states = env.states().await;
    assert!(ids.iter().all(|id| states[id] == InstanceState::Stopped));
}

#[tokio::test]
async fn listing_follows_every_page_and_keeps_to_the_cluster() {
    let Some(env) = env("pages").await else {
        return;
    };
    let cloud = Ec2Cloud::new(
        &sdk_config(&env.proxy.endpoint()).await,
        "pages",
        Limits::unlimited(),
        RetryPolicy::default(),
        env.metrics.clone(),
    )
    .with_page_size(5);
    // Twelve reservations (moto paginates by reservation): 3 pages of 5.
    let mut ids = Vec::new();
    for i in 0..12 {
        let mut request = env.request(1, &format!("page-{i}"));
        request.spec.subnet_ids.truncate(1);
        let out = cloud.launch(&request).await;
        ids.extend(out.instances.into_iter().map(|i| i.id));
    }
    // Another cluster's instance must never be listed.
    env.raw
        .run_instances()
        .image_id(&env.ami)
        .min_count(1)
        .max_count(1)
        .subnet_id(&env.subnets[0].0)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key(tags::CLUSTER)
                        .value("someone-else")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let before = env.proxy.received("DescribeInstances");
    let listed = cloud.list_instances().await.unwrap();
    let pages = env.proxy.received("DescribeInstances") - before;
    let mut listed_ids: Vec<String> = listed.iter().map(|i| i.id.clone()).collect();
    listed_ids.sort();
    ids.sort();
    assert_eq!(listed_ids, ids);
    assert_eq!(pages, 3, "12 reservations at 5 per page");
    assert!(listed.iter().all(|i| i.tag(tags::CLUSTER) == Some("pages")));
    assert!(
        listed
            .iter()
            .all(|i| i.provider_id().starts_with("aws:///us-east-1a/i-"))
    );
}

#[tokio::test]
async fn node_class_check_finds_existing_and_missing_references() {
    let Some(env) = env("classes").await else {
        return;
    };
    let refs = NodeClassRefs {
        ami: env.ami.clone(),
        subnet_ids: env.subnets.iter().map(|(id, _)| id.clone()).collect(),
        security_group_ids: vec![env.security_group.clone()],
    };
    let ok = env.cloud.check_node_class(&refs).await.unwrap();
    assert!(ok.is_ready(), "{:?}", ok.problems);
    let zones: Vec<(String, String)> = ok
        .subnets
        .iter()
        .map(|s| (s.id.clone(), s.zone.clone()))
        .collect();
    assert_eq!(zones, env.subnets);

    let bad = NodeClassRefs {
        ami: "ami-0deadbeef0000000".into(),
        subnet_ids: vec![env.subnets[0].0.clone(), "subnet-0deadbeef".into()],
        security_group_ids: vec![env.security_group.clone(), "sg-0deadbeef".into()],
    };
    let check = env.cloud.check_node_class(&bad).await.unwrap();
    assert_eq!(
        check.problems,
        vec![
            "AMI ami-0deadbeef0000000 not found".to_owned(),
            "subnet subnet-0deadbeef not found".to_owned(),
            "security group sg-0deadbeef not found".to_owned(),
        ]
    );
    assert_eq!(check.subnets.len(), 1);
}

#[tokio::test]
async fn throttling_is_retried_and_then_succeeds() {
    let Some(env) = env("throttle").await else {
        return;
    };
    let ids = env.launch(2, "throttle").await;
    env.proxy.inject("StopInstances", Fault::throttle(), 2);
    let out = env.cloud.stop_instances(&ids).await;
    assert_eq!(out.succeeded.len(), 2, "{:?}", out.failed);
    assert_eq!(env.proxy.received("StopInstances"), 3);
    assert_eq!(env.proxy.forwarded("StopInstances"), 1);
    assert_eq!(env.metrics.calls(Operation::StopInstances, "throttled"), 2);
    assert_eq!(env.metrics.calls(Operation::StopInstances, "success"), 1);

    // Throttled beyond the retry budget: the error surfaces, typed.
    env.proxy.inject("DescribeInstances", Fault::throttle(), 10);
    assert!(matches!(
        env.cloud.list_instances().await,
        Err(CloudError::Throttled(_))
    ));
    assert_eq!(
        env.metrics.calls(Operation::DescribeInstances, "throttled"),
        5
    );
}

#[tokio::test]
async fn capacity_errors_are_typed_and_fall_back_to_other_zones() {
    let Some(env) = env("capacity").await else {
        return;
    };
    // One subnet and no capacity: the error surfaces typed, nothing is retried blindly.
    let mut single = env.request(2, "ice-single");
    single.spec.subnet_ids.truncate(1);
    env.proxy
        .inject("RunInstances", Fault::insufficient_capacity(), 1);
    let out = env.cloud.launch(&single).await;
    assert!(out.instances.is_empty());
    assert!(
        matches!(out.errors[..], [CloudError::InsufficientCapacity(_)]),
        "{:?}",
        out.errors
    );
    assert_eq!(env.proxy.received("RunInstances"), 1);

    // With several subnets, the short zone's share moves to another zone.
    let mut two = env.request(2, "ice-two");
    two.spec.subnet_ids.truncate(2);
    env.proxy
        .inject("RunInstances", Fault::insufficient_capacity(), 1);
    let out = env.cloud.launch(&two).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.instances.len(), 2);
    assert_eq!(env.states().await.len(), 2);
}

#[tokio::test]
async fn a_retried_launch_with_the_same_token_does_not_double_launch() {
    let Some(env) = env("idempotent").await else {
        return;
    };
    let mut request = env.request(2, "slot-42");
    request.spec.subnet_ids.truncate(1);
    // The first response is lost after EC2 (moto) launched the instances.
    env.proxy.inject("RunInstances", Fault::LoseResponse, 1);
    let out = env.cloud.launch(&request).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.instances.len(), 2);
    assert_eq!(
        env.proxy.received("RunInstances"),
        2,
        "the lost response was retried"
    );
    assert_eq!(
        env.proxy.forwarded("RunInstances"),
        1,
        "the retry reused the token"
    );
    assert_eq!(env.states().await.len(), 2);

    // A restart that sees the same state sends the same token: still two instances.
    let again = env.cloud.launch(&request).await;
    let mut a: Vec<String> = out.instances.iter().map(|i| i.id.clone()).collect();
    let mut b: Vec<String> = again.instances.iter().map(|i| i.id.clone()).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert_eq!(env.states().await.len(), 2);
}
