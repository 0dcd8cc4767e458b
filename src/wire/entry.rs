//! Entries on their way in: [`RawEntry`] as the broker returns it, decoded
//! one at a time into an [`Entry`] or a [`DecodeError`].

use super::{MAX_EVENT_ID_BYTES, MAX_FIELDS, field};
use crate::error::{Error, Result};

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
    tracestate: Option<String>,
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

    /// The stable code alone: `bad_json`, `trimmed_while_pending`, …
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Trimmed => "trimmed_while_pending",
            DecodeError::FieldNameNotUtf8 { .. } => "malformed_field_name",
            DecodeError::FieldNotUtf8 { .. } | DecodeError::NotANumber { .. } => "malformed_field",
            DecodeError::DuplicateField { .. } => "duplicate_field",
            DecodeError::TooManyFields { .. } => "too_many_fields",
            DecodeError::Oversized { .. } => "oversized_field",
            DecodeError::BadJson { .. } => "bad_json",
            DecodeError::UnknownVersion { .. } => "unknown_schema_version",
            DecodeError::UpcastFailed { .. } => "upcast_failed",
        }
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
            tracestate: None,
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
                // A hint like `traceparent`: ignored unless UTF-8.
                field::TRACESTATE => {
                    entry.tracestate = std::str::from_utf8(value).ok().map(str::to_owned)
                }
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

    /// The `tracestate` field, if it is UTF-8.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
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
    use crate::wire::{Event, dead_letter_fields};

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
        let letter = crate::wire::DeadLetter {
            origin_id: "1-0".into(),
            fields,
            reason: crate::wire::DeadLetterReason::Undecodable(err),
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

    #[test]
    fn tracestate_is_read_beside_traceparent_and_ignored_unless_utf8() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let entry = Entry::decode(raw(&[
            (b"traceparent", tp.as_bytes()),
            (b"tracestate", b"vendor=abc"),
        ]))
        .expect("decodes");
        assert_eq!(entry.tracestate(), Some("vendor=abc"));
        let entry = Entry::decode(raw(&[(b"tracestate", b"\xff"), (b"data", b"{}")]))
            .expect("a tracestate that is not UTF-8 does not fail the entry");
        assert_eq!(entry.tracestate(), None);
    }
}
