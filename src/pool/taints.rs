//! The taints a node of a pool carries in each state (SPEC §4, §5.2, §5.4): pure functions
//! of the node's current taints and the pool's template, so a controller only writes what
//! they return.

use k8s_openapi::api::core::v1::Taint;

use crate::contract::STANDBY_TAINT;

fn same(a: &Taint, b: &Taint) -> bool {
    a.key == b.key && a.effect == b.effect
}

/// `stratos.sh/standby=true:NoSchedule`.
pub fn standby_taint() -> Taint {
    Taint {
        key: STANDBY_TAINT.into(),
        value: Some("true".into()),
        effect: "NoSchedule".into(),
        time_added: None,
    }
}

/// A node going to standby: what others put on it stays; the standby taint, the pool's
/// startup taints (so the next boot is gated again) and its permanent taints are (back) on.
pub fn standby_taints(current: &[Taint], permanent: &[Taint], startup: &[Taint]) -> Vec<Taint> {
    let mut out: Vec<Taint> = Vec::new();
    let theirs = current
        .iter()
        .filter(|t| t.key != STANDBY_TAINT && !startup.iter().any(|s| s.key == t.key));
    let ours = std::iter::once(standby_taint()).chain(startup.iter().cloned());
    for t in theirs.cloned().chain(ours).chain(permanent.iter().cloned()) {
        if !out.iter().any(|o| same(o, &t)) {
            out.push(t);
        }
    }
    out
}

/// A node leaving standby keeps everything but the standby taint (its startup taints come
/// off per `startupTaintRemoval`).
pub fn out_of_standby(current: &[Taint]) -> Vec<Taint> {
    current
        .iter()
        .filter(|t| t.key != STANDBY_TAINT)
        .cloned()
        .collect()
}

/// The node's taints without the pool's startup taints (by key).
pub fn without_startup(current: &[Taint], startup: &[Taint]) -> Vec<Taint> {
    current
        .iter()
        .filter(|t| !startup.iter().any(|s| s.key == t.key))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some("true".into()),
            effect: effect.into(),
            time_added: None,
        }
    }

    /// The taints as `key:effect`, sorted (order carries no meaning).
    fn keys(taints: &[Taint]) -> Vec<String> {
        let mut keys: Vec<String> = taints
            .iter()
            .map(|t| format!("{}:{}", t.key, t.effect))
            .collect();
        keys.sort();
        keys
    }

    #[test]
    fn taints_per_state() {
        let startup = [t("node.eks.amazonaws.com/not-ready", "NoSchedule")];
        let permanent = [t("gpu", "NoSchedule")];
        let cases: [(&str, Vec<Taint>, Vec<&str>); 3] = [
            (
                "a running node: startup gone, someone's maintenance taint",
                vec![t("gpu", "NoSchedule"), t("team/maintenance", "NoExecute")],
                vec![
                    "gpu:NoSchedule",
                    "team/maintenance:NoExecute",
                    "stratos.sh/standby:NoSchedule",
                    "node.eks.amazonaws.com/not-ready:NoSchedule",
                ],
            ),
            (
                "already standby: nothing doubles",
                standby_taints(&[], &permanent, &startup),
                vec![
                    "stratos.sh/standby:NoSchedule",
                    "node.eks.amazonaws.com/not-ready:NoSchedule",
                    "gpu:NoSchedule",
                ],
            ),
            (
                "the permanent taint was removed by someone: back on",
                vec![],
                vec![
                    "stratos.sh/standby:NoSchedule",
                    "node.eks.amazonaws.com/not-ready:NoSchedule",
                    "gpu:NoSchedule",
                ],
            ),
        ];
        for (what, current, mut want) in cases {
            want.sort();
            assert_eq!(
                keys(&standby_taints(&current, &permanent, &startup)),
                want,
                "{what}"
            );
        }
        let standby = standby_taints(&[], &permanent, &startup);
        assert_eq!(
            keys(&out_of_standby(&standby)),
            [
                "gpu:NoSchedule",
                "node.eks.amazonaws.com/not-ready:NoSchedule"
            ]
        );
        assert_eq!(
            keys(&without_startup(&standby, &startup)),
            ["gpu:NoSchedule", "stratos.sh/standby:NoSchedule"]
        );
    }
}
