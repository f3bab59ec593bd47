//! The embedded API server against kube-rs, as Stratos will use it.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    core::v1::{Node, Pod},
    policy::v1::{Eviction, PodDisruptionBudget},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, reflector, watcher},
};
use serde_json::{Value, json};
use stratos::api::{NodePool, NodePoolStatus};
use testkit::apiserver::ApiServer;

fn node(name: &str, labels: Value) -> Node {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
}

fn pod(name: &str, labels: Value, ready: bool) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "busybox:1"}], "nodeName": "n1"},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    }))
    .unwrap()
}

async fn wait_until<F: Fn() -> bool>(what: &str, f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_reflector_stays_consistent_across_closed_watches_and_410_relists() {
    let server = ApiServer::start_with_repo_crds().await;
    let client = server.client();
    let nodes: Api<Node> = Api::all(client.clone());
    for i in 0..3 {
        nodes
            .create(
                &PostParams::default(),
                &node(&format!("n{i}"), json!({"pool": "a"})),
            )
            .await
            .unwrap();
    }
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().labels("pool=a");
    let stream = reflector(writer, watcher(nodes.clone(), config)).applied_objects();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    wait_until("initial list", || reader.state().len() == 3).await;

    // The server closes every watch: the watcher resumes from its last version.
    server.close_all_watches();
    nodes
        .create(&PostParams::default(), &node("n3", json!({"pool": "a"})))
        .await
        .unwrap();
    nodes
        .create(&PostParams::default(), &node("other", json!({"pool": "b"})))
        .await
        .unwrap();
    wait_until("the node created after the closed watch", || {
        reader.state().len() == 4
    })
    .await;

    // History is compacted and the watch closed: the resume gets 410 and relists.
    nodes.delete("n0", &DeleteParams::default()).await.unwrap();
    server.compact();
    server.close_all_watches();
    nodes
        .create(&PostParams::default(), &node("n4", json!({"pool": "a"})))
        .await
        .unwrap();
    wait_until("the relist after 410", || {
        let mut names: Vec<String> = reader
            .state()
            .iter()
            .map(|n| n.metadata.name.clone().unwrap())
            .collect();
        names.sort();
        names == ["n1", "n2", "n3", "n4"]
    })
    .await;

    // A label change that leaves the selection is a deletion for this watcher.
    nodes
        .patch(
            "n4",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"pool": "b"}}})),
        )
        .await
        .unwrap();
    wait_until("n4 leaving the selection", || reader.state().len() == 3).await;
    task.abort();
}

#[tokio::test]
async fn watches_replay_from_a_version_and_send_bookmarks() {
    let server = ApiServer::start_with_repo_crds().await;
    let nodes: Api<Node> = Api::all(server.client());
    let first = nodes
        .create(&PostParams::default(), &node("a", json!({})))
        .await
        .unwrap();
    let rv = first.metadata.resource_version.clone().unwrap();
    nodes
        .create(&PostParams::default(), &node("b", json!({})))
        .await
        .unwrap();
    let wp = kube::api::WatchParams::default().timeout(2);
    let events: Vec<_> = nodes
        .watch(&wp, &rv)
        .await
        .unwrap()
        .take(1)
        .try_collect()
        .await
        .unwrap();
    match &events[0] {
        kube::api::WatchEvent::Added(n) => assert_eq!(n.metadata.name.as_deref(), Some("b")),
        other => panic!("expected b ADDED, got {other:?}"),
    }
    server.compact();
    let events: Vec<_> = nodes
        .watch(&wp, &rv)
        .await
        .unwrap()
        .take(1)
        .try_collect()
        .await
        .unwrap();
    match &events[0] {
        kube::api::WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn stale_updates_conflict_and_status_is_split_from_spec() {
    let server = ApiServer::start_with_repo_crds().await;
    let pools: Api<NodePool> = Api::all(server.client());
    let pool: NodePool = serde_json::from_value(json!({
        "apiVersion": "stratos.sh/v1alpha1", "kind": "NodePool",
        "metadata": {"name": "workers"},
        "spec": {"poolSize": 3, "minStandby": 1, "template": {"nodeClassRef": {"kind": "AWSNodeClass", "name": "w"}}},
        "status": {"standby": 9}
    }))
    .unwrap();
    let created = pools.create(&PostParams::default(), &pool).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(created.status, None, "status is ignored on create");
    assert_eq!(
        created.spec.scale_down.empty_node_ttl.to_string(),
        "5m",
        "schema defaults applied"
    );

    let mut stale = created.clone();
    let mut fresh = created.clone();
    fresh.spec.pool_size = 4;
    let updated = pools
        .replace("workers", &PostParams::default(), &fresh)
        .await
        .unwrap();
    assert_eq!(
        updated.metadata.generation,
        Some(2),
        "a spec change bumps the generation"
    );
    stale.spec.pool_size = 5;
    let err = pools
        .replace("workers", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err:?}"
    );

    // Status through the main resource is ignored; through /status it lands and does not
    // bump the generation.
    let mut with_status = updated.clone();
    with_status.status = Some(NodePoolStatus {
        standby: 2,
        ..Default::default()
    });
    let after = pools
        .replace("workers", &PostParams::default(), &with_status)
        .await
        .unwrap();
    assert_eq!(after.status, None);
    let status_patch = json!({"apiVersion": "stratos.sh/v1alpha1", "kind": "NodePool", "status": {"standby": 2, "total": 3}});
    let after = pools
        .patch_status(
            "workers",
            &PatchParams::apply("stratos").force(),
            &Patch::Apply(&status_patch),
        )
        .await
        .unwrap();
    assert_eq!(after.status.as_ref().unwrap().standby, 2);
    assert_eq!(after.metadata.generation, Some(2));
    // Apply again without `total`: the field this manager no longer sets is removed.
    let status_patch =
        json!({"apiVersion": "stratos.sh/v1alpha1", "kind": "NodePool", "status": {"standby": 1}});
    let after = pools
        .patch_status(
            "workers",
            &PatchParams::apply("stratos").force(),
            &Patch::Apply(&status_patch),
        )
        .await
        .unwrap();
    let raw: Api<kube::api::DynamicObject> = Api::all_with(
        server.client(),
        &kube::api::ApiResource::erase::<NodePool>(&()),
    );
    let stored = raw.get("workers").await.unwrap();
    // `total` is gone from this manager's configuration: removed, then defaulted by the
    // schema (default 0) as kube-apiserver does.
    assert_eq!(
        stored.data["status"]["total"],
        json!(0),
        "{:?}",
        after.status
    );
    assert_eq!(stored.data["status"]["standby"], json!(1));

    // An apply without apiVersion/kind is refused, as by kube-apiserver.
    let err = pools
        .patch_status(
            "workers",
            &PatchParams::apply("stratos").force(),
            &Patch::Apply(json!({"status": {"standby": 1}})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 400),
        "{err:?}"
    );
    // Strategic merge patch is for built-in kinds only.
    let err = pools
        .patch(
            "workers",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"poolSize": 2}})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 415),
        "{err:?}"
    );
    // Schema violations are 422 with the field named.
    let err = pools
        .patch(
            "workers",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"minStandby": 10}})),
        )
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422);
            assert!(s.message.contains("spec.minStandby"), "{}", s.message);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn finalizers_block_deletion_until_removed() {
    let server = ApiServer::start_with_repo_crds().await;
    let nodes: Api<Node> = Api::all(server.client());
    let mut n = node("held", json!({}));
    n.metadata.finalizers = Some(vec!["stratos.sh/test".into()]);
    nodes.create(&PostParams::default(), &n).await.unwrap();
    nodes
        .delete("held", &DeleteParams::default())
        .await
        .unwrap();
    let held = nodes.get("held").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    // No new finalizers while deleting.
    let err = nodes
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["stratos.sh/test", "x/y"]}})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422),
        "{err:?}"
    );
    nodes
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert!(nodes.get_opt("held").await.unwrap().is_none());
}

#[tokio::test]
async fn eviction_respects_pod_disruption_budgets() {
    let server = ApiServer::start_with_repo_crds().await;
    // kube's default client retries 429 for minutes; evictions need the answer now.
    let client: Client = server.client_without_retry();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let pdbs: Api<PodDisruptionBudget> = Api::default_namespaced(client.clone());
    pods.create(
        &PostParams::default(),
        &pod("web-1", json!({"app": "web"}), true),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("web-2", json!({"app": "web"}), true),
    )
    .await
    .unwrap();
    // Pods are created Pending; make them Ready as a kubelet would.
    for name in ["web-1", "web-2"] {
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}))).await.unwrap();
    }
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "web"}, "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}
    }))
    .unwrap();
    pdbs.create(&PostParams::default(), &pdb).await.unwrap();
    let err = pods
        .evict("web-1", &EvictParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 429),
        "{err:?}"
    );
    assert!(
        pods.get("web-1")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_none()
    );

    pdbs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"minAvailable": 1}})),
    )
    .await
    .unwrap();
    pods.evict("web-1", &EvictParams::default()).await.unwrap();
    let evicted = pods.get("web-1").await.unwrap();
    assert!(
        evicted.metadata.deletion_timestamp.is_some(),
        "a bound pod terminates gracefully"
    );
    // The second pod is now the last healthy one: blocked again.
    let err = pods
        .evict("web-2", &EvictParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 429),
        "{err:?}"
    );
    // The kubelet confirms the first deletion.
    pods.delete(
        "web-1",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(pods.get_opt("web-1").await.unwrap().is_none());
    let _ = Eviction::default();
}

#[tokio::test]
async fn selectors_pagination_and_strategic_merge_work_like_the_api_server() {
    let server = ApiServer::start_with_repo_crds().await;
    let client = server.client();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    for i in 0..5 {
        let mut p = pod(
            &format!("p{i}"),
            json!({"i": i.to_string(), "tier": if i % 2 == 0 { "even" } else { "odd" }}),
            true,
        );
        if i >= 3 {
            p.spec.as_mut().unwrap().node_name = None;
        }
        pods.create(&PostParams::default(), &p).await.unwrap();
    }
    let names = |list: kube::core::ObjectList<Pod>| -> Vec<String> {
        list.items
            .into_iter()
            .map(|p| p.metadata.name.unwrap())
            .collect()
    };
    assert_eq!(
        names(
            pods.list(&ListParams::default().labels("tier=even"))
                .await
                .unwrap()
        ),
        ["p0", "p2", "p4"]
    );
    assert_eq!(
        names(
            pods.list(&ListParams::default().labels("tier in (odd),i!=1"))
                .await
                .unwrap()
        ),
        ["p3"]
    );
    assert_eq!(
        names(
            pods.list(&ListParams::default().fields("spec.nodeName="))
                .await
                .unwrap()
        ),
        ["p3", "p4"]
    );
    assert_eq!(
        names(
            pods.list(&ListParams::default().fields("spec.nodeName=,status.phase=Pending"))
                .await
                .unwrap()
        ),
        ["p3", "p4"],
        "new pods are Pending whatever status they were created with"
    );
    let err = pods
        .list(&ListParams::default().fields("spec.bogus=x"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 400),
        "{err:?}"
    );

    let first = pods.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("continue token");
    let rest = pods
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 3);
    assert!(rest.metadata.continue_.as_deref().unwrap_or("").is_empty());

    // Strategic merge on a node's conditions merges by type.
    let nodes: Api<Node> = Api::all(client);
    nodes
        .create(&PostParams::default(), &node("n1", json!({})))
        .await
        .unwrap();
    let conditions =
        |ready: &str| json!({"status": {"conditions": [{"type": "Ready", "status": ready}]}});
    nodes.patch_status("n1", &PatchParams::default(), &Patch::Strategic(json!({"status": {"conditions": [{"type": "NetworkUnavailable", "status": "False"}]}}))).await.unwrap();
    let n = nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Strategic(conditions("True")),
        )
        .await
        .unwrap();
    let types: Vec<String> = n
        .status
        .unwrap()
        .conditions
        .unwrap()
        .into_iter()
        .map(|c| format!("{}={}", c.type_, c.status))
        .collect();
    assert_eq!(types, ["NetworkUnavailable=False", "Ready=True"]);
    // A no-op write does not change the resourceVersion.
    let before = nodes.get("n1").await.unwrap().metadata.resource_version;
    let after = nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Strategic(conditions("True")),
        )
        .await
        .unwrap();
    assert_eq!(before, after.metadata.resource_version);
}

/// kubectl, a client we did not write, against the embedded server: discovery, apply,
/// printer-column tables and the API server's validation messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_works_against_the_embedded_server() {
    let Some(kubectl) = testkit::tools::kubectl() else {
        return;
    };
    let server = ApiServer::start_with_repo_crds().await;
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&kubectl)
            .args(args)
            .env("KUBECONFIG", server.kubeconfig_path())
            .current_dir(&repo)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // kubectl's client-side validation needs the OpenAPI documents, which are not served.
    let (ok, out) =
        tokio::task::block_in_place(|| run(&["apply", "--validate=false", "-f", "examples/"]));
    assert!(ok, "{out}");
    assert!(out.contains("nodepool.stratos.sh/workers created"), "{out}");
    let (ok, out) = tokio::task::block_in_place(|| run(&["get", "np"]));
    assert!(ok, "{out}");
    let header = out.lines().next().unwrap_or_default();
    for column in [
        "NAME",
        "POOLSIZE",
        "MINSTANDBY",
        "STANDBY",
        "RUNNING",
        "WARMUP",
        "READY",
        "AGE",
    ] {
        assert!(header.contains(column), "{header}");
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("workers ") && l.contains(" 10 ") && l.contains(" 3 ")),
        "{out}"
    );
    let (ok, out) = tokio::task::block_in_place(|| {
        run(&[
            "get",
            "awsnc",
            "inference",
            "-o",
            "jsonpath={.spec.blockDeviceMappings[0].iops}",
        ])
    });
    assert!(ok && out == "16000", "{out}");
    let (ok, out) = tokio::task::block_in_place(|| {
        run(&[
            "apply",
            "--validate=false",
            "-f",
            "tests/fixtures/invalid/minstandby-above-poolsize.yaml",
        ])
    });
    assert!(!ok);
    assert!(out.contains("spec.minStandby"), "{out}");
    let (ok, out) = tokio::task::block_in_place(|| {
        run(&[
            "apply",
            "--validate=false",
            "-f",
            "examples/quickstart.yaml",
        ])
    });
    assert!(ok && out.contains("unchanged"), "{out}");
}

#[tokio::test]
async fn bookmarks_arrive_on_quiet_watches_and_json_patches_apply() {
    use testkit::apiserver::ApiServerOptions;
    let server = ApiServer::start_with(
        &testkit::apiserver::repo_crds(),
        ApiServerOptions {
            bookmark_interval: Duration::from_millis(100),
            ..Default::default()
        },
    )
    .await;
    let nodes: Api<Node> = Api::all(server.client());
    let n = nodes
        .create(&PostParams::default(), &node("quiet", json!({"a": "1"})))
        .await
        .unwrap();
    let mut wp = kube::api::WatchParams::default().timeout(5);
    wp.bookmarks = true;
    let rv = n.metadata.resource_version.clone().unwrap();
    let first = nodes
        .watch(&wp, &rv)
        .await
        .unwrap()
        .boxed()
        .next()
        .await
        .unwrap()
        .unwrap();
    match first {
        kube::api::WatchEvent::Bookmark(b) => assert!(
            b.metadata.resource_version.parse::<u64>().unwrap() >= rv.parse::<u64>().unwrap()
        ),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/metadata/labels/b", "value": "2"},
        {"op": "remove", "path": "/metadata/labels/a"},
        {"op": "test", "path": "/metadata/name", "value": "quiet"}
    ]))
    .unwrap();
    let patched = nodes
        .patch("quiet", &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .unwrap();
    assert_eq!(patched.labels().get("b").map(String::as_str), Some("2"));
    assert!(!patched.labels().contains_key("a"));
    // As kube-apiserver: `test` against null passes for a missing path (kube-rs' finalizer
    // helper depends on it).
    let add_finalizer: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}
    ]))
    .unwrap();
    let with_finalizer = nodes
        .patch(
            "quiet",
            &PatchParams::default(),
            &Patch::Json::<()>(add_finalizer),
        )
        .await
        .unwrap();
    assert_eq!(
        with_finalizer.metadata.finalizers,
        Some(vec!["x/y".to_owned()])
    );
    let failing: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/metadata/name", "value": "other"}]))
            .unwrap();
    let err = nodes
        .patch(
            "quiet",
            &PatchParams::default(),
            &Patch::Json::<()>(failing),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422),
        "{err:?}"
    );
}

#[tokio::test]
async fn apply_conflicts_until_another_writer_removes_the_field() {
    use k8s_openapi::api::coordination::v1::Lease;
    let server = ApiServer::start_with_repo_crds().await;
    let leases: Api<Lease> = Api::namespaced(server.client(), "default");
    leases
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "l"}})).unwrap(),
        )
        .await
        .unwrap();
    let claim = |who: &str| json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": {"holderIdentity": who}});
    leases
        .patch("l", &PatchParams::apply("a"), &Patch::Apply(claim("a")))
        .await
        .unwrap();
    let err = leases
        .patch("l", &PatchParams::apply("b"), &Patch::Apply(claim("b")))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.message.contains(".spec.holderIdentity")),
        "{err}"
    );
    // b clears the field with an ordinary patch; nobody owns it any more.
    let clear = json!({"spec": {"holderIdentity": null}});
    leases
        .patch("l", &PatchParams::default(), &Patch::Strategic(clear))
        .await
        .unwrap();
    let now = leases
        .patch("l", &PatchParams::apply("b"), &Patch::Apply(claim("b")))
        .await
        .unwrap();
    assert_eq!(now.spec.unwrap().holder_identity.as_deref(), Some("b"));
}

#[tokio::test]
async fn pod_specs_are_immutable_but_for_what_kubernetes_allows() {
    let server = ApiServer::start(&[]).await;
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let mut p = pod("web", json!({}), true);
    p.spec.as_mut().unwrap().tolerations = Some(vec![
        serde_json::from_value(json!({"key": "a", "operator": "Exists"})).unwrap(),
    ]);
    pods.create(&PostParams::default(), &p).await.unwrap();
    let pp = PatchParams::default();
    // What may change: an image, an added toleration, metadata.
    for allowed in [
        json!({"spec": {"containers": [{"name": "c", "image": "busybox:2"}]}}),
        json!({"metadata": {"labels": {"touched": "yes"}}}),
    ] {
        pods.patch("web", &pp, &Patch::Merge(&allowed))
            .await
            .unwrap_or_else(|e| panic!("{allowed}: {e}"));
    }
    let add: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/spec/tolerations/-", "value": {"key": "b", "operator": "Exists"}}
    ]))
    .unwrap();
    pods.patch("web", &pp, &Patch::<()>::Json(add))
        .await
        .expect("a toleration may be added");
    // What may not: resources, a removed toleration, the node.
    for forbidden in [
        json!({"spec": {"containers": [{"name": "c", "image": "busybox:2", "resources": {"requests": {"cpu": "1"}}}]}}),
        json!({"spec": {"tolerations": [{"key": "b", "operator": "Exists"}]}}),
        json!({"spec": {"nodeName": "n2"}}),
    ] {
        match pods.patch("web", &pp, &Patch::Merge(&forbidden)).await {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{forbidden}");
                assert!(
                    e.message.contains(
                        "pod updates may not change fields other than `spec.containers[*].image`"
                    ),
                    "{}",
                    e.message
                );
            }
            other => panic!("{forbidden}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_new_node_is_tainted_not_ready_at_creation() {
    let server = ApiServer::start(&[]).await;
    let nodes: Api<Node> = Api::all(server.client());
    let mut n = node("n1", json!({}));
    n.spec = Some(
        serde_json::from_value(json!({"taints": [{"key": "startup", "effect": "NoSchedule"}]}))
            .unwrap(),
    );
    let created = nodes.create(&PostParams::default(), &n).await.unwrap();
    let taints: Vec<(String, String)> = created
        .spec
        .unwrap()
        .taints
        .unwrap()
        .into_iter()
        .map(|t| (t.key, t.effect))
        .collect();
    assert_eq!(
        taints,
        [
            ("startup".to_owned(), "NoSchedule".to_owned()),
            (
                "node.kubernetes.io/not-ready".to_owned(),
                "NoSchedule".to_owned()
            )
        ]
    );
}
