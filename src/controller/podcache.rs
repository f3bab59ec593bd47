//! The pod cache. A cluster's pods dominate the operator's memory, and k8s-openapi's `Pod`
//! is large even when empty (about 2 KiB inline, plus 2 KiB per container), so pods are
//! cached as [`CachedPod`]: what decisions read, computed once as the pod arrives. A bound
//! pod costs well under 1 KiB (SPEC §12: < 150 MiB with 50,000 pods).

use std::{
    borrow::Cow,
    collections::HashMap,
    hash::{BuildHasher, Hash},
    sync::{Arc, LazyLock, Mutex, Weak},
    time::SystemTime,
};

use std::collections::BTreeMap;

use k8s_openapi::{
    NamespaceResourceScope,
    api::core::v1::{Pod, PodAffinityTerm, PodSpec},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::Resource;

use crate::pool::{
    placement,
    pods::{is_pending_unschedulable, pod_requests},
    quantity::Resources,
};

/// A pod as the controllers see it.
#[derive(Debug, Clone, Default)]
pub struct CachedPod {
    /// Name, namespace, uid, resource version and deletion only.
    pub metadata: ObjectMeta,
    /// The uid of the DaemonSet that controls it.
    pub daemonset: Option<String>,
    /// A static pod's mirror.
    pub mirror: bool,
    pub node_name: Option<String>,
    pub phase: Option<String>,
    /// `Ready=True`.
    pub ready: bool,
    /// Unbound, `Pending`, `PodScheduled=False, reason=Unschedulable`, not being deleted.
    pub unschedulable: bool,
    /// When it became unschedulable (or was created).
    pub pending_since: Option<SystemTime>,
    /// Its labels: other pods' affinity and spread constraints select by them. Shared
    /// between the pods that carry the same set (a workload's replicas), see [`LabelSets`].
    pub labels: Arc<BTreeMap<String, String>>,
    /// The scheduler's view of its requests (SPEC §6); `None` when one is not a valid
    /// quantity.
    pub requests: Option<Resources>,
    /// Its required anti-affinity terms (they keep other pods off its node or zone).
    pub anti_affinity: Vec<PodAffinityTerm>,
    /// Its host ports, `(protocol, port)`.
    pub host_ports: Vec<(String, i32)>,
    /// Images of its containers and init containers.
    pub images: Vec<String>,
    /// The scheduling constraints, kept only while the pod is unschedulable: a bound pod
    /// needs none of it.
    pub scheduling: Option<Box<PodSpec>>,
}

/// One copy of each label set in use. A workload's replicas carry identical labels, and a
/// cluster's 50,000 pods hold a few hundred distinct sets; sharing them saves a map and its
/// strings per pod. Entries go when their last pod does (weak references, swept as the
/// table grows), so sets that churn (a Job's per-run labels) do not accumulate.
pub struct LabelSets {
    table: Mutex<LabelTable>,
}

#[derive(Default)]
struct LabelTable {
    by_hash: HashMap<u64, Vec<Weak<BTreeMap<String, String>>>>,
    /// Entries added since the last sweep, and live entries at that sweep.
    added: usize,
    live: usize,
}

static LABEL_SETS: LazyLock<LabelSets> = LazyLock::new(|| LabelSets {
    table: Mutex::new(LabelTable::default()),
});

impl LabelSets {
    /// The shared copy of `labels`.
    pub fn share(&self, labels: BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
        if labels.is_empty() {
            return Arc::new(labels);
        }
        let key = stable_hash(&labels);
        let mut t = self.table.lock().expect("label sets lock");
        let bucket = t.by_hash.entry(key).or_default();
        if let Some(found) = bucket
            .iter()
            .filter_map(Weak::upgrade)
            .find(|l| **l == labels)
        {
            return found;
        }
        bucket.retain(|w| w.strong_count() > 0);
        let shared = Arc::new(labels);
        bucket.push(Arc::downgrade(&shared));
        t.added += 1;
        if t.added > t.live.max(1024) {
            t.by_hash.retain(|_, b| {
                b.retain(|w| w.strong_count() > 0);
                !b.is_empty()
            });
            t.live = t.by_hash.values().map(Vec::len).sum();
            t.added = 0;
        }
        shared
    }

    #[cfg(test)]
    fn entries(&self) -> usize {
        let t = self.table.lock().expect("label sets lock");
        t.by_hash.values().map(Vec::len).sum()
    }
}

fn stable_hash(labels: &BTreeMap<String, String>) -> u64 {
    static STATE: LazyLock<std::hash::RandomState> = LazyLock::new(Default::default);
    let mut h = STATE.build_hasher();
    labels.hash(&mut h);
    std::hash::Hasher::finish(&h)
}

impl CachedPod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// A pod a drain must evict: not owned by a DaemonSet, not a mirror pod, not finished,
    /// and not already being deleted.
    pub fn is_workload(&self) -> bool {
        self.daemonset.is_none()
            && !self.mirror
            && !self.finished()
            && self.metadata.deletion_timestamp.is_none()
    }

    /// Evicted or deleted, and still running: not a DaemonSet or mirror pod, not finished.
    pub fn is_terminating(&self) -> bool {
        self.daemonset.is_none()
            && !self.mirror
            && !self.finished()
            && self.metadata.deletion_timestamp.is_some()
    }

    pub fn finished(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

impl From<Pod> for CachedPod {
    fn from(pod: Pod) -> Self {
        let unschedulable = is_pending_unschedulable(&pod);
        let requests = pod.spec.as_ref().and_then(|s| pod_requests(s).ok());
        let (anti_affinity, host_ports) = pod
            .spec
            .as_ref()
            .map(|s| (placement::anti_affinity_terms(s), placement::host_ports(s)))
            .unwrap_or_default();
        let status = pod.status.unwrap_or_default();
        let conditions = status.conditions.unwrap_or_default();
        let ready = conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let mut meta = pod.metadata;
        let labels = LABEL_SETS.share(meta.labels.take().unwrap_or_default());
        let pending_since = conditions
            .iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            .and_then(|c| c.last_transition_time.as_ref())
            .or(meta.creation_timestamp.as_ref())
            .map(|t| SystemTime::from(t.0));
        let daemonset = meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == "DaemonSet" && o.controller == Some(true))
            .map(|o| o.uid.clone());
        let mirror = meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
        // Only what identifies the pod (for lookups, evictions and events) and its deletion.
        let metadata = ObjectMeta {
            name: meta.name,
            namespace: meta.namespace,
            uid: meta.uid,
            resource_version: meta.resource_version,
            deletion_timestamp: meta.deletion_timestamp,
            ..ObjectMeta::default()
        };
        let mut spec = pod.spec.unwrap_or_default();
        let images = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .filter_map(|c| c.image.clone())
            .collect();
        let node_name = spec.node_name.take().filter(|n| !n.is_empty());
        let scheduling = unschedulable.then(|| {
            super::trim::pod_spec(&mut spec);
            Box::new(spec)
        });
        CachedPod {
            metadata,
            daemonset,
            mirror,
            node_name,
            phase: status.phase,
            ready,
            unschedulable,
            pending_since,
            labels,
            requests,
            anti_affinity,
            host_ports,
            images,
            scheduling,
        }
    }
}

impl Resource for CachedPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> CachedPod {
        CachedPod::from(serde_json::from_value::<Pod>(v).unwrap())
    }

    #[test]
    fn replicas_share_one_label_set_and_gone_sets_are_dropped() {
        let sets = LabelSets {
            table: Mutex::new(LabelTable::default()),
        };
        let labels = |app: &str| {
            BTreeMap::from([
                ("app".to_owned(), app.to_owned()),
                ("pod-template-hash".to_owned(), "5d8f9c7b6".to_owned()),
            ])
        };
        let a = sets.share(labels("web"));
        let b = sets.share(labels("web"));
        assert!(Arc::ptr_eq(&a, &b), "one copy for the replicas");
        let c = sets.share(labels("db"));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(sets.entries(), 2);
        drop((a, b));
        // Churn: thousands of short-lived sets (a Job's per-run labels) are swept.
        for i in 0..5000 {
            drop(sets.share(labels(&format!("job-{i}"))));
        }
        assert!(sets.entries() < 2000, "{} entries kept", sets.entries());
        assert_eq!(*sets.share(labels("db")), labels("db"));
        assert!(
            Arc::ptr_eq(&c, &sets.share(labels("db"))),
            "live sets stay shared"
        );
    }

    #[test]
    fn a_bound_pod_keeps_requests_and_identity_but_no_spec() {
        let p = pod(json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "x"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{…}"}},
            "spec": {"nodeName": "n", "overhead": {"cpu": "10m"},
                "initContainers": [{"name": "i", "image": "init:1", "resources": {"requests": {"cpu": "1"}}}],
                "containers": [{"name": "c", "image": "app:1", "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        }));
        assert_eq!(p.key(), "ns/p");
        assert_eq!(p.node_name.as_deref(), Some("n"));
        assert!(p.ready && p.is_workload() && !p.unschedulable);
        assert!(p.scheduling.is_none());
        assert!(p.metadata.annotations.is_none() && p.metadata.labels.is_none());
        assert_eq!(p.labels["app"], "x", "kept apart from the metadata");
        assert_eq!(p.images, vec!["init:1", "app:1"]);
        // max(init 1, containers 0.5) + overhead 0.01
        let requests = p.requests.as_ref().unwrap();
        assert_eq!(requests["cpu"], 1010);
        assert_eq!(requests["pods"], 1000);
    }

    #[test]
    fn an_unschedulable_pod_keeps_its_constraints() {
        let p = pod(json!({
            "metadata": {"name": "p", "namespace": "ns", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeSelector": {"pool": "a"}, "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "c", "image": "app:1", "env": [{"name": "X", "value": "y"}]}]},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "lastTransitionTime": "2026-01-01T00:00:05Z"}]}
        }));
        assert!(p.unschedulable);
        let spec = p.scheduling.as_ref().unwrap();
        assert_eq!(spec.node_selector.as_ref().unwrap()["pool"], "a");
        assert!(spec.containers[0].env.is_none(), "trimmed");
        assert_eq!(
            p.pending_since.unwrap(),
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_767_225_605)
        );
    }

    #[test]
    fn daemonset_mirror_and_finished_pods_are_not_workload() {
        let ds = pod(
            json!({"metadata": {"name": "d", "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "x", "uid": "u", "controller": true}]}}),
        );
        let mirror = pod(
            json!({"metadata": {"name": "m", "annotations": {"kubernetes.io/config.mirror": "h"}}}),
        );
        let done = pod(json!({"metadata": {"name": "j"}, "status": {"phase": "Succeeded"}}));
        assert!(!ds.is_workload() && !mirror.is_workload() && !done.is_workload());
    }
}
