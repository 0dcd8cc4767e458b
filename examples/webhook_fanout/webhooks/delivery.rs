//! One delivery: the signed HTTP POST to the endpoint, and what its answer
//! means (ack, retry after a backoff or `Retry-After`, dead letter), with
//! one `webhook_deliveries` row per attempt.

use std::time::{Duration, Instant, SystemTime};

use redstream::{Handler, HandlerResult, Meta, Outcome, RetryPolicy, Store};
use sea_orm::{EntityTrait, Set};
use serde::{Deserialize, Serialize};

use super::endpoint::Endpoint;
use super::registry::EndpointCache;
use super::signing::sign;
use super::tables::attempt_row;
use super::{AnyError, now_ms};

/// Requests that answer with a longer `Retry-After` wait this long at most.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// One entry on a delivery stream: a source event for one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Delivery {
    /// The source event's id: the `webhook-id`, the same for every endpoint
    /// and every attempt, so receivers can deduplicate.
    pub(crate) webhook_id: String,
    /// The endpoint it is for.
    pub(crate) endpoint: String,
    /// The source event's type.
    pub(crate) event_type: String,
    /// When the source event was published, ms since the epoch.
    pub(crate) published_at_ms: i64,
    /// The exact JSON that is signed and POSTed.
    pub(crate) body: String,
}

/// What one HTTP attempt gave.
#[derive(Debug)]
struct Answer {
    status: Option<u16>,
    error: Option<String>,
    retry_after: Option<Duration>,
}

/// A `Retry-After` value: seconds, or an HTTP date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The per-endpoint delivery handler: POSTs the signed body, records the
/// attempt, and decides.
///
/// | answer | outcome |
/// |---|---|
/// | 2xx | delivered (ack) |
/// | connect error, timeout, 5xx, 429 | retry after `max(backoff, Retry-After)`; after the last attempt, dead letter `max_attempts_exceeded` with the last error |
/// | any other status (3xx, 4xx) | dead letter at once: `rejected: http_<status>: …` |
///
/// The endpoint (URL, secret, timeout, enabled) is looked up in the cache
/// on every attempt, so a change takes effect at the next refresh. An
/// entry for an endpoint that is disabled or gone from the table is
/// dead-lettered (`endpoint_disabled`, `endpoint_unknown`), redrivable once
/// it is back.
pub(crate) struct Deliverer {
    name: String,
    endpoints: EndpointCache,
    client: reqwest::Client,
    store: Store,
    policy: RetryPolicy,
}

impl Deliverer {
    pub(crate) fn new(
        name: impl Into<String>,
        endpoints: EndpointCache,
        store: Store,
        policy: RetryPolicy,
    ) -> Result<Self, AnyError> {
        let client = reqwest::Client::builder()
            // A webhook answers where it was sent; a redirect is not followed.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("redstream-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Deliverer {
            name: name.into(),
            endpoints,
            client,
            store,
            policy,
        })
    }

    async fn post(
        &self,
        endpoint: &Endpoint,
        d: &Delivery,
        timestamp: i64,
    ) -> Result<Answer, AnyError> {
        let signature = sign(
            &endpoint.key()?,
            &d.webhook_id,
            timestamp,
            d.body.as_bytes(),
        )?;
        let sent = self
            .client
            .post(&endpoint.url)
            .timeout(endpoint.timeout())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &d.webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .header("webhook-event-type", &d.event_type)
            .body(d.body.clone())
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "request"
                };
                return Ok(Answer {
                    status: None,
                    error: Some(format!("{kind}: {e}")),
                    retry_after: None,
                });
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        if status.is_success() {
            // Read the body so the connection is reused; its content is ignored.
            let _ = response.bytes().await;
            return Ok(Answer {
                status: Some(status.as_u16()),
                error: None,
                retry_after: None,
            });
        }
        let text = response.text().await.unwrap_or_default();
        let snippet: String = text.chars().take(200).collect();
        Ok(Answer {
            status: Some(status.as_u16()),
            error: Some(format!("HTTP {status}: {snippet}").trim_end().to_owned()),
            retry_after,
        })
    }
}

impl Handler for Deliverer {
    type Event = Delivery;

    async fn handle(&self, d: Delivery, meta: Meta) -> HandlerResult {
        if d.endpoint != self.name {
            return Ok(Outcome::dead_letter(format!(
                "misrouted: for endpoint `{}`, read from `{}`",
                d.endpoint,
                meta.stream()
            )));
        }
        let Some(endpoint) = self.endpoints.get(&self.name) else {
            return Ok(Outcome::dead_letter(format!(
                "endpoint_unknown: `{}` is not in webhook_endpoints (or its row is invalid)",
                self.name
            )));
        };
        if !endpoint.enabled {
            return Ok(Outcome::dead_letter(format!(
                "endpoint_disabled: `{}` is disabled",
                self.name
            )));
        }
        let attempted_at = now_ms();
        let started = Instant::now();
        let answer = self.post(&endpoint, &d, attempted_at / 1000).await?;
        let latency = started.elapsed();
        let last = meta.attempt() >= self.policy.max_attempts;
        let error = answer.error.clone().unwrap_or_default();
        let (label, result): (&str, HandlerResult) = match answer.status {
            Some(s) if (200..300).contains(&s) => ("delivered", Ok(Outcome::Ack)),
            None | Some(429) | Some(500..=599) if last => {
                // The library dead-letters it (`max_attempts_exceeded`),
                // keeping this as the last error.
                ("exhausted", Err(error.clone().into()))
            }
            None | Some(429) | Some(500..=599) => {
                let backoff = self.policy.delay_for(meta.attempt());
                let delay = match answer.retry_after {
                    Some(asked) => asked.min(MAX_RETRY_AFTER).max(backoff),
                    None => backoff,
                };
                ("retry", Ok(Outcome::retry_after(delay)))
            }
            Some(s) => (
                "rejected",
                Ok(Outcome::dead_letter(format!(
                    "http_{s}: endpoint `{}` refused the delivery: {error}",
                    self.name
                ))),
            ),
        };
        let row = attempt_row::ActiveModel {
            event_id: Set(d.webhook_id.clone()),
            endpoint: Set(self.name.clone()),
            attempt: Set(meta.attempt() as i32),
            status_code: Set(answer.status.map(i32::from)),
            error: Set(answer.error),
            latency_ms: Set(latency.as_millis() as i64),
            outcome: Set(label.to_owned()),
            attempted_at: Set(attempted_at),
            published_at: Set(d.published_at_ms),
            ..Default::default()
        };
        // An attempt that cannot be recorded is retried: the receiver may
        // see it twice (same `webhook-id`), the record has no gap.
        attempt_row::Entity::insert(row)
            .exec_without_returning(self.store.connection())
            .await?;
        tracing::debug!(endpoint = %self.name, event = %d.webhook_id, attempt = meta.attempt(), outcome = label, "webhook attempt");
        result
    }
}
