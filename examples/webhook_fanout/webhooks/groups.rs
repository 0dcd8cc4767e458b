//! The groups: the three on the order stream and one delivery group per
//! endpoint on its own stream.

use std::time::Duration;

use redstream::{Group, RetryPolicy, Store};

use super::delivery::Deliverer;
use super::endpoint::{Endpoint, validate_endpoints};
use super::fan_out::{Analytics, Notifications, Router};
use super::registry::EndpointCache;
use super::{ANALYTICS_GROUP, AnyError, NOTIFICATION_GROUP, WEBHOOK_GROUP, delivery_stream};

/// How the groups run: members and in-flight bounds, retry policy.
#[derive(Clone, Debug)]
pub(crate) struct Wiring {
    /// The order stream.
    pub(crate) source: String,
    pub(crate) endpoints: EndpointCache,
    /// The delivery retry policy (attempts, backoff, jitter).
    pub(crate) policy: RetryPolicy,
    /// Members per group.
    pub(crate) members: usize,
    /// Concurrent requests per delivery member.
    pub(crate) in_flight: usize,
}

impl Wiring {
    /// The three groups on the order stream.
    pub(crate) fn fan_out_groups(&self, store: &Store) -> Vec<Group> {
        let router = Router {
            source: self.source.clone(),
            endpoints: self.endpoints.clone(),
        };
        vec![
            Group::transactional(&self.source, WEBHOOK_GROUP, store, router)
                .with_members(self.members),
            Group::transactional(&self.source, ANALYTICS_GROUP, store, Analytics)
                .with_members(self.members),
            Group::transactional(&self.source, NOTIFICATION_GROUP, store, Notifications)
                .with_members(self.members),
        ]
    }

    /// The delivery group of one endpoint, on its own stream. It reads its
    /// stream from the beginning: entries the fan-out wrote before the
    /// group existed are delivered.
    pub(crate) fn delivery_group(
        &self,
        store: &Store,
        endpoint: &Endpoint,
    ) -> Result<Group, AnyError> {
        // Entries must outlive a request in flight before a reclaim.
        let min_idle = (endpoint.timeout() * 3).max(Duration::from_secs(10));
        let deliverer = Deliverer::new(
            endpoint.name.clone(),
            self.endpoints.clone(),
            store.clone(),
            self.policy.clone(),
        )?;
        Ok(Group::new(
            delivery_stream(&self.source, &endpoint.name),
            WEBHOOK_GROUP,
            deliverer,
        )
        .with_members(self.members)
        .with_in_flight(self.in_flight)
        .with_retry(self.policy.clone())
        .with_min_idle(min_idle)
        .with_start_from(redstream::settings::StartFrom::Beginning))
    }

    /// One delivery group per endpoint in the cache now (disabled ones
    /// too: they dead-letter what is queued for them).
    pub(crate) fn delivery_groups(&self, store: &Store) -> Result<Vec<Group>, AnyError> {
        let endpoints = self.endpoints.snapshot();
        validate_endpoints(&endpoints)?;
        endpoints
            .iter()
            .map(|e| self.delivery_group(store, e))
            .collect()
    }

    /// The streams this wiring reads: the order stream and the delivery
    /// stream of every endpoint in the cache now.
    pub(crate) fn streams(&self) -> Vec<String> {
        std::iter::once(self.source.clone())
            .chain(
                self.endpoints
                    .snapshot()
                    .iter()
                    .map(|e| delivery_stream(&self.source, &e.name)),
            )
            .collect()
    }
}
