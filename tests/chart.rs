//! The Helm chart as the binary and Prometheus meet it: the rendered container arguments
//! parse as `stratos run` flags, the pod is hardened, and every metric the alerts and the
//! dashboard query is one Stratos exports. (Lint, schemas and kubernetes-validate run in
//! `.ci/chart-check`; RBAC is checked in `tests/rbac.rs`.)

use std::{collections::BTreeSet, time::Duration};

use serde_json::Value;
use stratos::{
    cloud::ratelimit::Operation,
    config::{Cli, Command},
    metrics::{CloudApiMetrics, PoolMetrics},
};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/stratos");

fn render(values: &str) -> Option<Vec<Value>> {
    let helm = testkit::tools::helm()?;
    let out = std::process::Command::new(helm)
        .args(["template", "stratos", CHART, "--namespace", "stratos", "-f"])
        .arg(format!("{CHART}/ci/{values}-values.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template ({values}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    Some(
        serde_yaml::Deserializer::from_str(&text)
            .map(|doc| {
                let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
                serde_json::to_value(v).unwrap()
            })
            .filter(|v| !v.is_null())
            .collect(),
    )
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind)
}

#[test]
fn the_rendered_arguments_are_valid_stratos_flags() {
    for values in ["default", "all-options"] {
        let Some(docs) = render(values) else { return };
        let deployment = kind(&docs, "Deployment").expect("a Deployment");
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<String> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        let cli = Cli::parse_from_args(std::iter::once("stratos".to_owned()).chain(args.clone()))
            .unwrap_or_else(|e| panic!("{values}: {args:?}: {}", e.message));
        let Command::Run(run) = cli.command else {
            panic!("{values}: not `stratos run`: {args:?}");
        };
        assert_eq!(run.cluster_name, "prod-1");
        assert!(run.leader_elect, "{values}: leader election on");
        // The probes and the Service point at the ports the flags open.
        let ports: Vec<u64> = container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["containerPort"].as_u64().unwrap())
            .collect();
        assert!(
            ports.contains(&(run.metrics_addr.port() as u64)),
            "{values}"
        );
        assert!(ports.contains(&(run.health_addr.port() as u64)), "{values}");
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        // The pre-pull pods run the operator's own image.
        assert_eq!(
            run.prepull_image.as_deref(),
            container["image"].as_str(),
            "{values}"
        );
        let env: BTreeSet<&str> = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert!(env.contains("POD_NAME") && env.contains("POD_NAMESPACE"));
    }
}

#[test]
fn the_pod_is_hardened_and_replicas_are_protected() {
    let Some(docs) = render("default") else {
        return;
    };
    let deployment = kind(&docs, "Deployment").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let sc = &pod["containers"][0]["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    let pdb = kind(&docs, "PodDisruptionBudget").expect("a PDB with two replicas");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
}

/// Every family Stratos registers, with each labelled family given one sample.
fn exported_families() -> BTreeSet<String> {
    let registry = prometheus::Registry::new();
    let cloud = CloudApiMetrics::new(&registry).unwrap();
    let pools = PoolMetrics::new(&registry).unwrap();
    cloud.observe_call(
        Operation::StartInstances,
        "success",
        Duration::from_millis(5),
    );
    cloud.observe_rate_limit_wait(Operation::StartInstances, Duration::ZERO);
    pools.set_pool("p", 10, 3, &[("standby", 3)]);
    pools.warmup_result("p", "completed", Some(Duration::from_secs(60)));
    pools.reconcile_error("nodepool", "kube");
    registry
        .gather()
        .iter()
        .map(|f| f.name().to_owned())
        .collect()
}

/// The `stratos_*` metric names an expression queries, without histogram suffixes.
fn queried(expr: &str, into: &mut BTreeSet<String>) {
    let re = regex::Regex::new(r"stratos_[a-z_]+").unwrap();
    for m in re.find_iter(expr) {
        let name = m.as_str();
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        into.insert(base.to_owned());
    }
}

#[test]
fn alerts_and_dashboard_query_only_exported_metrics() {
    let Some(docs) = render("all-options") else {
        return;
    };
    let exported = exported_families();
    let rule = kind(&docs, "PrometheusRule").expect("a PrometheusRule");
    let mut alert_metrics = BTreeSet::new();
    let mut alerts = Vec::new();
    for r in rule["spec"]["groups"][0]["rules"].as_array().unwrap() {
        alerts.push(r["alert"].as_str().unwrap().to_owned());
        queried(r["expr"].as_str().unwrap(), &mut alert_metrics);
    }
    for expected in [
        "StratosStandbyBelowMinimum",
        "StratosWarmupFailures",
        "StratosSlowScaleUp",
        "StratosCloudApiErrors",
        "StratosCloudApiThrottled",
        "StratosPoolAtCapacity",
    ] {
        assert!(alerts.iter().any(|a| a == expected), "{expected} missing");
    }
    let dashboard = kind(&docs, "ConfigMap").expect("the dashboard ConfigMap");
    let json: Value =
        serde_json::from_str(dashboard["data"]["stratos.json"].as_str().unwrap()).unwrap();
    let mut dashboard_metrics = BTreeSet::new();
    for panel in json["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            queried(t["expr"].as_str().unwrap(), &mut dashboard_metrics);
        }
    }
    queried(
        json["templating"]["list"][1]["definition"]
            .as_str()
            .unwrap(),
        &mut dashboard_metrics,
    );
    let unknown: Vec<_> = alert_metrics
        .iter()
        .chain(&dashboard_metrics)
        .filter(|m| !exported.contains(*m))
        .collect();
    assert!(unknown.is_empty(), "not exported by Stratos: {unknown:?}");
    // The dashboard shows every family.
    let missing: Vec<_> = exported
        .iter()
        .filter(|m| !dashboard_metrics.contains(*m))
        .collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
}

#[test]
fn the_iam_policy_covers_every_ec2_call_and_is_tag_conditioned() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{repo}/examples/iam/iam-policy.json")).unwrap();
    let policy: Value = serde_json::from_str(&text).unwrap();
    // The chart's README carries the same document.
    let readme = std::fs::read_to_string(format!("{CHART}/README.md")).unwrap();
    let block = readme
        .split("```json\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a json block in the chart README");
    assert_eq!(serde_json::from_str::<Value>(block).unwrap(), policy);
    let statements = policy["Statement"].as_array().unwrap();
    let actions = |s: &Value| -> Vec<String> {
        match &s["Action"] {
            Value::String(a) => vec![a.clone()],
            Value::Array(list) => list
                .iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect(),
            _ => vec![],
        }
    };
    for op in Operation::ALL {
        let action = format!("ec2:{}", op.as_str());
        assert!(
            statements.iter().any(|s| actions(s).contains(&action)),
            "{action} is not allowed"
        );
    }
    // Every action that changes an instance is conditioned on this cluster's tag.
    for s in statements {
        for a in actions(s) {
            let mutating = [
                "ec2:StartInstances",
                "ec2:StopInstances",
                "ec2:TerminateInstances",
            ];
            if mutating.contains(&a.as_str()) {
                assert_eq!(
                    s["Condition"]["StringEquals"]["ec2:ResourceTag/stratos.sh/cluster"],
                    "CLUSTER_NAME",
                    "{a}"
                );
            }
        }
        assert!(
            !actions(s).iter().any(|a| a.ends_with(":*")),
            "no wildcard actions"
        );
    }
}
