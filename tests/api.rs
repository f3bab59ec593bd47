//! The API contract (SPEC §3): committed CRDs equal the generated ones, the CRDs carry the
//! schema features the spec asks for, every example is admitted exactly as an API server
//! would admit it, and every invalid fixture is rejected with a message naming its field.

use std::{
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;
use stratos::api::{self, AWSNodeClass, NodePool};
use testkit::schema::CrdSchema;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `STRATOS_UPDATE_CRDS=1 cargo test --test api` rewrites the committed copies.
#[test]
fn committed_crds_equal_generated_output() {
    let update = std::env::var_os("STRATOS_UPDATE_CRDS").is_some();
    let mut stale = Vec::new();
    for dir in ["crds", "charts/stratos/crds"] {
        let dir = repo().join(dir);
        for crd in api::crds() {
            let path = dir.join(api::crd_file_name(&crd));
            let generated = api::crd_yaml(&crd);
            if update {
                fs::create_dir_all(&dir).unwrap();
                fs::write(&path, &generated).unwrap();
                continue;
            }
            match fs::read_to_string(&path) {
                Ok(committed) if committed == generated => {}
                _ => stale.push(path.display().to_string()),
            }
        }
        // Nothing else may sit there: a stale CRD for a removed kind would still be installed.
        let expected: Vec<String> = api::crds().iter().map(api::crd_file_name).collect();
        for entry in fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                expected.contains(&name),
                "unexpected file {name} in {}",
                dir.display()
            );
        }
    }
    assert!(
        stale.is_empty(),
        "these CRD files differ from `stratos crds`: {stale:?}\n\
         regenerate them with: STRATOS_UPDATE_CRDS=1 cargo test --test api committed_crds"
    );
}

#[test]
fn crds_command_output_is_the_committed_files_concatenated() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stratos"))
        .arg("crds")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let committed: Vec<String> = api::crds()
        .iter()
        .map(|c| fs::read_to_string(repo().join("crds").join(api::crd_file_name(c))).unwrap())
        .collect();
    assert_eq!(printed, committed.join("---\n"));
}

fn crd_json(crd: &CustomResourceDefinition) -> Value {
    serde_json::to_value(crd).unwrap()
}

#[test]
fn crds_are_cluster_scoped_with_status_short_names_and_columns() {
    let cases = [
        (
            api::crds()[0].clone(),
            "AWSNodeClass",
            "awsnc",
            vec!["INSTANCETYPE", "AMI", "READY", "AGE"],
        ),
        (
            api::crds()[1].clone(),
            "NodePool",
            "np",
            vec![
                "POOLSIZE",
                "MINSTANDBY",
                "STANDBY",
                "RUNNING",
                "WARMUP",
                "READY",
                "AGE",
            ],
        ),
    ];
    for (crd, kind, short, columns) in cases {
        let j = crd_json(&crd);
        assert_eq!(j["spec"]["names"]["kind"], kind);
        assert_eq!(j["spec"]["group"], "stratos.sh");
        assert_eq!(j["spec"]["scope"], "Cluster", "{kind}");
        assert_eq!(
            j["spec"]["names"]["shortNames"],
            serde_json::json!([short]),
            "{kind}"
        );
        let version = &j["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["served"].as_bool().unwrap() && version["storage"].as_bool().unwrap());
        assert!(
            version["subresources"]["status"].is_object(),
            "{kind} needs a status subresource"
        );
        let names: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, columns, "{kind} printer columns");
    }
}

/// Every `x-kubernetes-validations` rule in a schema, with the schema node it sits on.
fn cel_rules(schema: &Value, path: &str, out: &mut Vec<(String, String, Value)>) {
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for r in rules {
            out.push((
                path.to_owned(),
                r["rule"].as_str().unwrap().to_owned(),
                schema.clone(),
            ));
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            cel_rules(v, &format!("{path}.{k}"), out);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = schema.get(key).filter(|c| c.is_object()) {
            cel_rules(child, &format!("{path}[]"), out);
        }
    }
}

#[test]
fn cel_rules_are_present_compile_and_fit_the_cost_budget() {
    let mut all = Vec::new();
    for crd in api::crds() {
        let schema = CrdSchema::from_crd(&crd);
        cel_rules(schema.schema(), "", &mut all);
    }
    let rules: Vec<&str> = all.iter().map(|(_, r, _)| r.as_str()).collect();
    for expected in [
        "self.minStandby <= self.poolSize",
        "self.kind == 'AWSNodeClass'",
        "self.all(k, !k.startsWith('stratos.sh/'))",
    ] {
        assert!(
            rules.contains(&expected),
            "missing CEL rule {expected:?} in {rules:?}"
        );
    }
    for (path, rule, node) in &all {
        let compiled = kube_cel::compile_schema(node);
        assert!(
            compiled.compilation_errors().is_empty(),
            "rule at {path} does not compile: {:?}",
            compiled.compilation_errors()
        );
        let warnings: Vec<_> = kube_cel::estimate_rule_cost(rule, &compiled)
            .into_iter()
            .filter(|w| matches!(w.kind, kube_cel::WarningKind::CostExceeded))
            .collect();
        assert!(warnings.is_empty(), "rule {rule:?} at {path}: {warnings:?}");
    }
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn schema_for(kind: &str) -> CrdSchema {
    let crd = api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for kind {kind}"));
    CrdSchema::from_crd(&crd)
}

/// The schema's defaults and the Rust types' serde defaults must agree, or the controller
/// would act on values the API server never stored.
fn assert_typed_round_trip<K>(original: &Value, admitted: &Value, what: &str)
where
    K: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let from_original: K = serde_json::from_value(original.clone())
        .unwrap_or_else(|e| panic!("{what}: does not parse into the Rust type: {e}"));
    let from_admitted: K = serde_json::from_value(admitted.clone()).unwrap();
    assert_eq!(
        from_original, from_admitted,
        "{what}: schema defaults differ from serde defaults"
    );
    let reserialised = serde_json::to_value(&from_original).unwrap();
    assert_eq!(
        &reserialised, admitted,
        "{what}: the Rust type does not reproduce the stored object"
    );
}

#[test]
fn every_example_is_admitted_and_parses_into_the_rust_types() {
    let files = yaml_files(&repo().join("examples"));
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "quickstart.yaml",
        "ci-runners.yaml",
        "llm-inference.yaml",
        "scale-to-zero.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "examples/{expected} is missing"
        );
    }
    let mut admitted_count = 0;
    for file in &files {
        for (i, doc) in yaml_docs(file).into_iter().enumerate() {
            let kind = doc["kind"].as_str().unwrap_or_default();
            if !["NodePool", "AWSNodeClass"].contains(&kind) {
                continue;
            }
            let what = format!("{} document {i} ({kind})", file.display());
            let admitted = schema_for(kind)
                .admit(&doc)
                .unwrap_or_else(|errs| panic!("{what} rejected: {errs:#?}"));
            match kind {
                "NodePool" => assert_typed_round_trip::<NodePool>(&doc, &admitted, &what),
                _ => assert_typed_round_trip::<AWSNodeClass>(&doc, &admitted, &what),
            }
            admitted_count += 1;
        }
    }
    assert!(
        admitted_count >= 8,
        "expected a class and a pool per example, admitted {admitted_count}"
    );
}

#[test]
fn defaults_are_applied_as_the_spec_says() {
    let docs = yaml_docs(&repo().join("examples/quickstart.yaml"));
    let pool = docs.iter().find(|d| d["kind"] == "NodePool").unwrap();
    let stored = schema_for("NodePool").admit(pool).unwrap();
    let spec = &stored["spec"];
    assert_eq!(spec["preWarm"]["timeout"], "15m");
    assert_eq!(spec["preWarm"]["timeoutAction"], "terminate");
    assert_eq!(spec["scaleDown"]["enabled"], true);
    assert_eq!(spec["scaleDown"]["emptyNodeTTL"], "5m");
    assert_eq!(spec["scaleDown"]["drainTimeout"], "5m");
    assert_eq!(spec["template"]["startupTaintRemoval"], "WhenNetworkReady");

    let class = docs.iter().find(|d| d["kind"] == "AWSNodeClass").unwrap();
    let stored = schema_for("AWSNodeClass").admit(class).unwrap();
    let meta = &stored["spec"]["metadataOptions"];
    assert_eq!(meta["httpTokens"], "required", "IMDSv2 by default");
    assert_eq!(meta["httpPutResponseHopLimit"], 2);
    assert_eq!(meta["httpEndpoint"], "enabled");

    let typed: NodePool = serde_json::from_value(pool.clone()).unwrap();
    assert_eq!(typed.spec.pre_warm.timeout.as_std().as_secs(), 900);
    assert_eq!(typed.spec.scale_down.empty_node_ttl.to_string(), "5m");
}

#[test]
fn every_invalid_fixture_is_rejected_naming_its_field() {
    let files = yaml_files(&repo().join("tests/fixtures/invalid"));
    assert!(
        files.len() >= 10,
        "expected the invalid fixtures, found {}",
        files.len()
    );
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        let field = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an '# expect: <field>' line", file.display()))
            .trim()
            .to_owned();
        for doc in yaml_docs(&file) {
            let kind = doc["kind"].as_str().unwrap();
            let errors = match schema_for(kind).admit(&doc) {
                Ok(_) => panic!("{} was admitted but must be rejected", file.display()),
                Err(errors) => errors,
            };
            let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
            println!(
                "{}: {}",
                file.file_name().unwrap().to_string_lossy(),
                rendered.join("; ")
            );
            assert!(
                rendered
                    .iter()
                    .any(|e| e.starts_with(&field) || e.contains(&format!("\"{field}"))),
                "{}: no error names {field}: {rendered:#?}",
                file.display()
            );
        }
    }
}

#[test]
fn user_data_above_16_kib_is_rejected() {
    let docs = yaml_docs(&repo().join("examples/quickstart.yaml"));
    let mut class = docs
        .into_iter()
        .find(|d| d["kind"] == "AWSNodeClass")
        .unwrap();
    class["spec"]["userData"] = Value::String("x".repeat(16 * 1024));
    assert!(
        schema_for("AWSNodeClass").admit(&class).is_ok(),
        "exactly 16 KiB is allowed"
    );
    class["spec"]["userData"] = Value::String("x".repeat(16 * 1024 + 1));
    let errors = schema_for("AWSNodeClass").admit(&class).unwrap_err();
    assert!(
        errors.iter().any(|e| e.path == "spec.userData"),
        "{errors:?}"
    );
}
