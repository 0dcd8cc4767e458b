//! The wire format: how an event is laid out as a stream entry.
//!
//! An entry is a flat field map so that any client can write and read it.
//! The reserved fields, all optional for entries written by other clients:
//!
//! | field | meaning |
//! |---|---|
//! | `id` | the event's own id, the idempotency key (the producer assigns a ULID or UUIDv7) |
//! | `type` | event type, e.g. `order.created` |
//! | `v` | schema version, default `1` |
//! | `data` | the payload, JSON |
//! | `ts` | publish time, milliseconds since the Unix epoch |
//! | `key` | ordering / partition key |
//! | `traceparent` | W3C trace context |
//!
//! An entry without `data` is delivered too: its non-reserved fields, as a
//! JSON object of strings, are the payload. Decoding is per entry; an entry
//! that cannot be decoded becomes a [`DecodeError`] with a specific reason
//! and goes to the dead-letter stream, and its batch-mates are unaffected.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::{Error, Result};

/// Names of the reserved fields.
pub mod field {
    /// The event id (idempotency key).
    pub const ID: &str = "id";
    /// The event type.
    pub const TYPE: &str = "type";
    /// The schema version.
    pub const VERSION: &str = "v";
    /// The JSON payload.
    pub const DATA: &str = "data";
    /// Publish time in milliseconds since the Unix epoch.
    pub const TS: &str = "ts";
    /// Ordering / partition key.
    pub const KEY: &str = "key";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// All reserved field names.
    pub const RESERVED: [&str; 7] = [ID, TYPE, VERSION, DATA, TS, KEY, TRACEPARENT];
}

/// Most fields an entry may have. An entry with more is dead-lettered
/// (`too_many_fields`) without being handed to a handler; its dead letter
/// keeps the first `MAX_FIELDS` fields (a Lua script writes each letter, and
/// one Redis call from Lua takes fewer than 8,000 arguments).
pub const MAX_FIELDS: usize = 1_024;

/// Longest `id` field, in bytes. The event id is the idempotency key, a
/// primary-key column of `processed_events`; a longer one is dead-lettered
/// (`oversized_field`) rather than failing the database write (PostgreSQL
/// refuses index rows above about 2.7 kB).
pub const MAX_EVENT_ID_BYTES: usize = 512;

/// The name of the dead-letter stream of `stream`: `<stream>:dlq`.
pub fn dead_letter_stream(stream: &str) -> String {
    format!("{stream}:dlq")
}

/// Names of the fields a dead letter adds to the original entry's fields.
///
/// Original fields whose names collide with these (or start with
/// [`ORIGINAL_PREFIX`](dead_letter_field::ORIGINAL_PREFIX)) are kept under
/// that prefix, so nothing the writer sent is lost or shadowed.
pub mod dead_letter_field {
    /// Why the entry was dead-lettered: a stable code, a colon, details.
    pub const REASON: &str = "reason";
    /// The original entry id.
    pub const ORIGIN_ID: &str = "origin_id";
    /// The consumer group that gave up on it.
    pub const GROUP: &str = "group";
    /// Failed attempts.
    pub const ATTEMPTS: &str = "attempts";
    /// When it was dead-lettered, ms since the Unix epoch.
    pub const FAILED_AT: &str = "failed_at";
    /// The last error, when an attempt failed.
    pub const ERROR: &str = "error";
    /// How many original fields past [`MAX_FIELDS`](crate::MAX_FIELDS)
    /// were left out of the letter (present only then; the whole entry
    /// stays in the stream under `origin_id` until trimmed).
    pub const OMITTED_FIELDS: &str = "omitted_fields";
    /// Prefix for original fields whose names collide with the above.
    pub const ORIGINAL_PREFIX: &str = "original.";
    /// All names a dead letter adds.
    pub const ADDED: [&str; 7] = [
        REASON,
        ORIGIN_ID,
        GROUP,
        ATTEMPTS,
        FAILED_AT,
        ERROR,
        OMITTED_FIELDS,
    ];
}

/// The fields of a dead-letter entry: the letter's metadata, then the
/// original fields (renamed only where they would collide).
pub(crate) fn dead_letter_fields(
    letter: &crate::broker::DeadLetter,
    group: &str,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    use dead_letter_field as f;
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (f::REASON.into(), letter.reason.clone().into_bytes()),
        (f::ORIGIN_ID.into(), letter.origin_id.clone().into_bytes()),
        (f::GROUP.into(), group.as_bytes().to_vec()),
        (f::ATTEMPTS.into(), letter.attempts.to_string().into_bytes()),
        (
            f::FAILED_AT.into(),
            letter.failed_at_ms.to_string().into_bytes(),
        ),
    ];
    if let Some(error) = &letter.error {
        out.push((f::ERROR.into(), error.clone().into_bytes()));
    }
    let omitted = letter.fields.len().saturating_sub(MAX_FIELDS);
    if omitted > 0 {
        out.push((f::OMITTED_FIELDS.into(), omitted.to_string().into_bytes()));
    }
    for (name, value) in letter.fields.iter().take(MAX_FIELDS) {
        let collides = f::ADDED.iter().any(|a| a.as_bytes() == name.as_slice())
            || name.starts_with(f::ORIGINAL_PREFIX.as_bytes());
        let name = if collides {
            [f::ORIGINAL_PREFIX.as_bytes(), name].concat()
        } else {
            name.clone()
        };
        out.push((name, value.clone()));
    }
    out
}

/// Milliseconds since the Unix epoch, now, by this process's wall clock.
///
/// For times that are data (an entry's `ts`, `processed_at`, a dead
/// letter's `failed_at_ms`, display), never for a decision: times several
/// processes compare come from the broker's clock
/// ([`Diagnostics::server_time_ms`](crate::broker::Diagnostics::server_time_ms), Redis
/// `TIME` inside the scripts), and durations inside a process from the
/// monotonic clock (`Instant`). A wall clock can be stepped (NTP, a VM
/// resumed) and differ between hosts.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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

/// An entry as the broker returns it: its id and raw fields, undecoded.
/// `fields == None` means the id is still pending but its payload was trimmed
/// or deleted from the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEntry {
    /// The stream entry id (`<ms>-<seq>`).
    pub id: String,
    /// Field names and values as written, duplicates included.
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// A decoded entry: reserved fields parsed, raw fields kept (the dead-letter
/// stream gets them unchanged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    id: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    event_id: Option<String>,
    event_type: Option<String>,
    version: u32,
    published_at_ms: Option<u64>,
    key: Option<String>,
    traceparent: Option<String>,
    data: Option<usize>,
}

/// Why an entry could not be decoded. Each is dead-lettered at once, with
/// [`DecodeError::reason`] as its reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The id is pending but its payload is gone from the stream.
    #[error("trimmed_while_pending: the entry was trimmed or deleted before it was acked")]
    Trimmed,
    /// A field name is not UTF-8.
    #[error("malformed_field_name: field #{index} has a name that is not UTF-8")]
    FieldNameNotUtf8 {
        /// Position of the field in the entry.
        index: usize,
    },
    /// A reserved field, or a field of a field-only entry, is not UTF-8.
    #[error("malformed_field: field `{field}` is not UTF-8")]
    FieldNotUtf8 {
        /// The field name.
        field: String,
    },
    /// A field name occurs more than once.
    #[error("duplicate_field: field `{field}` occurs more than once")]
    DuplicateField {
        /// The field name.
        field: String,
    },
    /// The entry has more than [`MAX_FIELDS`] fields.
    #[error("too_many_fields: {count} fields, at most {max}")]
    TooManyFields {
        /// Its number of fields.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A reserved field is longer than its limit ([`MAX_EVENT_ID_BYTES`]
    /// for `id`).
    #[error("oversized_field: `{field}` is {len} bytes, at most {max}")]
    Oversized {
        /// The field name.
        field: String,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `v` or `ts` is not a non-negative integer.
    #[error("malformed_field: `{field}` is not a non-negative integer")]
    NotANumber {
        /// The field name.
        field: String,
    },
    /// The payload is not valid JSON for the handler's event type.
    #[error("bad_json: {detail}")]
    BadJson {
        /// What serde_json said.
        detail: String,
    },
    /// The entry's schema version is one the handler cannot read.
    #[error(
        "unknown_schema_version: version {version}, handler reads {current} and has no upcaster from it"
    )]
    UnknownVersion {
        /// The entry's `v`.
        version: u32,
        /// The handler's current version.
        current: u32,
    },
    /// An upcaster returned an error.
    #[error("upcast_failed: from version {from}: {detail}")]
    UpcastFailed {
        /// The version the failing upcaster reads.
        from: u32,
        /// Its error.
        detail: String,
    },
}

impl DecodeError {
    /// The dead-letter reason: a stable code, a colon, and details.
    pub fn reason(&self) -> String {
        self.to_string()
    }
}

fn utf8(bytes: &[u8], field: &str) -> std::result::Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::FieldNotUtf8 {
        field: field.to_owned(),
    })
}

fn number(bytes: &[u8], field: &str) -> std::result::Result<u64, DecodeError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| DecodeError::NotANumber {
            field: field.to_owned(),
        })
}

/// A `traceparent` value if it is a W3C trace context
/// (`<version>-<trace-id>-<parent-id>-<flags>`, lowercase hex, ids not all
/// zero, version not `ff`); anything else is ignored, with a debug log: a
/// trace context is a hint, never a reason to refuse an event.
fn trace_context(entry_id: &str, value: &[u8]) -> Option<String> {
    fn hex(s: &str, len: usize) -> bool {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
    fn valid(s: &str) -> bool {
        let mut parts = s.splitn(5, '-');
        let (Some(version), Some(trace), Some(parent), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let rest = parts.next();
        hex(version, 2)
            && version != "ff"
            && hex(trace, 32)
            && trace.bytes().any(|b| b != b'0')
            && hex(parent, 16)
            && parent.bytes().any(|b| b != b'0')
            && hex(flags, 2)
            // Version 00 has exactly four parts; later ones may add more.
            && (rest.is_none() || version != "00")
    }
    match std::str::from_utf8(value) {
        Ok(s) if valid(s) => Some(s.to_owned()),
        _ => {
            tracing::debug!(
                entry_id,
                len = value.len(),
                "ignoring a `traceparent` that is not a W3C trace context"
            );
            None
        }
    }
}

impl Entry {
    /// Decodes one raw entry. On failure the raw entry is given back beside
    /// the reason, so it can be dead-lettered with its original bytes.
    pub fn decode(raw: RawEntry) -> std::result::Result<Entry, (RawEntry, DecodeError)> {
        let Some(fields) = raw.fields.as_ref() else {
            return Err((raw, DecodeError::Trimmed));
        };
        if fields.is_empty() {
            // XADD never writes an entry without fields: an empty map is a
            // trimmed payload (redis-rs maps a nil entry to an empty map).
            return Err((raw, DecodeError::Trimmed));
        }
        if fields.len() > MAX_FIELDS {
            let count = fields.len();
            return Err((
                raw,
                DecodeError::TooManyFields {
                    count,
                    max: MAX_FIELDS,
                },
            ));
        }
        match Self::parse(&raw.id, fields) {
            Ok(parsed) => {
                let RawEntry { id, fields } = raw;
                Ok(Entry {
                    id,
                    fields: fields.unwrap_or_default(),
                    ..parsed
                })
            }
            Err(e) => Err((raw, e)),
        }
    }

    fn parse(id: &str, fields: &[(Vec<u8>, Vec<u8>)]) -> std::result::Result<Entry, DecodeError> {
        let mut entry = Entry {
            id: id.to_owned(),
            fields: Vec::new(),
            event_id: None,
            event_type: None,
            version: 1,
            published_at_ms: None,
            key: None,
            traceparent: None,
            data: None,
        };
        for (index, (name, value)) in fields.iter().enumerate() {
            let name =
                std::str::from_utf8(name).map_err(|_| DecodeError::FieldNameNotUtf8 { index })?;
            if fields[..index]
                .iter()
                .any(|(n, _)| n.as_slice() == name.as_bytes())
            {
                return Err(DecodeError::DuplicateField {
                    field: name.to_owned(),
                });
            }
            match name {
                field::ID => {
                    if value.len() > MAX_EVENT_ID_BYTES {
                        return Err(DecodeError::Oversized {
                            field: name.to_owned(),
                            len: value.len(),
                            max: MAX_EVENT_ID_BYTES,
                        });
                    }
                    entry.event_id = Some(utf8(value, name)?)
                }
                field::TYPE => entry.event_type = Some(utf8(value, name)?),
                field::VERSION => {
                    entry.version = u32::try_from(number(value, name)?).map_err(|_| {
                        DecodeError::NotANumber {
                            field: name.to_owned(),
                        }
                    })?
                }
                field::TS => entry.published_at_ms = Some(number(value, name)?),
                field::KEY => entry.key = Some(utf8(value, name)?),
                field::TRACEPARENT => entry.traceparent = trace_context(id, value),
                field::DATA => entry.data = Some(index),
                _ => {}
            }
        }
        Ok(entry)
    }

    /// The stream entry id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The `id` field, if the writer set one.
    pub fn event_id(&self) -> Option<&str> {
        self.event_id.as_deref()
    }

    /// The `type` field.
    pub fn event_type(&self) -> Option<&str> {
        self.event_type.as_deref()
    }

    /// The `v` field, 1 when absent.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The `ts` field: publish time in ms since the Unix epoch.
    pub fn published_at_ms(&self) -> Option<u64> {
        self.published_at_ms
    }

    /// The `key` field.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The `traceparent` field, if it is a W3C trace context (`None` for
    /// anything else: an invalid one is ignored, not an error).
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// The raw `data` field, if present.
    pub fn data(&self) -> Option<&[u8]> {
        self.data.map(|i| self.fields[i].1.as_slice())
    }

    /// All fields as written.
    pub fn fields(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.fields
    }

    /// The value of one field.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// The payload of an entry without `data`: its non-reserved fields as a
    /// JSON object of strings.
    pub fn fields_as_json(&self) -> std::result::Result<serde_json::Value, DecodeError> {
        let mut map = serde_json::Map::new();
        for (name, value) in &self.fields {
            // Names were checked to be UTF-8 by `decode`.
            let name = String::from_utf8_lossy(name);
            if field::RESERVED.contains(&name.as_ref()) {
                continue;
            }
            let value = utf8(value, &name)?;
            map.insert(name.into_owned(), serde_json::Value::String(value));
        }
        Ok(serde_json::Value::Object(map))
    }

    /// The key that makes processing idempotent: the event id, or for
    /// entries written without one, `<stream>/<entry id>` (stable for the
    /// life of the entry, but a re-publish by that writer is a new event).
    pub fn idempotency_key(&self, stream: &str) -> String {
        match &self.event_id {
            Some(id) => id.clone(),
            None => format!("{stream}/{}", self.id),
        }
    }

    /// Builds an entry in memory (for tests of handlers).
    pub fn from_fields(id: impl Into<String>, fields: Vec<(Vec<u8>, Vec<u8>)>) -> Result<Entry> {
        Entry::decode(RawEntry {
            id: id.into(),
            fields: Some(fields),
        })
        .map_err(|(_, e)| Error::InvalidEvent { reason: e.reason() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(fields: &[(&[u8], &[u8])]) -> RawEntry {
        RawEntry {
            id: "1-0".into(),
            fields: Some(
                fields
                    .iter()
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .collect(),
            ),
        }
    }

    #[test]
    fn producer_fields_round_trip() {
        let out = Event::from_json("order.created", br#"{"a":1}"#.to_vec())
            .with_key("k")
            .with_version(3)
            .with_header("tenant", "t1")
            .into_outgoing(|| "E1".into())
            .expect("valid");
        assert_eq!(out.event_id, "E1");
        let fields = out
            .fields
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
            .collect();
        let entry = Entry::decode(RawEntry {
            id: "5-1".into(),
            fields: Some(fields),
        })
        .expect("decodes");
        assert_eq!(entry.event_id(), Some("E1"));
        assert_eq!(entry.event_type(), Some("order.created"));
        assert_eq!(entry.version(), 3);
        assert_eq!(entry.key(), Some("k"));
        assert_eq!(entry.data(), Some(&br#"{"a":1}"#[..]));
        assert_eq!(entry.field("tenant"), Some(&b"t1"[..]));
        assert!(entry.published_at_ms().is_some());
    }

    #[test]
    fn reserved_header_is_refused() {
        let e = Event::from_json("t", b"{}".to_vec())
            .with_header("data", "x")
            .into_outgoing(|| "E".into())
            .expect_err("reserved");
        assert!(e.to_string().contains("reserved"), "{e}");
    }

    #[test]
    fn foreign_entry_is_its_fields() {
        let entry = Entry::decode(raw(&[(b"sku", b"A-1"), (b"qty", b"3")])).expect("decodes");
        assert_eq!(entry.event_id(), None);
        assert_eq!(entry.version(), 1);
        assert_eq!(
            entry.fields_as_json().expect("utf8"),
            serde_json::json!({"sku": "A-1", "qty": "3"})
        );
        assert_eq!(entry.idempotency_key("orders"), "orders/1-0");
    }

    #[test]
    fn each_malformation_has_its_reason() {
        let cases: Vec<(RawEntry, &str)> = vec![
            (
                RawEntry {
                    id: "1-0".into(),
                    fields: None,
                },
                "trimmed_while_pending",
            ),
            (raw(&[]), "trimmed_while_pending"),
            (raw(&[(b"\xff\xfe", b"x")]), "malformed_field_name"),
            (raw(&[(b"type", b"\xff")]), "malformed_field"),
            (raw(&[(b"v", b"two")]), "malformed_field"),
            (raw(&[(b"a", b"1"), (b"a", b"2")]), "duplicate_field"),
            (raw(&[(b"v", b"-1")]), "malformed_field"),
            (raw(&[(b"ts", b"abc")]), "malformed_field"),
            (raw(&[(b"id", &[b'x'; 10_240])]), "oversized_field"),
        ];
        for (entry, code) in cases {
            let (back, err) = Entry::decode(entry.clone()).expect_err("malformed");
            assert_eq!(back, entry, "raw entry given back unchanged");
            assert!(err.reason().starts_with(code), "{code}: {}", err.reason());
        }
    }

    #[test]
    fn too_many_fields_are_refused_and_the_letter_is_capped() {
        let fields: Vec<(Vec<u8>, Vec<u8>)> = (0..10_000)
            .map(|i| (format!("f{i}").into_bytes(), b"x".to_vec()))
            .collect();
        let raw_entry = RawEntry {
            id: "1-0".into(),
            fields: Some(fields.clone()),
        };
        let (_, err) = Entry::decode(raw_entry).expect_err("too many");
        assert_eq!(err.reason(), "too_many_fields: 10000 fields, at most 1024");
        let letter = crate::broker::DeadLetter {
            origin_id: "1-0".into(),
            fields,
            reason: err.reason(),
            attempts: 0,
            error: None,
            failed_at_ms: 0,
        };
        let out = dead_letter_fields(&letter, "g");
        assert_eq!(out.len(), 5 + 1 + MAX_FIELDS);
        assert!(out.contains(&(b"omitted_fields".to_vec(), b"8976".to_vec())));
        // At the limit, nothing is left out.
        let at_limit = RawEntry {
            id: "1-0".into(),
            fields: Some(
                (0..MAX_FIELDS)
                    .map(|i| (format!("f{i}").into_bytes(), b"x".to_vec()))
                    .collect(),
            ),
        };
        assert!(Entry::decode(at_limit).is_ok());
    }

    #[test]
    fn an_invalid_traceparent_is_ignored() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let entry = Entry::decode(raw(&[(b"traceparent", good.as_bytes())])).expect("decodes");
        assert_eq!(entry.traceparent(), Some(good));
        for bad in [
            &b"not a trace context"[..],
            b"\xff\xfe",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            &[b'0'; 10_000],
        ] {
            let entry = Entry::decode(raw(&[(b"traceparent", bad), (b"data", b"{}")]))
                .expect("an invalid traceparent does not fail the entry");
            assert_eq!(
                entry.traceparent(),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
            assert_eq!(entry.field("traceparent"), Some(bad), "kept as written");
        }
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        let entry = Entry::decode(raw(&[(b"traceparent", future.as_bytes())])).expect("decodes");
        assert_eq!(entry.traceparent(), Some(future));
    }
}
