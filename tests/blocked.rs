//! End to end: no silent stalls (SPEC §8.2, §11 I6). An action the cluster refuses shows
//! within seconds as a Warning event on the pool and the node, the pool's `Degraded`
//! condition and a counter; it clears when the cause goes, and the action then completes.
//! Conflicts never stall a pool.

use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::{
    Api,
    api::{DeleteParams, ListParams},
};
use stratos::{api::NodePool, cloud::ratelimit::Operation};
use testkit::harness::{ClusterOptions, TestCluster};

/// The quickstart at poolSize 3 and minStandby 1, its standby node warm.
async fn pool_with_one_standby_node(cluster: &TestCluster) {
    cluster
        .apply_yaml(
            &include_str!("../examples/quickstart.yaml")
                .replace("poolSize: 10", "poolSize: 3")
                .replace("minStandby: 3", "minStandby: 1"),
        )
        .await;
    cluster.wait_standby("workers", 1, 1).await;
}

/// The pod `web` (500m, label app=web) on the pool's nodes. Names as the test writes them;
/// `apply_yaml` scopes them to this test.
const WEB_POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: default\n  labels:\n    app: web\nspec:\n  nodeSelector:\n    stratos.sh/pool: workers\n  containers:\n    - name: c\n      image: web:1\n      resources:\n        requests:\n          cpu: 500m\n";

/// [`pool_with_one_standby_node`], plus [`WEB_POD`] running on it; returns the node.
async fn pool_with_a_running_pod(cluster: &TestCluster) -> String {
    pool_with_one_standby_node(cluster).await;
    cluster.apply_yaml(WEB_POD).await;
    cluster
        .running_node_of("web", Duration::from_secs(30))
        .await
}

/// Warning events with `reason` about the object named `name`: (kind, note).
async fn warnings(cluster: &TestCluster, reason: &str, name: &str) -> Vec<(String, String)> {
    let events: Api<Event> = Api::all(cluster.client.clone());
    events
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason) && e.type_.as_deref() == Some("Warning"))
        .filter_map(|e| {
            let r = e.regarding?;
            (r.name.as_deref() == Some(name))
                .then(|| (r.kind.unwrap_or_default(), e.note.unwrap_or_default()))
        })
        .collect()
}

/// The pool's `Degraded` condition: (status, reason, message).
async fn degraded(cluster: &TestCluster) -> Option<(String, String, String)> {
    let s = cluster.pool_status("workers").await?;
    s.conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .map(|c| (c.status, c.reason, c.message))
}

/// Deletes the pool while `reason` blocks its drain; checks what a user sees; lifts the
/// cause with `lift`; checks that the deletion completes.
async fn a_blocked_deletion_is_visible_and_completes(
    cluster: &TestCluster,
    operator: &testkit::harness::Operator,
    node: &str,
    reason: &str,
    names: &str,
    lift: impl std::future::Future<Output = ()>,
) {
    let pool = cluster.name("workers");
    let pools: Api<NodePool> = Api::all(cluster.client.clone());
    let deleted = Instant::now();
    pools.delete(&pool, &DeleteParams::default()).await.unwrap();
    let (status, why, message) = cluster
        .wait_for(
            "the Degraded condition naming the block",
            Duration::from_secs(15),
            || async {
                degraded(cluster)
                    .await
                    .filter(|(s, r, _)| s == "True" && r == reason)
            },
        )
        .await;
    let condition_after = deleted.elapsed();
    let events = cluster
        .wait_for("Warning events", Duration::from_secs(15), || async {
            let on_pool = warnings(cluster, reason, &pool).await;
            let on_node = warnings(cluster, reason, node).await;
            (!on_pool.is_empty() && !on_node.is_empty()).then(|| [on_pool, on_node].concat())
        })
        .await;
    println!(
        "{reason}: condition after {:.1}s: Degraded={status} reason={why} message={message:?}",
        condition_after.as_secs_f64()
    );
    for (kind, note) in &events {
        println!("{reason}: Warning event on {kind}: {note}");
    }
    assert!(message.contains(names), "{message:?} names {names:?}");
    assert!(
        condition_after < Duration::from_secs(10),
        "visible within seconds"
    );
    // A 2 s retry loop does not publish an event per round.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let repeats = warnings(cluster, reason, &pool).await.len();
    assert_eq!(
        repeats, 1,
        "one event object for the cause, not one per retry"
    );
    let metrics = operator.metrics.render();
    let counter = metrics
        .lines()
        .find(|l| {
            l.starts_with("stratos_blocked_actions_total")
                && l.contains(&format!("pool=\"{pool}\""))
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .unwrap_or_default()
        .to_owned();
    println!("{reason}: {counter}");
    assert!(
        counter
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v >= 1.0),
        "{counter:?}"
    );
    // Nothing was forced while blocked.
    let web = cluster.pods().get("web").await.unwrap();
    assert!(web.metadata.deletion_timestamp.is_none(), "not evicted");
    assert_eq!(
        cluster.instance_of_node(node).state,
        stratos::cloud::InstanceState::Running,
        "its node not stopped under it"
    );

    lift.await;
    let lifted = Instant::now();
    let cleared = cluster
        .wait_for(
            "the condition cleared or the pool gone",
            Duration::from_secs(60),
            || async {
                match pools.get_opt(&pool).await.ok()? {
                    None => Some("pool deleted"),
                    Some(_) => degraded(cluster)
                        .await
                        .filter(|(s, _, _)| s == "False")
                        .map(|_| "Degraded=False"),
                }
            },
        )
        .await;
    println!(
        "{reason}: {cleared} {:.1}s after the cause was removed",
        lifted.elapsed().as_secs_f64()
    );
    cluster
        .wait_for("the deletion complete", Duration::from_secs(60), || async {
            let gone = pools.get_opt(&pool).await.ok()?.is_none();
            (gone && cluster.pool_instances("workers").is_empty()).then_some(())
        })
        .await;
    println!(
        "{reason}: pool deleted {:.1}s after the cause was removed",
        lifted.elapsed().as_secs_f64()
    );
    cluster.invariants.assert_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_blocked_by_forbidden_evictions_says_so_and_completes_once_allowed() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let operator = cluster.start_operator();
    let node = pool_with_a_running_pod(&cluster).await;
    cluster.deny_evictions().await;
    a_blocked_deletion_is_visible_and_completes(
        &cluster,
        &operator,
        &node,
        "EvictionForbidden",
        "web",
        cluster.allow_evictions(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_blocked_by_a_pdb_names_it_and_completes_once_it_is_gone() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let operator = cluster.start_operator();
    cluster
        .apply_yaml("apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: web-budget\n  namespace: default\nspec:\n  minAvailable: 1\n  selector:\n    matchLabels:\n      app: web\n")
        .await;
    let node = pool_with_a_running_pod(&cluster).await;
    let pdbs: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
        Api::namespaced(cluster.client.clone(), &cluster.namespace);
    a_blocked_deletion_is_visible_and_completes(
        &cluster,
        &operator,
        &node,
        "EvictionBlockedByPDB",
        "PodDisruptionBudget web-budget",
        async {
            pdbs.delete("web-budget", &DeleteParams::default())
                .await
                .unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_on_node_patches_do_not_stall_a_scale_up() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let Some(server) = &cluster.server else {
        println!("SKIPPED: a real API server cannot be made to answer 409 on demand");
        return;
    };
    let _operator = cluster.start_operator();
    pool_with_one_standby_node(&cluster).await;
    // As after a kube-apiserver restart: the next 14 node writes meet 409 Conflict.
    server.fail_next("patch", "nodes", 409, 14);
    let before = cluster.cloud.call_count(Operation::StartInstances);
    let created = Instant::now();
    cluster.apply_yaml(WEB_POD).await;
    cluster
        .wait_for("the start", Duration::from_secs(10), || async {
            (cluster.cloud.call_count(Operation::StartInstances) > before).then_some(())
        })
        .await;
    let took = created.elapsed();
    let conflicts = server
        .audit()
        .iter()
        .filter(|a| a.method == "PATCH" && a.path.starts_with("/api/v1/nodes/") && a.code == 409)
        .count();
    println!(
        "{conflicts} node patches answered 409; the standby node started {:.2}s after the pod was created",
        took.as_secs_f64()
    );
    assert!(conflicts >= 14, "the faults were met: {conflicts}");
    assert!(took < Duration::from_secs(2), "acted within 2 s");
    cluster
        .running_node_of("web", Duration::from_secs(30))
        .await;
    cluster.invariants.assert_held().await;
}
