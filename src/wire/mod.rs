//! The wire format: how an event is laid out as a stream entry, and how a
//! dead letter is.
//!
//! | file | holds |
//! |---|---|
//! | `event.rs` | [`Event`] (what a producer publishes) and the fields it is written as |
//! | `entry.rs` | [`RawEntry`] and [`Entry`] (what a member reads), decoding, [`DecodeError`] |
//! | `dead_letter.rs` | [`DeadLetter`], [`DeadLetterReason`], the dead-letter stream's fields |
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
//! | `tracestate` | W3C trace state, beside `traceparent` |
//!
//! An entry without `data` is delivered too: its non-reserved fields, as a
//! JSON object of strings, are the payload. Decoding is per entry; an entry
//! that cannot be decoded becomes a [`DecodeError`] with a specific reason
//! and goes to the dead-letter stream, and its batch-mates are unaffected.

mod dead_letter;
mod entry;
mod event;

pub(crate) use self::dead_letter::dead_letter_fields;
pub use self::dead_letter::{DeadLetter, DeadLetterReason, dead_letter_field, dead_letter_stream};
pub use self::entry::{DecodeError, Entry, RawEntry};
pub use self::event::{Event, OutgoingEntry};

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
    /// W3C trace state (vendor entries beside `traceparent`).
    pub const TRACESTATE: &str = "tracestate";
    /// How many times the entry was redriven from the dead-letter stream
    /// (absent: never); a letter written for it again carries the count.
    pub const REDRIVES: &str = "redrives";
    /// All reserved field names.
    pub const RESERVED: [&str; 9] = [
        ID,
        TYPE,
        VERSION,
        DATA,
        TS,
        KEY,
        TRACEPARENT,
        TRACESTATE,
        REDRIVES,
    ];
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
