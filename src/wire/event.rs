//! Events on their way out: [`Event`] and the fields it is written as.

use std::borrow::Cow;

use serde::Serialize;

use super::field;
use crate::clock::now_ms;
use crate::error::{Error, Result};

/// An event to publish.
///
/// ```
/// use redstream::Event;
/// #[derive(serde::Serialize)]
/// struct OrderCreated { order_id: String }
///
/// let event = Event::new("order.created", &OrderCreated { order_id: "o-1".into() })?
///     .with_key("customer-7");
/// assert_eq!(event.event_type(), "order.created");
/// assert_eq!(event.id(), None); // the producer assigns one
/// # Ok::<(), redstream::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    id: Option<String>,
    event_type: String,
    version: u32,
    data: Vec<u8>,
    key: Option<String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    headers: Vec<(String, String)>,
}

impl Event {
    /// An event of `event_type` whose `data` is `data` encoded as JSON.
    pub fn new<T: Serialize + ?Sized>(event_type: impl Into<String>, data: &T) -> Result<Self> {
        let data = serde_json::to_vec(data).map_err(Error::Encode)?;
        Ok(Self::from_json(event_type, data))
    }

    /// An event whose `data` is already-encoded JSON. The bytes are not
    /// checked here; a consumer dead-letters an entry whose `data` is not
    /// valid JSON.
    pub fn from_json(event_type: impl Into<String>, json: impl Into<Vec<u8>>) -> Self {
        Event {
            id: None,
            event_type: event_type.into(),
            version: 1,
            data: json.into(),
            key: None,
            traceparent: None,
            tracestate: None,
            headers: Vec::new(),
        }
    }

    /// Sets the event id instead of letting the producer assign one (the
    /// outbox relay and dead-letter redrive keep ids this way, so that
    /// consumers' idempotency still holds).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the schema version (`v`). Default 1.
    pub fn with_version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Sets the ordering / partition key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the W3C `traceparent`.
    pub fn with_traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// Sets the W3C `tracestate` (written only beside a `traceparent`).
    pub fn with_tracestate(mut self, tracestate: impl Into<String>) -> Self {
        self.tracestate = Some(tracestate.into());
        self
    }

    /// Adds an extra field. Reserved names are refused at publish.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The event id, if set.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The encoded JSON payload.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The schema version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The ordering key, if set.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The W3C trace context, if set.
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// The W3C trace state, if set.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// Extra fields.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// Checks what can be checked before writing: no header may use a
    /// reserved field name.
    pub(crate) fn check(&self) -> Result<()> {
        if let Some((name, _)) = self
            .headers
            .iter()
            .find(|(name, _)| field::RESERVED.contains(&name.as_str()))
        {
            return Err(Error::InvalidEvent {
                reason: format!("header `{name}` uses a reserved field name"),
            });
        }
        Ok(())
    }

    /// Checks the event and turns it into the fields of one entry.
    pub(crate) fn into_outgoing(
        self,
        default_id: impl FnOnce() -> String,
    ) -> Result<OutgoingEntry> {
        self.check()?;
        let id = match self.id {
            Some(id) if !id.is_empty() => id,
            _ => default_id(),
        };
        let mut fields: Vec<(Cow<'static, str>, Vec<u8>)> =
            Vec::with_capacity(6 + self.headers.len());
        fields.push((Cow::Borrowed(field::ID), id.clone().into_bytes()));
        fields.push((Cow::Borrowed(field::TYPE), self.event_type.into_bytes()));
        fields.push((
            Cow::Borrowed(field::VERSION),
            self.version.to_string().into_bytes(),
        ));
        // `ts` is data (display, the end-to-end latency metric): the
        // publisher's wall clock.
        fields.push((Cow::Borrowed(field::TS), now_ms().to_string().into_bytes()));
        if let Some(key) = self.key {
            fields.push((Cow::Borrowed(field::KEY), key.into_bytes()));
        }
        if let Some(tp) = self.traceparent {
            fields.push((Cow::Borrowed(field::TRACEPARENT), tp.into_bytes()));
            if let Some(ts) = self.tracestate {
                fields.push((Cow::Borrowed(field::TRACESTATE), ts.into_bytes()));
            }
        }
        for (name, value) in self.headers {
            fields.push((Cow::Owned(name), value.into_bytes()));
        }
        fields.push((Cow::Borrowed(field::DATA), self.data));
        Ok(OutgoingEntry {
            event_id: id,
            fields,
        })
    }
}

/// An entry ready to be written: its event id and its fields in order.
#[derive(Clone, Debug, PartialEq)]
pub struct OutgoingEntry {
    /// The event id (also present as the `id` field).
    pub event_id: String,
    /// Field names and values, in the order they are written.
    pub fields: Vec<(Cow<'static, str>, Vec<u8>)>,
}

impl OutgoingEntry {
    /// Encoded size of all names and values, in bytes.
    pub fn encoded_len(&self) -> usize {
        self.fields.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(event: Event) -> Vec<String> {
        let entry = event.into_outgoing(|| "e-1".to_owned()).expect("valid");
        entry.fields.iter().map(|(k, _)| k.to_string()).collect()
    }

    #[test]
    fn tracestate_is_written_only_beside_a_traceparent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let with_both = Event::from_json("t", "{}")
            .with_traceparent(tp)
            .with_tracestate("vendor=abc");
        assert!(names(with_both).contains(&"tracestate".to_owned()));
        let alone = Event::from_json("t", "{}").with_tracestate("vendor=abc");
        assert!(!names(alone).contains(&"tracestate".to_owned()));
        let header = Event::from_json("t", "{}").with_header("tracestate", "x");
        assert!(header.check().is_err(), "a reserved name");
    }
}
