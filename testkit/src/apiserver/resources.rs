//! The kinds the embedded API server serves, and its discovery documents.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::schema::CrdSchema;

pub struct ResourceDef {
    /// "" for the core group.
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub status_subresource: bool,
    /// Strategic merge patch is only for built-in kinds; custom resources answer 415.
    pub strategic_merge: bool,
    pub short_names: Vec<String>,
    /// Field selectors beyond metadata.name / metadata.namespace.
    pub extra_fields: Vec<&'static str>,
    pub schema: Option<Arc<CrdSchema>>,
    pub raw_schema: Option<Value>,
    /// `additionalPrinterColumns` (name, type, jsonPath), for `kubectl get` tables.
    pub printer_columns: Vec<(String, String, String)>,
}

impl ResourceDef {
    fn builtin(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            namespaced,
            status_subresource: false,
            strategic_merge: true,
            short_names: vec![],
            extra_fields: vec![],
            schema: None,
            raw_schema: None,
            printer_columns: vec![],
        }
    }

    fn with_status(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    fn with_fields(mut self, fields: &[&'static str]) -> Self {
        self.extra_fields = fields.to_vec();
        self
    }

    fn with_short(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods`, or `nodepools.stratos.sh`, as error messages name resources.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn supported_fields(&self) -> Vec<&str> {
        let mut fields = vec!["metadata.name", "metadata.namespace"];
        fields.extend(self.extra_fields.iter().copied());
        fields
    }

    /// A custom resource from its CRD.
    pub fn from_crd(
        crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    ) -> Self {
        let version = crd
            .spec
            .versions
            .iter()
            .find(|v| v.storage)
            .expect("storage version");
        let schema = CrdSchema::from_crd(crd);
        Self {
            group: crd.spec.group.clone(),
            version: version.name.clone(),
            plural: crd.spec.names.plural.clone(),
            singular: crd.spec.names.singular.clone().unwrap_or_default(),
            kind: crd.spec.names.kind.clone(),
            namespaced: crd.spec.scope == "Namespaced",
            status_subresource: version
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some()),
            strategic_merge: false,
            short_names: crd.spec.names.short_names.clone().unwrap_or_default(),
            extra_fields: vec![],
            raw_schema: Some(schema.schema().clone()),
            schema: Some(Arc::new(schema)),
            printer_columns: version
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| (c.name.clone(), c.type_.clone(), c.json_path.clone()))
                .collect(),
        }
    }
}

/// The built-in kinds Stratos and its tests touch.
pub fn builtins() -> Vec<ResourceDef> {
    vec![
        ResourceDef::builtin("", "v1", "namespaces", "Namespace", false)
            .with_status()
            .with_fields(&["status.phase"])
            .with_short(&["ns"]),
        ResourceDef::builtin("", "v1", "nodes", "Node", false)
            .with_status()
            .with_fields(&["spec.unschedulable"])
            .with_short(&["no"]),
        ResourceDef::builtin("", "v1", "persistentvolumes", "PersistentVolume", false)
            .with_status()
            .with_short(&["pv"]),
        ResourceDef::builtin(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            true,
        )
        .with_status()
        .with_short(&["pvc"]),
        ResourceDef::builtin("", "v1", "pods", "Pod", true)
            .with_status()
            .with_fields(&[
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ])
            .with_short(&["po"]),
        ResourceDef::builtin("", "v1", "events", "Event", true)
            .with_fields(&[
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ])
            .with_short(&["ev"]),
        ResourceDef::builtin("events.k8s.io", "v1", "events", "Event", true).with_short(&["ev"]),
        ResourceDef::builtin("coordination.k8s.io", "v1", "leases", "Lease", true),
        ResourceDef::builtin("apps", "v1", "daemonsets", "DaemonSet", true)
            .with_status()
            .with_short(&["ds"]),
        ResourceDef::builtin(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
        )
        .with_status()
        .with_short(&["pdb"]),
    ]
}

/// `/api` and `/apis`, `/api/v1` and `/apis/<group>/<version>`.
pub fn discovery(defs: &[Arc<ResourceDef>], path: &str) -> Option<Value> {
    let resource_list = |group: &str, version: &str| -> Value {
        let mut resources = Vec::new();
        for d in defs
            .iter()
            .filter(|d| d.group == group && d.version == version)
        {
            resources.push(json!({
                "name": d.plural, "singularName": d.singular, "namespaced": d.namespaced,
                "kind": d.kind, "shortNames": d.short_names,
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            }));
            if d.status_subresource {
                resources.push(json!({"name": format!("{}/status", d.plural), "singularName": "", "namespaced": d.namespaced, "kind": d.kind, "verbs": ["get", "patch", "update"]}));
            }
            if d.kind == "Pod" && d.group.is_empty() {
                resources.push(json!({"name": "pods/eviction", "singularName": "", "namespaced": true, "group": "policy", "version": "v1", "kind": "Eviction", "verbs": ["create"]}));
                resources.push(json!({"name": "pods/binding", "singularName": "", "namespaced": true, "kind": "Binding", "verbs": ["create"]}));
            }
        }
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") }, "resources": resources})
    };
    match path.trim_end_matches('/') {
        "/api" => Some(
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        ),
        "/api/v1" => Some(resource_list("", "v1")),
        "/apis" => {
            let mut groups: Vec<(String, String)> = defs
                .iter()
                .filter(|d| !d.group.is_empty())
                .map(|d| (d.group.clone(), d.version.clone()))
                .collect();
            groups.sort();
            groups.dedup();
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|(g, v)| {
                    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
                    json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        p => {
            let rest = p.strip_prefix("/apis/")?;
            let (group, version) = rest.split_once('/')?;
            if version.contains('/')
                || !defs
                    .iter()
                    .any(|d| d.group == group && d.version == version)
            {
                return None;
            }
            Some(resource_list(group, version))
        }
    }
}

/// Evaluates the JSONPath subset printer columns use: `.a.b.c`, and a filter
/// `.a[?(@.k=="v")].b` on a list.
pub fn json_path(obj: &Value, path: &str) -> Option<Value> {
    let mut node = obj.clone();
    let mut rest = path.trim_start_matches('.');
    while !rest.is_empty() {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let (field, tail) = rest.split_at(end);
        if !field.is_empty() {
            node = node.get(field)?.clone();
        }
        rest = tail;
        if let Some(filter) = rest.strip_prefix("[?(@.") {
            let close = filter.find(")]")?;
            let (cond, tail) = filter.split_at(close);
            let (key, want) = cond.split_once("==")?;
            let want = want.trim().trim_matches('"').trim_matches('\'');
            node = node
                .as_array()?
                .iter()
                .find(|i| i.get(key.trim()).and_then(Value::as_str) == Some(want))?
                .clone();
            rest = &tail[2..];
        }
        rest = rest.trim_start_matches('.');
    }
    Some(node)
}

/// How kubectl shows an age: `45s`, `12m`, `3h`, `5d`.
pub fn human_age(timestamp: &str) -> String {
    let Ok(then) = timestamp.parse::<jiff::Timestamp>() else {
        return "<unknown>".into();
    };
    let secs = (jiff::Timestamp::now().as_second() - then.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 * 3 => format!("{}m", s / 60),
        s if s < 86400 * 2 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// A `meta.k8s.io/v1` Table, as `kubectl get` asks for it.
pub fn table(def: &ResourceDef, objects: &[&Value], resource_version: u64) -> Value {
    let mut columns = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}),
    ];
    let printer: Vec<(String, String, String)> = if def.printer_columns.is_empty() {
        vec![(
            "Age".into(),
            "date".into(),
            ".metadata.creationTimestamp".into(),
        )]
    } else {
        def.printer_columns.clone()
    };
    for (name, type_, _) in &printer {
        let type_ = if type_ == "date" {
            "string"
        } else {
            type_.as_str()
        };
        columns.push(
            json!({"name": name, "type": type_, "format": "", "description": name, "priority": 0}),
        );
    }
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = vec![o.pointer("/metadata/name").cloned().unwrap_or(Value::Null)];
            for (_, type_, path) in &printer {
                let v = json_path(o, path);
                cells.push(match (type_.as_str(), v) {
                    ("date", Some(Value::String(t))) => Value::String(human_age(&t)),
                    (_, Some(v)) => v,
                    (_, None) => Value::Null,
                });
            }
            json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o.get("metadata").cloned().unwrap_or(json!({}))}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version.to_string()}, "columnDefinitions": columns, "rows": rows})
}
