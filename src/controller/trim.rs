//! What the caches keep of each object. A cluster's pods dominate the operator's memory, and
//! most of a pod (environment, volumes, probes, container statuses, annotations such as
//! `kubectl.kubernetes.io/last-applied-configuration`) is never read by Stratos: it is
//! dropped as objects arrive, before they are stored (SPEC §12: < 150 MiB with 50,000 pods).

use k8s_openapi::api::core::v1::{Container, Node, Pod};

/// Annotations of pods that decisions read.
const POD_ANNOTATIONS: &[&str] = &["kubernetes.io/config.mirror"];

/// Keeps what scheduling, warmup, drains and metrics read: identity, labels, owners,
/// deletion, the scheduling constraints, container images and resources, phase and
/// conditions.
pub fn pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    if let Some(annotations) = pod.metadata.annotations.as_mut() {
        annotations.retain(|k, _| POD_ANNOTATIONS.contains(&k.as_str()));
    }
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers.iter_mut().for_each(container);
        if let Some(init) = spec.init_containers.as_mut() {
            init.iter_mut().for_each(container);
        }
        spec.ephemeral_containers = None;
        spec.volumes = None;
        spec.security_context = None;
        spec.host_aliases = None;
        spec.dns_config = None;
        spec.image_pull_secrets = None;
        spec.readiness_gates = None;
        spec.resource_claims = None;
        spec.scheduling_gates = None;
    }
    if let Some(status) = pod.status.as_mut() {
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
        status.pod_ips = None;
        status.host_ips = None;
        status.resource_claim_statuses = None;
        status.message = None;
    }
}

/// A container's name, image, resources and restart policy (sidecars count differently
/// towards a pod's requests) are all that scheduling needs.
fn container(c: &mut Container) {
    *c = Container {
        name: std::mem::take(&mut c.name),
        image: c.image.take(),
        resources: c.resources.take(),
        restart_policy: c.restart_policy.take(),
        ..Container::default()
    };
}

/// Nodes keep labels, annotations, taints, provider id, capacity, conditions and image
/// names; the rest of their status (addresses, node info, attached volumes) is dropped.
pub fn node(node: &mut Node) {
    node.metadata.managed_fields = None;
    if let Some(status) = node.status.as_mut() {
        status.node_info = None;
        status.addresses = None;
        status.daemon_endpoints = None;
        status.volumes_attached = None;
        status.volumes_in_use = None;
        status.config = None;
        status.features = None;
        status.runtime_handlers = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_trimmed_pod_keeps_what_decisions_read() {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "x"},
                "annotations": {"kubernetes.io/config.mirror": "m", "kubectl.kubernetes.io/last-applied-configuration": "{…big…}"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "d", "uid": "u", "controller": true}]},
            "spec": {
                "nodeName": "n", "nodeSelector": {"pool": "a"}, "tolerations": [{"operator": "Exists"}],
                "overhead": {"cpu": "10m"},
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "k", "operator": "Exists"}]}]}}},
                "volumes": [{"name": "v", "emptyDir": {}}],
                "initContainers": [{"name": "i", "image": "init:1", "restartPolicy": "Always", "resources": {"requests": {"cpu": "1"}}, "command": ["sh"]}],
                "containers": [{"name": "c", "image": "app:1", "resources": {"requests": {"cpu": "500m"}},
                    "env": [{"name": "SECRET_URL", "value": "x"}], "volumeMounts": [{"name": "v", "mountPath": "/v"}]}]
            },
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "c", "image": "app:1", "imageID": "", "ready": true, "restartCount": 0}]}
        }))
        .unwrap();
        let before = crate::pool::scheduling::is_workload(&p);
        pod(&mut p);
        assert_eq!(crate::pool::scheduling::is_workload(&p), before);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v["metadata"]["annotations"],
            json!({"kubernetes.io/config.mirror": "m"})
        );
        assert_eq!(v["metadata"]["labels"], json!({"app": "x"}));
        assert_eq!(v["spec"]["nodeSelector"], json!({"pool": "a"}));
        assert!(v["spec"]["affinity"].is_object());
        assert_eq!(v["spec"]["overhead"], json!({"cpu": "10m"}));
        assert_eq!(
            v["spec"]["containers"],
            json!([{"name": "c", "image": "app:1", "resources": {"requests": {"cpu": "500m"}}}])
        );
        assert_eq!(v["spec"]["initContainers"][0]["restartPolicy"], "Always");
        assert!(v["spec"].get("volumes").is_none());
        assert!(v["status"].get("containerStatuses").is_none());
        assert_eq!(v["status"]["phase"], "Running");
        assert_eq!(v["status"]["conditions"][0]["type"], "Ready");
    }
}
