//! Endpoints that appear in `webhook_endpoints` get their delivery group
//! without a restart.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redstream::{ProcessorHandle, Store};

use super::groups::Wiring;

/// Refreshes the endpoint cache from `webhook_endpoints` every `every` and
/// adds the delivery group of each endpoint that appears to the running
/// processor ([`ProcessorHandle::add_group`]), so endpoints are added,
/// changed and disabled without a restart. [`stop`](Self::stop) ends the
/// refresh; the groups it added stop with the processor.
pub(crate) struct EndpointWatcher {
    task: tokio::task::JoinHandle<()>,
    started: Arc<AtomicUsize>,
}

impl EndpointWatcher {
    /// Starts watching. `running` names the endpoints whose delivery group
    /// already runs (started with the processor of `handle`).
    pub(crate) fn spawn(
        wiring: Wiring,
        store: Store,
        handle: ProcessorHandle,
        running: impl IntoIterator<Item = String>,
        every: Duration,
    ) -> EndpointWatcher {
        let started = Arc::new(AtomicUsize::new(0));
        let added = Arc::clone(&started);
        let mut running: HashSet<String> = running.into_iter().collect();
        let task = actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut failed: HashMap<String, String> = HashMap::new();
            loop {
                tick.tick().await;
                if let Err(e) = wiring.endpoints.refresh(store.connection()).await {
                    tracing::warn!(
                        "webhook_endpoints: refresh failed, keeping the last endpoints: {e}"
                    );
                    continue;
                }
                for endpoint in wiring.endpoints.snapshot().iter() {
                    if running.contains(&endpoint.name) {
                        continue;
                    }
                    let started = match wiring.delivery_group(&store, endpoint) {
                        Ok(group) => handle.add_group(group).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    match started {
                        Ok(()) => {
                            tracing::info!(endpoint = %endpoint.name, "new webhook endpoint: delivery group added");
                            running.insert(endpoint.name.clone());
                            failed.remove(&endpoint.name);
                            added.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            // Tried again at the next refresh; its deliveries
                            // wait in its stream meanwhile.
                            if failed.get(&endpoint.name) != Some(&e) {
                                tracing::warn!(endpoint = %endpoint.name, "cannot start the delivery group yet: {e}");
                                failed.insert(endpoint.name.clone(), e);
                            }
                        }
                    }
                }
            }
        });
        EndpointWatcher { task, started }
    }

    /// How many delivery groups were added after launch.
    #[allow(dead_code)] // checked by the tests
    pub(crate) async fn started(&self) -> usize {
        self.started.load(Ordering::Relaxed)
    }

    /// Stops refreshing (the groups it added run until the processor stops).
    pub(crate) async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}
