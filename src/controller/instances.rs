//! One shared, briefly cached instance listing for all pools (SPEC §7): a reconcile round of
//! any number of pools costs at most one DescribeInstances listing.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Mutex;

use crate::cloud::{CloudError, CloudProvider, Instance, InstanceState};

/// Something Stratos itself just did to instances.
pub enum Change<'a> {
    Launched(&'a [Instance]),
    /// A successful Start, Stop or Terminate: the state EC2 answers with.
    State(&'a [String], InstanceState),
    Tagged(&'a [String], &'a std::collections::BTreeMap<String, String>),
}

pub struct InstanceCache {
    cloud: Arc<dyn CloudProvider>,
    ttl: Duration,
    cached: Mutex<Option<(Instant, Arc<Vec<Instance>>)>>,
}

impl InstanceCache {
    pub fn new(cloud: Arc<dyn CloudProvider>, ttl: Duration) -> Self {
        Self {
            cloud,
            ttl,
            cached: Mutex::new(None),
        }
    }

    /// The cluster's instances, listed at most once per `ttl`. Concurrent callers wait for
    /// the one listing in flight instead of starting their own.
    pub async fn get(&self) -> Result<(Instant, Arc<Vec<Instance>>), CloudError> {
        let mut cached = self.cached.lock().await;
        if let Some((at, list)) = cached.as_ref()
            && at.elapsed() < self.ttl
        {
            return Ok((*at, list.clone()));
        }
        let at = Instant::now();
        let list = Arc::new(self.cloud.list_instances().await?);
        *cached = Some((at, list.clone()));
        Ok((at, list))
    }

    /// After Stratos changed instances, the next round must list afresh.
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    /// Applies Stratos' own change to the cached listing, so the next round sees it without
    /// listing again; what others change (and EC2's own transitions) arrives with the next
    /// listing, at most `ttl` later.
    pub async fn record(&self, change: Change<'_>) {
        let mut cached = self.cached.lock().await;
        let Some((_, list)) = cached.as_mut() else {
            return;
        };
        let list = Arc::make_mut(list);
        match change {
            Change::Launched(instances) => {
                for inst in instances {
                    if !list.iter().any(|i| i.id == inst.id) {
                        list.push(inst.clone());
                    }
                }
            }
            Change::State(ids, state) => {
                for i in list.iter_mut().filter(|i| ids.contains(&i.id)) {
                    i.state = state;
                }
            }
            Change::Tagged(ids, tags) => {
                for i in list.iter_mut().filter(|i| ids.contains(&i.id)) {
                    i.tags
                        .extend(tags.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::cloud::fake::{FakeCloud, FakeCloudConfig};

    #[tokio::test]
    async fn own_changes_show_without_another_listing() {
        let cloud = Arc::new(FakeCloud::new(FakeCloudConfig {
            cluster: "c".into(),
            ..Default::default()
        }));
        let tags = BTreeMap::from([("stratos.sh/cluster".to_owned(), "c".to_owned())]);
        let a = cloud.insert_foreign_instance(tags.clone(), InstanceState::Stopped);
        let cache = InstanceCache::new(cloud.clone(), Duration::from_secs(60));
        cache.get().await.unwrap();
        let listings = || cloud.call_count(crate::cloud::ratelimit::Operation::DescribeInstances);
        let before = listings();
        cache
            .record(Change::State(
                std::slice::from_ref(&a),
                InstanceState::Pending,
            ))
            .await;
        let state = BTreeMap::from([("stratos.sh/state".to_owned(), "starting".to_owned())]);
        cache
            .record(Change::Tagged(std::slice::from_ref(&a), &state))
            .await;
        let (_, list) = cache.get().await.unwrap();
        let inst = list.iter().find(|i| i.id == a).unwrap();
        assert_eq!(inst.state, InstanceState::Pending);
        assert_eq!(inst.tag("stratos.sh/state"), Some("starting"));
        assert_eq!(listings(), before, "no new listing");
        cache.invalidate().await;
        cache.get().await.unwrap();
        assert_eq!(listings(), before + 1);
    }
}
