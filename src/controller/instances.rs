//! One shared, briefly cached instance listing for all pools (SPEC §7): a reconcile round of
//! any number of pools costs at most one DescribeInstances listing.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Mutex;

use crate::cloud::{CloudError, CloudProvider, Instance};

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
}
