//! The pure core (SPEC §2): what a pool's instances and nodes are, and what to do about them.
//!
//! Nothing in this module performs I/O. Controllers gather snapshots and execute what the
//! pure functions return: [`scaleup::plan_scale_up`] decides scale-up for every pool at
//! once, [`plan::plan_pool`] a pool's lifecycle.

pub mod bootstrap;
pub mod converge;
pub mod placement;
pub mod plan;
pub mod pods;
pub mod quantity;
pub mod scaleup;
pub mod scheduling;
pub mod state;
pub mod status;
pub mod taints;

use sha2::{Digest, Sha256};

use crate::api::AWSNodeClassSpec;

/// The `stratos.sh/nodeclass-hash` of a class: what an instance was launched from. Tags are
/// left out: changing them should not replace every instance.
pub fn nodeclass_hash(spec: &AWSNodeClassSpec) -> String {
    let mut launch = spec.clone();
    launch.tags.clear();
    let canonical = serde_json::to_vec(&launch).expect("specs serialise");
    let digest = Sha256::digest(&canonical);
    hex::encode(&digest[..8])
}

/// A ClientToken for a launch decided from a given state: the same pool, class and set of
/// live instances give the same token, so a retried or restarted launch that sees the same
/// (possibly stale) state cannot double-launch, while a launch after any change gets a new
/// one. EC2 allows 64 ASCII characters.
pub fn launch_token(pool_uid: &str, class_hash: &str, live_ids: &[String], count: usize) -> String {
    let mut ids = live_ids.to_vec();
    ids.sort();
    let mut h = Sha256::new();
    h.update(pool_uid.as_bytes());
    h.update(b"\0");
    h.update(class_hash.as_bytes());
    for id in &ids {
        h.update(b"\0");
        h.update(id.as_bytes());
    }
    h.update(count.to_le_bytes());
    format!("stratos-{}", &hex::encode(h.finalize())[..40])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_follow_the_observed_state() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = launch_token("uid", "h", &ids(&["i-2", "i-1"]), 2);
        assert_eq!(
            a,
            launch_token("uid", "h", &ids(&["i-1", "i-2"]), 2),
            "order does not matter"
        );
        assert_ne!(
            a,
            launch_token("uid", "h", &ids(&["i-1", "i-3"]), 2),
            "a replaced instance changes it"
        );
        assert_ne!(a, launch_token("uid", "h2", &ids(&["i-1", "i-2"]), 2));
        assert_ne!(a, launch_token("uid", "h", &ids(&["i-1", "i-2"]), 3));
        assert!(a.len() <= 60);
    }

    #[test]
    fn the_class_hash_ignores_tags_but_not_the_launch_spec() {
        let spec: AWSNodeClassSpec = serde_json::from_value(serde_json::json!({
            "instanceType": "m5.large", "ami": "ami-1", "subnetIds": ["subnet-1"],
            "securityGroupIds": ["sg-1"], "iamInstanceProfile": "p"
        }))
        .unwrap();
        let mut tagged = spec.clone();
        tagged.tags.insert("team".into(), "ci".into());
        assert_eq!(nodeclass_hash(&spec), nodeclass_hash(&tagged));
        let mut other = spec.clone();
        other.ami = "ami-2".into();
        assert_ne!(nodeclass_hash(&spec), nodeclass_hash(&other));
    }
}
