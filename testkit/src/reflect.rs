//! A watched cache of one kind, shared by the simulated control-plane components.

use std::sync::Arc;

use futures::StreamExt;
use kube::{
    Api,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use tokio::{sync::Notify, task::JoinHandle};

/// Spawns a reflector for `api`; `notify` (if any) is woken on every change.
pub fn spawn_store<K>(api: Api<K>, notify: Option<Arc<Notify>>) -> (Store<K>, JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {
            if let Some(n) = &notify {
                n.notify_one();
            }
        }
    });
    (reader, task)
}
