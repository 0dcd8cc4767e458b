//! Endpoints that appear in `webhook_endpoints` get their delivery group
//! without a restart.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use redstream::{Processor, Settings, Store};

use super::groups::Wiring;

/// Refreshes the endpoint cache from `webhook_endpoints` every `every` and
/// starts the delivery group of each endpoint that appears (one small
/// [`Processor`] per new endpoint, one worker thread), so endpoints are
/// added, changed and disabled without a restart. [`stop`](Self::stop)
/// ends the refresh and shuts those processors down.
pub(crate) struct EndpointWatcher {
    task: tokio::task::JoinHandle<()>,
    started: Arc<tokio::sync::Mutex<Vec<Processor>>>,
}

impl EndpointWatcher {
    /// Starts watching. `running` names the endpoints whose delivery group
    /// already runs (started with the main processor); `settings` are those
    /// of the main processor.
    pub(crate) fn spawn(
        wiring: Wiring,
        store: Store,
        settings: Settings,
        running: impl IntoIterator<Item = String>,
        every: Duration,
    ) -> EndpointWatcher {
        let started: Arc<tokio::sync::Mutex<Vec<Processor>>> = Arc::default();
        let processors = Arc::clone(&started);
        let mut running: HashSet<String> = running.into_iter().collect();
        let mut settings = settings;
        settings.consumer.workers = 1;
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
                        Ok(group) => Processor::builder(settings.clone())
                            .group(group)
                            .start()
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    match started {
                        Ok(p) => {
                            tracing::info!(endpoint = %endpoint.name, "new webhook endpoint: delivery group started");
                            running.insert(endpoint.name.clone());
                            failed.remove(&endpoint.name);
                            processors.lock().await.push(p);
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

    /// How many delivery groups were started after launch.
    #[allow(dead_code)] // checked by the tests
    pub(crate) async fn started(&self) -> usize {
        self.started.lock().await.len()
    }

    /// Stops refreshing and shuts down the delivery groups it started.
    pub(crate) async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        let processors = std::mem::take(&mut *self.started.lock().await);
        for p in processors {
            if let Err(e) = p.shutdown().await {
                tracing::warn!("delivery group shutdown: {e}");
            }
        }
    }
}
