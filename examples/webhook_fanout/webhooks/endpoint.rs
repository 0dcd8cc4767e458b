//! An endpoint: where it is, what it subscribes to, its secret and
//! timeout, whether it is enabled; and the checks a row or a command line
//! must pass.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

/// A webhook endpoint and the event types it subscribes to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Endpoint {
    /// A short name (`[a-z0-9_-]`), part of its delivery stream's key.
    pub(crate) name: String,
    /// Where deliveries are POSTed.
    pub(crate) url: String,
    /// The signing secret, `whsec_<base64>` as in Standard Webhooks.
    pub(crate) secret: String,
    /// Event types delivered to it; `*` for all.
    pub(crate) event_types: Vec<String>,
    /// Per-request timeout in milliseconds (connect to last byte).
    #[serde(default = "default_timeout_ms")]
    pub(crate) timeout_ms: u64,
    /// A disabled endpoint gets no new deliveries; what is queued for it is
    /// dead-lettered (`endpoint_disabled`).
    #[serde(default = "enabled_by_default")]
    pub(crate) enabled: bool,
    /// When the endpoint was added, ms since the epoch: it gets only events
    /// published at or after this.
    #[serde(default)]
    pub(crate) created_at_ms: i64,
}

fn default_timeout_ms() -> u64 {
    5_000
}

fn enabled_by_default() -> bool {
    true
}

impl Endpoint {
    /// An enabled endpoint that gets every event published (created at 0).
    pub(crate) fn new(
        name: impl Into<String>,
        url: impl Into<String>,
        secret: impl Into<String>,
        event_types: Vec<String>,
        timeout_ms: u64,
    ) -> Endpoint {
        Endpoint {
            name: name.into(),
            url: url.into(),
            secret: secret.into(),
            event_types,
            timeout_ms,
            enabled: true,
            created_at_ms: 0,
        }
    }

    /// Whether the fan-out sends this event to this endpoint: enabled,
    /// subscribed to the type, and the event is not older than the
    /// endpoint.
    pub(crate) fn wants(&self, event_type: &str, published_at_ms: i64) -> bool {
        self.enabled && self.subscribes(event_type) && published_at_ms >= self.created_at_ms
    }

    /// Whether events of this type go to this endpoint.
    pub(crate) fn subscribes(&self, event_type: &str) -> bool {
        self.event_types.iter().any(|t| t == "*" || t == event_type)
    }

    /// The HMAC key: the base64 after `whsec_`.
    pub(crate) fn key(&self) -> Result<Vec<u8>, String> {
        let encoded = self.secret.strip_prefix("whsec_").unwrap_or(&self.secret);
        BASE64
            .decode(encoded)
            .map_err(|e| format!("endpoint `{}`: secret is not base64: {e}", self.name))
    }

    /// The per-request timeout.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Checks one endpoint: a name usable in a key, an http(s) URL, a
/// non-empty base64 secret, at least one event type, a positive timeout.
pub(crate) fn validate_endpoint(e: &Endpoint) -> Result<(), String> {
    let ok_name = !e.name.is_empty()
        && e.name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !ok_name {
        return Err(format!(
            "endpoint name `{}` must be non-empty [a-z0-9_-]",
            e.name
        ));
    }
    let url = reqwest::Url::parse(&e.url)
        .map_err(|err| format!("endpoint `{}`: bad url `{}`: {err}", e.name, e.url))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "endpoint `{}`: bad url `{}`: must be http(s)",
            e.name, e.url
        ));
    }
    if e.key()?.is_empty() {
        return Err(format!("endpoint `{}`: empty secret", e.name));
    }
    if e.event_types.is_empty() || e.event_types.iter().any(|t| t.trim().is_empty()) {
        return Err(format!(
            "endpoint `{}`: needs at least one event type (`*` for all), none empty",
            e.name
        ));
    }
    if e.timeout_ms == 0 {
        return Err(format!(
            "endpoint `{}`: timeout_ms must be positive",
            e.name
        ));
    }
    Ok(())
}

/// Checks every endpoint and that no name is used twice.
pub(crate) fn validate_endpoints(endpoints: &[Endpoint]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for e in endpoints {
        validate_endpoint(e)?;
        if !seen.insert(e.name.as_str()) {
            return Err(format!("endpoint `{}` is configured twice", e.name));
        }
    }
    Ok(())
}

/// Event types from the table or the command line: a JSON array
/// (`["order.created"]`) or a comma list (`order.created, order.cancelled`);
/// `*` for all. Empty items are an error, as is an empty list.
pub(crate) fn parse_event_types(text: &str) -> Result<Vec<String>, String> {
    let text = text.trim();
    let items: Vec<String> = if text.starts_with('[') {
        serde_json::from_str::<Vec<String>>(text)
            .map_err(|e| format!("event types `{text}`: not a JSON array of strings: {e}"))?
    } else {
        text.split(',').map(str::to_owned).collect()
    };
    let items: Vec<String> = items.iter().map(|t| t.trim().to_owned()).collect();
    if items.iter().all(String::is_empty) {
        return Err("no event types: name at least one (`*` for all)".to_owned());
    }
    if items.iter().any(String::is_empty) {
        return Err(format!("event types `{text}`: an empty item"));
    }
    Ok(items)
}
