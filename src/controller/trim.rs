//! What the caches keep of nodes and of pending pods' specs: what decisions read. The rest
//! (environment, volumes, probes, node info, addresses) is dropped as objects arrive.

use k8s_openapi::api::core::v1::{Container, Node, PodSpec, Volume};

/// Keeps the scheduling constraints of a pending pod's spec: selectors, affinity,
/// tolerations, overhead, its volume claims, and each container's image and resources.
pub fn pod_spec(spec: &mut PodSpec) {
    spec.containers.iter_mut().for_each(container);
    if let Some(init) = spec.init_containers.as_mut() {
        init.iter_mut().for_each(container);
    }
    spec.ephemeral_containers = None;
    // Only claims matter: a bound zonal volume pins the pod to its zone.
    spec.volumes = spec.volumes.take().map(|volumes| {
        volumes
            .into_iter()
            .filter(|v| v.persistent_volume_claim.is_some())
            .map(|v| Volume {
                name: v.name,
                persistent_volume_claim: v.persistent_volume_claim,
                ..Volume::default()
            })
            .collect()
    });
    spec.security_context = None;
    spec.host_aliases = None;
    spec.dns_config = None;
    spec.image_pull_secrets = None;
    spec.readiness_gates = None;
    spec.resource_claims = None;
    spec.scheduling_gates = None;
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
