//! Least privilege (SPEC §9): the chart's RBAC against the API calls Stratos really makes.
//! A scenario drives every controller path (warmup with pre-pull, scale-up, drain with
//! eviction, pool deletion, garbage collection, events, leader election); the API server's
//! audit log, filtered on Stratos' User-Agent, gives the calls. Each call must be allowed by
//! the rendered chart, and each granted verb must have been used.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams},
};
use serde_json::{Value, json};
use stratos::{
    api::NodePool,
    cloud::{InstanceState, tags},
    http::Health,
    leader::{self, LeaderConfig},
    preflight,
};
use testkit::{
    apiserver::AuditEntry,
    harness::{ClusterOptions, TestCluster},
};

const QUICKSTART: &str = include_str!("../examples/quickstart.yaml");

/// One authorization check: what RBAC sees of a request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Access {
    group: String,
    /// `resource` or `resource/subresource`.
    resource: String,
    verb: String,
    namespace: Option<String>,
}

/// The RBAC attributes of a request, as the API server's authorizer derives them; `None`
/// for non-resource paths (discovery, /version), which every authenticated user may read.
fn access(entry: &AuditEntry) -> Option<Access> {
    let parts: Vec<&str> = entry.path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (resource, name) = match rest {
        [] => return None,
        [r] => ((*r).to_owned(), None),
        [r, n] => ((*r).to_owned(), Some(*n)),
        [r, n, sub] => (format!("{r}/{sub}"), Some(*n)),
        _ => return None,
    };
    let watch = entry
        .query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (entry.method.as_str(), name) {
        ("GET", Some(_)) => "get",
        ("GET", None) if watch => "watch",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        _ => return None,
    };
    Some(Access {
        group,
        resource,
        verb: verb.to_owned(),
        namespace,
    })
}

/// `(group, resource) → verbs` of the ClusterRole and of the release-namespace Role.
type Grants = BTreeMap<(String, String), BTreeSet<String>>;

fn grants(rules: &Value) -> Grants {
    let mut out = Grants::new();
    for rule in rules.as_array().into_iter().flatten() {
        let strings = |k: &str| -> Vec<String> {
            rule[k]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        assert!(
            rule.get("resourceNames").is_none(),
            "resourceNames are not modelled here"
        );
        for g in strings("apiGroups") {
            for r in strings("resources") {
                assert!(g != "*" && r != "*", "wildcards are never least privilege");
                for v in strings("verbs") {
                    assert!(v != "*", "wildcard verbs are never least privilege");
                    out.entry((g.clone(), r.clone())).or_default().insert(v);
                }
            }
        }
    }
    out
}

/// Renders the chart with default values and returns (ClusterRole grants, Role grants).
/// The chart's RBAC, rendered for release namespace `namespace` (the operator's own).
fn chart_rbac(namespace: &str) -> Option<(Grants, Grants)> {
    let helm = testkit::tools::helm()?;
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/stratos");
    let out = std::process::Command::new(helm)
        .args([
            "template",
            "stratos",
            chart,
            "--namespace",
            namespace,
            "--set",
            "clusterName=e2e",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (mut cluster, mut namespaced) = (Grants::new(), Grants::new());
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let doc: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
        let doc: Value = serde_json::to_value(doc).unwrap();
        match doc["kind"].as_str() {
            Some("ClusterRole") => cluster.extend(grants(&doc["rules"])),
            Some("Role") => {
                assert_eq!(doc["metadata"]["namespace"], namespace);
                namespaced.extend(grants(&doc["rules"]));
            }
            _ => {}
        }
    }
    Some((cluster, namespaced))
}

fn allowed(grants: &Grants, a: &Access) -> bool {
    grants
        .get(&(a.group.clone(), a.resource.clone()))
        .is_some_and(|verbs| verbs.contains(&a.verb))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_grants_exactly_the_calls_stratos_makes() {
    if testkit::harness::real_cluster() {
        eprintln!("skipping: a real cluster has no audit log here");
        return;
    }
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    // The test's namespace stands for the release namespace: the operator's own, where
    // its pre-pull pods and its Lease live.
    let namespace = cluster.namespace.clone();
    let Some((cluster_grants, namespace_grants)) = chart_rbac(&namespace) else {
        return;
    };
    let server = cluster.server.as_ref().expect("embedded API server");
    let operator = cluster.start_operator();

    // Warmup with an image pre-pull pod.
    cluster
        .apply_yaml(QUICKSTART.split("---").next().unwrap())
        .await;
    let pool = QUICKSTART.split("---").nth(1).unwrap().replace(
        "minStandby: 3",
        "minStandby: 1\n  preWarm:\n    imagesToPull:\n      - \"registry.example/model:1\"",
    );
    cluster.apply_yaml(&pool).await;
    let pools: Api<NodePool> = Api::all(cluster.client.clone());
    cluster
        .wait_for("one standby node", Duration::from_secs(30), || async {
            let s = pools.get(&cluster.name("workers")).await.ok()?.status?;
            (s.standby == 1 && s.warmup == 0).then_some(())
        })
        .await;

    // Scale-up for a pending pod, then a drain that must evict it.
    let pods: Api<Pod> = cluster.pods();
    cluster
        .apply_yaml("apiVersion: v1\nkind: Pod\nmetadata:\n  name: job\n  namespace: default\nspec:\n  nodeSelector:\n    stratos.sh/pool: workers\n  containers:\n    - name: c\n      image: runner:1\n      resources:\n        requests:\n          cpu: 500m\n")
        .await;
    let node = cluster
        .running_node_of("job", Duration::from_secs(30))
        .await;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    cluster.begin_drain(&node).await;
    cluster
        .wait_for("the pod evicted", Duration::from_secs(30), || async {
            pods.get_opt("job").await.ok()?.is_none().then_some(())
        })
        .await;

    // Garbage: a node whose instance is gone, and an instance whose pool is gone.
    let ghost: Node = serde_json::from_value(json!({
        "metadata": {"name": format!("ip-10-99-0-1.{}", cluster.dns_domain()), "labels": {"stratos.sh/pool": cluster.name("workers")}},
        "spec": {"providerID": "aws:///us-east-1a/i-0000000000dead01"}
    }))
    .unwrap();
    nodes.create(&Default::default(), &ghost).await.unwrap();
    let orphan = cluster.cloud.insert_foreign_instance(
        [
            (tags::CLUSTER, cluster.cluster_name.as_str()),
            (tags::POOL, "ghost"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        InstanceState::Stopped,
    );
    cluster
        .wait_for("garbage collected", Duration::from_secs(30), || async {
            let node_gone = nodes
                .get_opt(ghost.name_any().as_str())
                .await
                .ok()?
                .is_none();
            let orphan_gone = cluster
                .cloud
                .instance(&orphan)
                .is_none_or(|i| !i.state.is_live());
            (node_gone && orphan_gone).then_some(())
        })
        .await;

    // Deleting the pool terminates its instances and releases the class.
    pools
        .delete(&cluster.name("workers"), &DeleteParams::default())
        .await
        .unwrap();
    cluster
        .wait_for("the pool gone", Duration::from_secs(60), || async {
            pools
                .get_opt(&cluster.name("workers"))
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await;
    let _ = pods.list(&ListParams::default()).await;
    operator.kill();

    // Leader election as the binary runs it: acquire, then release on shutdown.
    let mut config = server.config();
    preflight::identify(&mut config);
    let client = kube::Client::try_from(config).unwrap();
    let leader = LeaderConfig {
        lease_name: "stratos-leader".into(),
        namespace: namespace.clone(),
        identity: leader::identity(),
        lease_duration: Duration::from_secs(6),
    };
    let (acquired_tx, acquired_rx) = tokio::sync::oneshot::channel();
    leader::run_elected(
        client,
        &leader,
        Health::new(),
        async move {
            let _ = acquired_rx.await;
            // Long enough for one renewal.
            tokio::time::sleep(Duration::from_secs(5)).await;
        },
        |stop| async move {
            let _ = acquired_tx.send(());
            stop.await;
        },
    )
    .await
    .unwrap();

    let used: BTreeSet<Access> = server
        .audit()
        .iter()
        .filter(|e| e.user_agent == preflight::USER_AGENT)
        .filter_map(access)
        .collect();
    println!("Stratos' API calls:");
    for a in &used {
        println!(
            "  {:<8} {}/{} {}",
            a.verb,
            if a.group.is_empty() { "core" } else { &a.group },
            a.resource,
            a.namespace.as_deref().unwrap_or("(cluster)")
        );
    }
    let missing: Vec<&Access> = used
        .iter()
        .filter(|a| {
            let in_namespace = a.namespace.as_deref() == Some(namespace.as_str());
            !(allowed(&cluster_grants, a) || in_namespace && allowed(&namespace_grants, a))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "calls the chart does not allow: {missing:#?}"
    );
    let mut unused = Vec::new();
    for (grants, scope) in [
        (&cluster_grants, None),
        (&namespace_grants, Some(namespace.as_str())),
    ] {
        for ((group, resource), verbs) in grants {
            for verb in verbs {
                let hit = used.iter().any(|a| {
                    a.group == *group
                        && a.resource == *resource
                        && a.verb == *verb
                        && (scope.is_none() || a.namespace.as_deref() == scope)
                });
                if !hit {
                    unused.push(format!("{verb} {group}/{resource} ({scope:?})"));
                }
            }
        }
    }
    assert!(unused.is_empty(), "granted but never used: {unused:#?}");
}
