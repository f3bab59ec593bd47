//! Object storage with resourceVersions, watch history and the write semantics of
//! kube-apiserver (create, update, patch, delete, finalizers, status split, generation).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::Arc,
};

use serde_json::{Map, Value, json};

use super::{
    patch::{self, BuiltinLists, ListSemantics, SchemaLists},
    resources::ResourceDef,
};

const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";

/// kube-apiserver's answer to a pod update that changes more than it may.
const POD_UPDATE_FORBIDDEN: &str = "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)";

/// Pod spec immutability (ValidatePodUpdate): whether `new` changes only what may change.
fn pod_spec_update_allowed(old: &Value, new: &Value) -> bool {
    let (Some(old), Some(new)) = (old.get("spec"), new.get("spec")) else {
        return old.get("spec") == new.get("spec");
    };
    // Carry the mutable fields over from the new spec, then nothing else may differ.
    let mut old_masked = old.clone();
    for list in ["containers", "initContainers"] {
        let (Some(o), Some(n)) = (
            old_masked.get_mut(list).and_then(Value::as_array_mut),
            new.get(list).and_then(Value::as_array),
        ) else {
            continue;
        };
        if o.len() == n.len() {
            for (o, n) in o.iter_mut().zip(n) {
                if let (Some(o), Some(image)) = (o.as_object_mut(), n.get("image")) {
                    o.insert("image".into(), image.clone());
                }
            }
        }
    }
    let Some(masked) = old_masked.as_object_mut() else {
        return false;
    };
    match new.get("activeDeadlineSeconds") {
        Some(v) => masked.insert("activeDeadlineSeconds".into(), v.clone()),
        None => masked.remove("activeDeadlineSeconds"),
    };
    // Tolerations may only be added to.
    let old_tolerations = old.get("tolerations").and_then(Value::as_array);
    let new_tolerations = new.get("tolerations").and_then(Value::as_array);
    let only_added = old_tolerations
        .into_iter()
        .flatten()
        .all(|t| new_tolerations.is_some_and(|n| n.contains(t)));
    if only_added && let Some(n) = new.get("tolerations") {
        masked.insert("tolerations".into(), n.clone());
    }
    // Scheduling gates may only be removed.
    let old_gates = old.get("schedulingGates").and_then(Value::as_array);
    let new_gates = new.get("schedulingGates").and_then(Value::as_array);
    let only_removed = new_gates
        .into_iter()
        .flatten()
        .all(|g| old_gates.is_some_and(|o| o.contains(g)));
    if only_removed {
        match new.get("schedulingGates") {
            Some(v) => masked.insert("schedulingGates".into(), v.clone()),
            None => masked.remove("schedulingGates"),
        };
    }
    &old_masked == new
}

/// An API error, rendered as a `metav1.Status`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn not_found(def: &ResourceDef, name: &str) -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", def.qualified()),
        );
        e.details = Some(json!({"name": name, "group": def.group, "kind": def.plural}));
        e
    }

    pub fn conflict(def: &ResourceDef, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                def.qualified()
            ),
        );
        e.details = Some(json!({"name": name, "group": def.group, "kind": def.plural}));
        e
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn invalid(def: &ResourceDef, name: &str, causes: Vec<(String, String)>) -> Self {
        let summary: Vec<String> = causes.iter().map(|(f, m)| format!("{f}: {m}")).collect();
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {}", def.kind, summary.join(", ")),
        );
        e.details = Some(json!({
            "name": name, "group": def.group, "kind": def.kind,
            "causes": causes.iter().map(|(f, m)| json!({"reason": "FieldValueInvalid", "message": m, "field": f})).collect::<Vec<_>>(),
        }));
        e
    }

    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One stored change, as watches replay it.
#[derive(Debug)]
pub struct Change {
    pub resource: String,
    pub rv: u64,
    pub kind: ChangeKind,
    pub object: Value,
    /// The object before the change, so selector watches can turn a change that leaves the
    /// selection into DELETED (and one that enters it into ADDED), as the API server does.
    pub old: Option<Value>,
}

pub type Key = (String, String);

#[derive(Default)]
struct Collection {
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Change>>,
    /// Watches from a version below this get 410 Gone.
    compacted_below: u64,
    /// Server-side apply field ownership: (key, subresource) → manager → fields.
    managers: HashMap<(Key, String), BTreeMap<String, BTreeSet<String>>>,
}

pub struct Store {
    rv: u64,
    uid: u64,
    history_limit: usize,
    collections: HashMap<String, Collection>,
}

/// The storage key of an object: cluster-scoped kinds ignore the namespace.
fn key_of(def: &ResourceDef, ns: &str, name: &str) -> Key {
    (
        if def.namespaced {
            ns.to_owned()
        } else {
            String::new()
        },
        name.to_owned(),
    )
}

pub fn now_rfc3339() -> String {
    // Like metav1.Time: whole seconds, truncated.
    jiff::Timestamp::now()
        .round(
            jiff::TimestampRound::new()
                .smallest(jiff::Unit::Second)
                .mode(jiff::RoundMode::Trunc),
        )
        .map(|t| t.to_string())
        .unwrap_or_else(|_| jiff::Timestamp::now().to_string())
}

fn meta<'a>(obj: &'a Value, field: &str) -> Option<&'a Value> {
    obj.get("metadata").and_then(|m| m.get(field))
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj, field).and_then(Value::as_str)
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

fn finalizers(obj: &Value) -> Vec<String> {
    meta(obj, "finalizers")
        .and_then(Value::as_array)
        .map(|f| {
            f.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Everything but metadata and status: a change here bumps `metadata.generation`.
fn spec_part(obj: &Value) -> Value {
    let mut copy = obj.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
        map.remove("apiVersion");
        map.remove("kind");
    }
    copy
}

/// Two objects equal apart from the server-managed resourceVersion.
fn same_content(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        v
    };
    strip(a) == strip(b)
}

/// How a write treats the status subresource split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Main,
    Status,
    /// The pod binding subresource: the one write that may set `spec.nodeName`.
    Binding,
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        Self {
            rv: 1,
            uid: 0,
            history_limit,
            collections: HashMap::new(),
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn collection(&mut self, def: &ResourceDef) -> &mut Collection {
        self.collections.entry(def.qualified()).or_default()
    }

    pub fn get(&self, def: &ResourceDef, ns: &str, name: &str) -> Option<&Value> {
        self.collections
            .get(&def.qualified())?
            .objects
            .get(&(ns.to_owned(), name.to_owned()))
    }

    pub fn list(&self, def: &ResourceDef, ns: Option<&str>) -> Vec<&Value> {
        let Some(c) = self.collections.get(&def.qualified()) else {
            return vec![];
        };
        match ns {
            Some(ns) => c
                .objects
                .range((ns.to_owned(), String::new())..)
                .take_while(|((n, _), _)| n == ns)
                .map(|(_, v)| v)
                .collect(),
            None => c.objects.values().collect(),
        }
    }

    /// History after `rv` for a watch, or 410 when it has been compacted away.
    pub fn history_since(&self, def: &ResourceDef, rv: u64) -> Result<Vec<Arc<Change>>, ApiError> {
        let Some(c) = self.collections.get(&def.qualified()) else {
            return Ok(vec![]);
        };
        if rv < c.compacted_below {
            return Err(ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {rv} ({})", c.compacted_below),
            ));
        }
        Ok(c.history.iter().filter(|ch| ch.rv > rv).cloned().collect())
    }

    /// Forgets all history (as etcd compaction does): older watches get 410.
    pub fn compact(&mut self) {
        let rv = self.rv;
        for c in self.collections.values_mut() {
            c.history.clear();
            c.compacted_below = rv;
        }
    }

    fn record(
        &mut self,
        def: &ResourceDef,
        kind: ChangeKind,
        object: Value,
        old: Option<Value>,
    ) -> Arc<Change> {
        let limit = self.history_limit;
        let rv = self.rv;
        let change = Arc::new(Change {
            resource: def.qualified(),
            rv,
            kind,
            object,
            old,
        });
        let c = self.collection(def);
        c.history.push_back(change.clone());
        while c.history.len() > limit {
            if let Some(dropped) = c.history.pop_front() {
                c.compacted_below = dropped.rv;
            }
        }
        change
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn validate(def: &ResourceDef, obj: &Value) -> Result<Value, ApiError> {
        match &def.schema {
            None => Ok(obj.clone()),
            Some(schema) => schema.admit(obj).map_err(|errors| {
                let name = meta_str(obj, "name").unwrap_or_default().to_owned();
                ApiError::invalid(
                    def,
                    &name,
                    errors.into_iter().map(|e| (e.path, e.message)).collect(),
                )
            }),
        }
    }

    /// kube-apiserver's pod spec defaults (a part of them), applied on every write as the
    /// real server's decoding does.
    fn default_pod_spec(obj: &mut Value) {
        let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
            return;
        };
        spec.entry("restartPolicy").or_insert(json!("Always"));
        spec.entry("schedulerName")
            .or_insert(json!("default-scheduler"));
        spec.entry("terminationGracePeriodSeconds")
            .or_insert(json!(30));
        spec.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
        for list in ["initContainers", "containers"] {
            if let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) {
                for c in containers {
                    let latest = c.get("image").and_then(Value::as_str).is_some_and(|i| {
                        i.ends_with(":latest") || !i.rsplit('/').next().unwrap_or(i).contains(':')
                    });
                    if let Some(c) = c.as_object_mut() {
                        c.entry("imagePullPolicy").or_insert(json!(if latest {
                            "Always"
                        } else {
                            "IfNotPresent"
                        }));
                    }
                }
            }
        }
    }

    /// Built-in defaulting and admission the tests rely on (a tiny part of what kube-apiserver does).
    fn prepare_create(def: &ResourceDef, obj: &mut Value) {
        if def.group.is_empty() && def.kind == "Pod" {
            Self::default_pod_spec(obj);
            let spec = obj.get_mut("spec").and_then(Value::as_object_mut);
            if let Some(spec) = spec {
                // DefaultTolerationSeconds admission.
                let tolerations = spec.entry("tolerations").or_insert_with(|| json!([]));
                if let Some(list) = tolerations.as_array_mut() {
                    for key in [
                        "node.kubernetes.io/not-ready",
                        "node.kubernetes.io/unreachable",
                    ] {
                        if !list
                            .iter()
                            .any(|t| t.get("key").and_then(Value::as_str) == Some(key))
                        {
                            list.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
                        }
                    }
                }
            }
            obj["status"] = json!({"phase": "Pending"});
        } else if def.group.is_empty() && def.kind == "Node" {
            // TaintNodesByCondition admission: a new Node is not ready until the node
            // lifecycle controller sees it Ready.
            let spec = obj
                .as_object_mut()
                .map(|o| o.entry("spec").or_insert_with(|| json!({})));
            if let Some(spec) = spec.and_then(Value::as_object_mut) {
                let taints = spec.entry("taints").or_insert_with(|| json!([]));
                if taints.is_null() {
                    *taints = json!([]);
                }
                if let Some(list) = taints.as_array_mut()
                    && !list.iter().any(|t| {
                        t.get("key").and_then(Value::as_str) == Some(NOT_READY_TAINT)
                            && t.get("effect").and_then(Value::as_str) == Some("NoSchedule")
                    })
                {
                    list.push(json!({"key": NOT_READY_TAINT, "effect": "NoSchedule"}));
                }
            }
        } else if def.status_subresource && def.schema.is_some() {
            // Custom resources with a status subresource ignore status on create.
            if let Some(map) = obj.as_object_mut() {
                map.remove("status");
            }
        }
    }

    pub fn create(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        mut obj: Value,
    ) -> Result<(Value, Arc<Change>), ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        let api_version = def.api_version();
        match obj.get("kind").and_then(Value::as_str) {
            Some(k) if k != def.kind => {
                return Err(ApiError::bad_request(format!(
                    "the kind {k} does not match {}",
                    def.kind
                )));
            }
            _ => obj["kind"] = json!(def.kind),
        }
        match obj.get("apiVersion").and_then(Value::as_str) {
            Some(v) if v != api_version => {
                return Err(ApiError::bad_request(format!(
                    "the API version {v} does not match the expected API version {api_version}"
                )));
            }
            _ => obj["apiVersion"] = json!(api_version),
        }
        let uid = {
            self.uid += 1;
            format!("00000000-0000-4000-8000-{:012x}", self.uid)
        };
        let m = meta_mut(&mut obj);
        if m.get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            match m.get("generateName").and_then(Value::as_str) {
                Some(prefix) => {
                    let suffix = format!("{:05x}", fastrand_suffix(&uid));
                    m.insert("name".into(), json!(format!("{prefix}{suffix}")));
                }
                None => {
                    return Err(ApiError::invalid(
                        def,
                        "",
                        vec![(
                            "metadata.name".into(),
                            "Required value: name or generateName is required".into(),
                        )],
                    ));
                }
            }
        }
        if def.namespaced {
            match m.get("namespace").and_then(Value::as_str) {
                Some(n) if n != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {
                    m.insert("namespace".into(), json!(ns));
                }
            }
        } else {
            m.remove("namespace");
        }
        let name = m
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        m.insert("uid".into(), json!(uid));
        m.insert("creationTimestamp".into(), json!(now_rfc3339()));
        m.insert("generation".into(), json!(1));
        m.remove("deletionTimestamp");
        m.remove("resourceVersion");
        m.remove("managedFields");
        let key = (
            if def.namespaced {
                ns.to_owned()
            } else {
                String::new()
            },
            name.clone(),
        );
        if self.collection(def).objects.contains_key(&key) {
            let mut e = ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", def.qualified()),
            );
            e.details = Some(json!({"name": name, "group": def.group, "kind": def.plural}));
            return Err(e);
        }
        Self::prepare_create(def, &mut obj);
        let mut obj = Self::validate(def, &obj)?;
        let rv = self.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        self.collection(def).objects.insert(key, obj.clone());
        let change = self.record(def, ChangeKind::Added, obj.clone(), None);
        Ok((obj, change))
    }

    /// Replaces an object. `body` is the full new object (for `Target::Status`, only its
    /// status counts). `require_rv`: custom resources refuse unconditional updates.
    pub fn update(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        body: Value,
        target: Target,
        check_rv: bool,
    ) -> Result<(Value, Option<Arc<Change>>), ApiError> {
        let key = key_of(def, ns, name);
        let existing = self
            .collection(def)
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(def, name))?;
        if let Some(body_name) = meta_str(&body, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        match meta_str(&body, "resourceVersion") {
            Some(rv) if rv != meta_str(&existing, "resourceVersion").unwrap_or_default() => {
                return Err(ApiError::conflict(def, name));
            }
            None if check_rv && def.schema.is_some() => {
                return Err(ApiError::invalid(
                    def,
                    name,
                    vec![(
                        "metadata.resourceVersion".into(),
                        "Invalid value: 0: must be specified for an update".into(),
                    )],
                ));
            }
            _ => {}
        }
        let mut new = match target {
            Target::Status => {
                let mut new = existing.clone();
                match body.get("status") {
                    Some(status) => new["status"] = status.clone(),
                    None => {
                        if let Some(m) = new.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                new
            }
            Target::Main | Target::Binding => {
                let mut new = body;
                if !new.is_object() {
                    return Err(ApiError::bad_request("the body must be a JSON object"));
                }
                new["apiVersion"] = json!(def.api_version());
                new["kind"] = json!(def.kind);
                if def.status_subresource {
                    match existing.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            if let Some(m) = new.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
                let old_meta = existing.get("metadata").cloned().unwrap_or(json!({}));
                let m = meta_mut(&mut new);
                for field in [
                    "name",
                    "namespace",
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                ] {
                    match old_meta.get(field) {
                        Some(v) => m.insert(field.into(), v.clone()),
                        None => m.remove(field),
                    };
                }
                m.remove("managedFields");
                if old_meta.get("deletionTimestamp").is_some() {
                    let old_f: BTreeSet<String> = finalizers(&existing).into_iter().collect();
                    if finalizers(&new).iter().any(|f| !old_f.contains(f)) {
                        return Err(ApiError::invalid(def, name, vec![(
                            "metadata.finalizers".into(),
                            "Forbidden: no new finalizers can be added if the object is being deleted".into(),
                        )]));
                    }
                }
                new
            }
        };
        let is_pod = def.group.is_empty() && def.kind == "Pod";
        if is_pod && target != Target::Status {
            Self::default_pod_spec(&mut new);
        }
        if target == Target::Main && is_pod && !pod_spec_update_allowed(&existing, &new) {
            let mut e = ApiError::invalid(
                def,
                name,
                vec![("spec".into(), POD_UPDATE_FORBIDDEN.into())],
            );
            e.message = format!("Pod \"{name}\" is invalid: {POD_UPDATE_FORBIDDEN}");
            return Err(e);
        }
        if spec_part(&new) != spec_part(&existing) {
            let generation = meta(&existing, "generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            meta_mut(&mut new).insert("generation".into(), json!(generation + 1));
        }
        let mut new = Self::validate(def, &new)?;
        meta_mut(&mut new).insert(
            "resourceVersion".into(),
            existing["metadata"]["resourceVersion"].clone(),
        );
        if same_content(&new, &existing) {
            return Ok((existing, None));
        }
        // The last finalizer removed from an object being deleted: it goes.
        if meta(&new, "deletionTimestamp").is_some() && finalizers(&new).is_empty() {
            return self
                .remove(def, &key, new, Some(existing))
                .map(|(v, c)| (v, Some(c)));
        }
        let rv = self.next_rv();
        meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
        // A field that a write removed is no longer owned by anyone, as on the real server:
        // a later apply of it conflicts with nobody.
        for ((k, _), owners) in self.collection(def).managers.iter_mut() {
            if *k == key {
                for fields in owners.values_mut() {
                    fields.retain(|f| patch::field_value(&new, f).is_some());
                }
            }
        }
        self.collection(def).objects.insert(key, new.clone());
        let change = self.record(def, ChangeKind::Modified, new.clone(), Some(existing));
        Ok((new, Some(change)))
    }

    fn remove(
        &mut self,
        def: &ResourceDef,
        key: &Key,
        mut obj: Value,
        old: Option<Value>,
    ) -> Result<(Value, Arc<Change>), ApiError> {
        let rv = self.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        let c = self.collection(def);
        c.objects.remove(key);
        c.managers.retain(|(k, _), _| k != key);
        let change = self.record(def, ChangeKind::Deleted, obj.clone(), old);
        Ok((obj, change))
    }

    /// Delete with finalizers and pod graceful termination. `grace`: the request's
    /// gracePeriodSeconds, if any.
    pub fn delete(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        grace: Option<i64>,
        precondition_rv: Option<&str>,
    ) -> Result<(Value, Option<Arc<Change>>), ApiError> {
        let key = key_of(def, ns, name);
        let existing = self
            .collection(def)
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(def, name))?;
        if let Some(rv) = precondition_rv
            && Some(rv) != meta_str(&existing, "resourceVersion")
        {
            return Err(ApiError::conflict(def, name));
        }
        let is_pod = def.group.is_empty() && def.kind == "Pod";
        let phase = existing
            .pointer("/status/phase")
            .and_then(Value::as_str)
            .unwrap_or("");
        let bound = existing
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        let terminal = matches!(phase, "Succeeded" | "Failed");
        let pod_grace = grace.unwrap_or_else(|| {
            existing
                .pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(30)
        });
        // A running pod on a node terminates gracefully: the object stays with a
        // deletionTimestamp until the kubelet confirms with a grace-0 delete.
        let graceful = is_pod && bound && !terminal && pod_grace > 0;
        let deleting = meta(&existing, "deletionTimestamp").is_some();
        if graceful || !finalizers(&existing).is_empty() {
            if deleting {
                return Ok((existing, None));
            }
            let mut new = existing.clone();
            let rv = self.next_rv();
            let m = meta_mut(&mut new);
            m.insert("deletionTimestamp".into(), json!(now_rfc3339()));
            m.insert(
                "deletionGracePeriodSeconds".into(),
                json!(if graceful { pod_grace } else { 0 }),
            );
            m.insert("resourceVersion".into(), json!(rv.to_string()));
            self.collection(def).objects.insert(key, new.clone());
            let change = self.record(def, ChangeKind::Modified, new.clone(), Some(existing));
            return Ok((new, Some(change)));
        }
        self.remove(def, &key, existing.clone(), Some(existing))
            .map(|(v, c)| (v, Some(c)))
    }

    /// Server-side apply. Creates the object if it is absent.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        applied: Value,
        manager: &str,
        force: bool,
        target: Target,
    ) -> Result<(Value, Option<Arc<Change>>), ApiError> {
        if applied
            .get("apiVersion")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(ApiError::bad_request("apiVersion must be set"));
        }
        if applied
            .get("kind")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(ApiError::bad_request("kind must be set"));
        }
        if applied.get("apiVersion").and_then(Value::as_str) != Some(def.api_version().as_str()) {
            return Err(ApiError::bad_request(format!(
                "the API version in the data does not match the expected API version {}",
                def.api_version()
            )));
        }
        if let Some(n) = meta_str(&applied, "name")
            && n != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        let key = key_of(def, ns, name);
        let sub = match target {
            Target::Main | Target::Binding => "",
            Target::Status => "status",
        };
        // Only the fields this endpoint may change are part of the applied configuration.
        let applied = match target {
            Target::Status => {
                json!({"status": applied.get("status").cloned().unwrap_or(json!({}))})
            }
            Target::Main | Target::Binding => {
                let mut a = applied.clone();
                if def.status_subresource
                    && let Some(m) = a.as_object_mut()
                {
                    m.remove("status");
                }
                a
            }
        };
        let schema_lists;
        let builtin_lists = BuiltinLists;
        let lists: &dyn ListSemantics = match &def.raw_schema {
            Some(schema) => {
                schema_lists = SchemaLists(schema);
                &schema_lists
            }
            None => &builtin_lists,
        };
        let new_fields = patch::field_set(&applied, lists);
        let existing = self.collection(def).objects.get(&key).cloned();
        let mut base = existing.clone().unwrap_or_else(|| {
            json!({"apiVersion": def.api_version(), "kind": def.kind, "metadata": {"name": name}})
        });
        let owners = self
            .collection(def)
            .managers
            .get(&(key.clone(), sub.to_owned()))
            .cloned()
            .unwrap_or_default();
        if !force {
            let mut conflicts = Vec::new();
            for (other, fields) in owners.iter().filter(|(m, _)| m.as_str() != manager) {
                for f in fields.intersection(&new_fields) {
                    if patch::field_value(&base, f) != patch::field_value(&applied, f) {
                        conflicts.push(format!("conflict with \"{other}\": .{f}"));
                    }
                }
            }
            if !conflicts.is_empty() {
                let mut e = ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Apply failed with {} conflict(s): {}",
                        conflicts.len(),
                        conflicts.join(", ")
                    ),
                );
                e.details = Some(json!({"name": name, "group": def.group, "kind": def.plural}));
                return Err(e);
            }
        }
        let previous = owners.get(manager).cloned().unwrap_or_default();
        for field in previous.difference(&new_fields) {
            let owned_elsewhere = owners
                .iter()
                .any(|(m, f)| m != manager && f.contains(field));
            if !owned_elsewhere {
                patch::remove_field(&mut base, field);
            }
        }
        patch::apply_merge(&mut base, &applied, "", lists);
        let result = match (&existing, target) {
            (None, Target::Status) => return Err(ApiError::not_found(def, name)),
            (None, Target::Main | Target::Binding) => {
                let (obj, change) = self.create(def, ns, base)?;
                (obj, Some(change))
            }
            (Some(_), _) => {
                // Apply is not subject to optimistic concurrency unless the body asks.
                if let Some(m) = base.get_mut("metadata").and_then(Value::as_object_mut)
                    && meta_str(&applied, "resourceVersion").is_none()
                {
                    m.remove("resourceVersion");
                }
                self.update(def, ns, name, base, target, false)?
            }
        };
        let managers = self
            .collection(def)
            .managers
            .entry((key, sub.to_owned()))
            .or_default();
        if force {
            for (m, fields) in managers.iter_mut() {
                if m != manager {
                    fields.retain(|f| !new_fields.contains(f));
                }
            }
        }
        managers.insert(manager.to_owned(), new_fields);
        Ok(result)
    }
}

/// A short deterministic suffix for generateName, derived from the uid counter.
fn fastrand_suffix(uid: &str) -> u64 {
    uid.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    }) & 0xfffff
}
