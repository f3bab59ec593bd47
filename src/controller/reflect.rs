//! The caches every controller reads, and whether each is current (SPEC §4, §11 I1/I5).
//!
//! A reflector's store keeps answering while its watch is down: after an API outage it
//! holds the world as it was when the watch broke. Acting on that view destroyed healthy
//! instances (a freshly registered Node that the stale cache did not show read as "no Node
//! registered"). So each cache here carries a [`CacheHealth`]: it is current from its first
//! complete list until a watch error, and current again only after a complete re-list —
//! never by resuming a watch, whose connection state a client cannot observe. Destructive
//! decisions read [`Freshness::current`] (see `pool::plan`).
//!
//! kube's watcher retries on its own with a backoff of up to 30 s and resumes from the last
//! resourceVersion; that is why a cache could stay stale for a minute after the API came
//! back. Here a failed watcher is dropped and a new one lists from scratch after a short
//! backoff (0.25 s doubling to 5 s), so a cache is current again within seconds of the API's
//! return.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, future::BoxFuture};
use kube::{
    Api, Client, Resource,
    runtime::{
        reflector::{self, Store},
        watcher::{self, Event},
    },
};
use tokio::sync::Notify;

/// The first retry after a watch error, doubled per failure up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The longest wait between attempts to re-list: bounds how long a cache stays stale after
/// the API server answers again.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Retry pacing after a watch error: [`FIRST_RETRY`] doubling to [`MAX_RETRY`], reset by
/// the first success. Also the pacing of the controllers' own trigger watches: kube pauses a
/// controller's *whole* trigger stream (bulk reconciles included) for each backoff step, and
/// its default of up to 30 s delayed every pool's first action after an outage.
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: FIRST_RETRY }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(MAX_RETRY);
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = FIRST_RETRY;
    }
}

/// Whether one cache reflects the API server.
#[derive(Debug)]
pub struct CacheHealth {
    name: &'static str,
    current: AtomicBool,
    /// When the cache last stopped being current (for the catch-up log line).
    lost_at: Mutex<Option<Instant>>,
}

impl CacheHealth {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            current: AtomicBool::new(false),
            lost_at: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Listed completely and watching since, with no error in between.
    pub fn is_current(&self) -> bool {
        self.current.load(Ordering::Acquire)
    }

    /// A complete list was applied to the store.
    fn caught_up(&self) {
        self.current.store(true, Ordering::Release);
        if let Some(since) = self.lost_at.lock().expect("lost_at lock").take() {
            tracing::info!(
                cache = self.name,
                stale_for_ms = since.elapsed().as_millis() as u64,
                "cache current again after a full re-list"
            );
        }
    }

    /// The watch failed: what the store holds may be behind from now on.
    fn lost(&self, error: &watcher::Error) {
        let was_current = self.current.swap(false, Ordering::AcqRel);
        let mut lost_at = self.lost_at.lock().expect("lost_at lock");
        if was_current || lost_at.is_none() {
            *lost_at = Some(Instant::now());
            tracing::warn!(
                cache = self.name,
                error = %error,
                "watch failed; destructive actions wait until this cache has re-listed"
            );
        } else {
            tracing::debug!(cache = self.name, error = %error, "watch still failing");
        }
    }
}

/// The health of the caches a decision reads.
#[derive(Debug, Clone, Default)]
pub struct Freshness {
    caches: Vec<Arc<CacheHealth>>,
}

impl Freshness {
    pub fn new(caches: Vec<Arc<CacheHealth>>) -> Self {
        Self { caches }
    }

    /// Every cache is current.
    pub fn current(&self) -> bool {
        self.caches.iter().all(|c| c.is_current())
    }

    /// The caches that are not current, by name.
    pub fn stale(&self) -> Vec<&'static str> {
        self.caches
            .iter()
            .filter(|c| !c.is_current())
            .map(|c| c.name())
            .collect()
    }

    /// Each cache and whether it is current, for the metrics.
    pub fn each(&self) -> impl Iterator<Item = (&'static str, bool)> + '_ {
        self.caches.iter().map(|c| (c.name(), c.is_current()))
    }
}

/// Whom a cache's changes wake: `notify`, for the objects `when` selects (and on every
/// completed re-list). Routes changes to the loops they concern: a pending pod concerns the
/// scale-up decision, not every pool's reconcile.
pub struct Wake<K> {
    pub notify: Arc<Notify>,
    pub when: fn(&K) -> bool,
}

impl<K> Wake<K> {
    /// Woken by every change.
    pub fn always(notify: &Arc<Notify>) -> Self {
        Self {
            notify: notify.clone(),
            when: |_| true,
        }
    }

    /// Woken by the changes of the objects `when` selects.
    pub fn when(notify: &Arc<Notify>, when: fn(&K) -> bool) -> Self {
        Self {
            notify: notify.clone(),
            when,
        }
    }
}

/// A cache of every `S` (as `watch` selects them), stored as `convert` makes it (trimmed, or
/// a compact form such as `CachedPod`), with its health. Each of `wakes` is woken on the
/// changes it selects and on every completed (re-)list.
pub fn cache<S, K>(
    name: &'static str,
    client: &Client,
    watch: watcher::Config,
    wakes: Vec<Wake<K>>,
    convert: fn(S) -> K,
) -> (Store<K>, Arc<CacheHealth>, BoxFuture<'static, ()>)
where
    S: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, mut writer) = reflector::store::<K>();
    let health = Arc::new(CacheHealth::new(name));
    let api = Api::<S>::all(client.clone());
    let task_health = health.clone();
    let task = async move {
        let mut retry = WatchBackoff::default();
        loop {
            // A new watcher starts with a complete list: the only way back to "current".
            let mut events = std::pin::pin!(watcher::watcher(api.clone(), watch.clone()));
            while let Some(item) = events.next().await {
                let event = match item {
                    Ok(event) => event,
                    Err(e) => {
                        task_health.lost(&e);
                        break;
                    }
                };
                let event = match event {
                    Event::Apply(o) => Event::Apply(convert(o)),
                    Event::Delete(o) => Event::Delete(convert(o)),
                    Event::InitApply(o) => Event::InitApply(convert(o)),
                    Event::Init => Event::Init,
                    Event::InitDone => Event::InitDone,
                };
                writer.apply_watcher_event(&event);
                match &event {
                    Event::Init | Event::InitApply(_) => {}
                    Event::InitDone => {
                        task_health.caught_up();
                        kube::runtime::utils::Backoff::reset(&mut retry);
                        wakes.iter().for_each(|w| w.notify.notify_one());
                    }
                    Event::Apply(o) | Event::Delete(o) => wakes
                        .iter()
                        .filter(|w| (w.when)(o))
                        .for_each(|w| w.notify.notify_one()),
                }
            }
            tokio::time::sleep(retry.next().unwrap_or(MAX_RETRY)).await;
        }
    };
    (reader, health, Box::pin(task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_backoff_doubles_to_its_cap_and_resets() {
        use kube::runtime::utils::Backoff;
        let mut b = WatchBackoff::default();
        let steps: Vec<u64> = b.by_ref().take(7).map(|d| d.as_millis() as u64).collect();
        assert_eq!(steps, vec![250, 500, 1000, 2000, 4000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next(), Some(FIRST_RETRY));
    }

    #[test]
    fn freshness_is_current_only_when_every_cache_is() {
        let nodes = Arc::new(CacheHealth::new("nodes"));
        let pods = Arc::new(CacheHealth::new("pods"));
        let f = Freshness::new(vec![nodes.clone(), pods.clone()]);
        assert!(!f.current(), "nothing listed yet");
        nodes.caught_up();
        assert_eq!(f.stale(), vec!["pods"]);
        pods.caught_up();
        assert!(f.current());
        pods.lost(&watcher::Error::NoResourceVersion);
        assert!(!f.current());
        assert_eq!(f.stale(), vec!["pods"]);
        pods.caught_up();
        assert!(f.current());
        assert!(
            Freshness::default().current(),
            "no caches: nothing to be behind"
        );
    }
}
