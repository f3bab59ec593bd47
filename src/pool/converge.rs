//! What a member node of a pool should look like in its state (SPEC §4, §5.4): its labels,
//! the startup taints coming off once the node is ready per `startupTaintRemoval`, and the
//! cordon of a warming node. Pure: the controller writes the change this returns.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Taint;

use super::{scheduling::startup_taints_removable, state::NodeState, taints::without_startup};
use crate::{
    api::nodepool::StartupTaintRemoval,
    contract::{POOL_LABEL, STATE_LABEL},
};

/// The pool's template, as convergence needs it.
pub struct Template<'a> {
    pub pool: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub startup_taints: &'a [Taint],
    pub startup_taint_removal: StartupTaintRemoval,
}

/// The node as it is.
pub struct NodeNow<'a> {
    pub labels: &'a BTreeMap<String, String>,
    pub taints: &'a [Taint],
    pub unschedulable: bool,
    pub ready: bool,
    pub network_ready: bool,
}

/// The change to write.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeChange {
    /// Labels to set (template, pool, state).
    pub labels: BTreeMap<String, String>,
    /// The whole taint list, when the startup taints come off.
    pub taints: Option<Vec<Taint>>,
    pub cordon: bool,
    /// `starting` → `running`: the node just became usable (start → Ready is measured).
    pub promoted: bool,
}

/// The labels of a pool's node in `state`.
pub fn desired_labels(template: &Template<'_>, state: NodeState) -> BTreeMap<String, String> {
    let mut labels = template.labels.clone();
    labels.insert(POOL_LABEL.into(), template.pool.into());
    labels.insert(STATE_LABEL.into(), state.as_str().into());
    labels
}

/// The change that brings a `warmup`, `starting` or `running` node where it should be, or
/// `None` when it already is.
pub fn converge(
    template: &Template<'_>,
    state: NodeState,
    node: &NodeNow<'_>,
) -> Option<NodeChange> {
    let labels = desired_labels(template, state);
    let labels_ok = labels.iter().all(|(k, v)| node.labels.get(k) == Some(v));
    let startup_on = node
        .taints
        .iter()
        .any(|t| template.startup_taints.iter().any(|s| s.key == t.key));
    let taints = (startup_on
        && startup_taints_removable(
            template.startup_taint_removal,
            node.ready,
            node.network_ready,
        ))
    .then(|| without_startup(node.taints, template.startup_taints));
    // A warming node is cordoned: DaemonSet pods (which tolerate cordons) warm it up, but no
    // workload lands on a node that is about to be stopped.
    let cordon = state == NodeState::Warmup && !node.unschedulable;
    if labels_ok && taints.is_none() && !cordon {
        return None;
    }
    let promoted = state == NodeState::Running
        && node.labels.get(STATE_LABEL).map(String::as_str) == Some(NodeState::Starting.as_str());
    Some(NodeChange {
        labels,
        taints,
        cordon,
        promoted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_converge_per_state() {
        let template_labels = BTreeMap::from([("team".to_owned(), "ci".to_owned())]);
        let startup = [Taint {
            key: "node.eks.amazonaws.com/not-ready".into(),
            value: Some("true".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        }];
        let template = |removal| Template {
            pool: "ci",
            labels: &template_labels,
            startup_taints: &startup,
            startup_taint_removal: removal,
        };
        let starting_labels = desired_labels(
            &template(StartupTaintRemoval::WhenNetworkReady),
            NodeState::Starting,
        );
        let running_labels = desired_labels(
            &template(StartupTaintRemoval::WhenNetworkReady),
            NodeState::Running,
        );
        let bare = BTreeMap::new();
        let node = |labels, taints, unschedulable, ready, network_ready| NodeNow {
            labels,
            taints,
            unschedulable,
            ready,
            network_ready,
        };
        use StartupTaintRemoval::*;
        // (what, removal policy, state, node, Some((taints change, cordon, promoted)))
        type Case<'a> = (
            &'a str,
            StartupTaintRemoval,
            NodeState,
            NodeNow<'a>,
            Option<(bool, bool, bool)>,
        );
        let cases: Vec<Case> = vec![
            (
                "a new warming node: labels and cordon",
                WhenNetworkReady,
                NodeState::Warmup,
                node(&bare, &startup, false, false, false),
                Some((false, true, false)),
            ),
            (
                "ready but the network is not",
                WhenNetworkReady,
                NodeState::Starting,
                node(&starting_labels, &startup, false, true, false),
                None,
            ),
            (
                "network ready: startup taints off",
                WhenNetworkReady,
                NodeState::Starting,
                node(&starting_labels, &startup, false, true, true),
                Some((true, false, false)),
            ),
            (
                "WhenNodeReady: off at Ready",
                WhenNodeReady,
                NodeState::Starting,
                node(&starting_labels, &startup, false, true, false),
                Some((true, false, false)),
            ),
            (
                "Never: left to someone else",
                Never,
                NodeState::Running,
                node(&running_labels, &startup, false, true, true),
                None,
            ),
            (
                "starting → running is a promotion",
                WhenNetworkReady,
                NodeState::Running,
                node(&starting_labels, &[], false, true, true),
                Some((false, false, true)),
            ),
            (
                "converged",
                WhenNetworkReady,
                NodeState::Running,
                node(&running_labels, &[], false, true, true),
                None,
            ),
        ];
        for (what, removal, state, now, want) in cases {
            let got = converge(&template(removal), state, &now)
                .map(|c| (c.taints.is_some(), c.cordon, c.promoted));
            assert_eq!(got, want, "{what}");
        }
        let change = converge(
            &template(WhenNetworkReady),
            NodeState::Starting,
            &node(&starting_labels, &startup, false, true, true),
        )
        .unwrap();
        assert_eq!(change.taints, Some(vec![]), "only the startup taint was on");
        assert_eq!(change.labels["stratos.sh/state"], "starting");
        assert_eq!(change.labels["team"], "ci");
    }
}
