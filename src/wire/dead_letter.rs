//! Dead letters: the letter the runtime writes, why it was written
//! ([`DeadLetterReason`]), and the fields it is stored as in
//! `<stream>:dlq` (the original fields plus [`dead_letter_field`]s).

use super::{DecodeError, MAX_FIELDS};

/// The name of the dead-letter stream of `stream`: `<stream>:dlq`.
pub fn dead_letter_stream(stream: &str) -> String {
    format!("{stream}:dlq")
}

/// An entry to move to the dead-letter stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The original entry id.
    pub origin_id: String,
    /// The original fields (empty if the payload was trimmed away).
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// Why.
    pub reason: DeadLetterReason,
    /// Failed attempts.
    pub attempts: u32,
    /// The last error, if an attempt failed.
    pub error: Option<String>,
    /// When it was dead-lettered (ms since the epoch, the writer's wall
    /// clock: data for people, never compared to decide anything).
    pub failed_at_ms: u64,
}

/// Why an entry was dead-lettered. Written to the letter's `reason` field
/// as a stable code, a colon and details (the text of the first releases,
/// so letters written by them read back and redrive the same):
///
/// | variant | `reason` |
/// |---|---|
/// | [`Undecodable`](DeadLetterReason::Undecodable) | the decode error's: `bad_json: …`, `unknown_schema_version: …`, `too_many_fields: …`, `trimmed_while_pending: …`, … |
/// | [`Rejected`](DeadLetterReason::Rejected) | `rejected: <the handler's reason>` |
/// | [`AttemptsExhausted`](DeadLetterReason::AttemptsExhausted) | `max_attempts_exceeded: <n> attempts failed` |
/// | [`BudgetSpent`](DeadLetterReason::BudgetSpent) | `max_attempts_exceeded: the attempt budget was already spent` |
///
/// ```
/// use redstream::{DeadLetterReason, DecodeError};
///
/// let r = DeadLetterReason::Rejected("endpoint_disabled: `hooks-7` is disabled".into());
/// assert_eq!(r.to_string(), "rejected: endpoint_disabled: `hooks-7` is disabled");
/// assert_eq!(r.code(), "rejected");
/// assert_eq!(DeadLetterReason::AttemptsExhausted { attempts: 4 }.code(), "max_attempts_exceeded");
/// assert_eq!(DeadLetterReason::Undecodable(DecodeError::Trimmed).code(), "trimmed_while_pending");
/// assert_eq!(DeadLetterReason::code_of("bad_json: expected value"), "bad_json");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The entry could not be decoded: a malformed field, JSON that does not
    /// fit the handler's event type, a schema version it cannot read, or a
    /// payload trimmed away while pending. Never handed to a handler.
    Undecodable(DecodeError),
    /// The handler returned [`Outcome::DeadLetter`](crate::Outcome::DeadLetter)
    /// with this reason (e.g. a declined card, an endpoint disabled).
    Rejected(String),
    /// Every attempt the retry policy allows failed.
    AttemptsExhausted {
        /// Attempts made.
        attempts: u32,
    },
    /// Delivered again with its attempt budget already spent (the last
    /// failure was recorded, then the process stopped before the letter
    /// was written).
    BudgetSpent,
}

impl DeadLetterReason {
    /// The stable code: the part of the `reason` field before the first
    /// colon (`rejected`, `max_attempts_exceeded`, `bad_json`, …).
    pub fn code(&self) -> &'static str {
        match self {
            DeadLetterReason::Undecodable(e) => e.code(),
            DeadLetterReason::Rejected(_) => "rejected",
            DeadLetterReason::AttemptsExhausted { .. } | DeadLetterReason::BudgetSpent => {
                "max_attempts_exceeded"
            }
        }
    }

    /// The code of a `reason` field read back from a dead-letter stream
    /// (letters written by other tools included): the text before the
    /// first colon, trimmed.
    pub fn code_of(reason: &str) -> &str {
        reason.split(':').next().unwrap_or(reason).trim()
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeadLetterReason::Undecodable(e) => write!(f, "{e}"),
            DeadLetterReason::Rejected(reason) => write!(f, "rejected: {reason}"),
            DeadLetterReason::AttemptsExhausted { attempts } => {
                write!(f, "max_attempts_exceeded: {attempts} attempts failed")
            }
            DeadLetterReason::BudgetSpent => {
                write!(
                    f,
                    "max_attempts_exceeded: the attempt budget was already spent"
                )
            }
        }
    }
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
pub(crate) fn dead_letter_fields(letter: &DeadLetter, group: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    use dead_letter_field as f;
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (f::REASON.into(), letter.reason.to_string().into_bytes()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason's code is the text before its first colon: what
    /// [`DeadLetterReason::code_of`] finds in letters read back.
    #[test]
    fn each_code_is_the_prefix_of_its_reason() {
        let field = || "v".to_owned();
        let reasons = [
            DeadLetterReason::Undecodable(DecodeError::Trimmed),
            DeadLetterReason::Undecodable(DecodeError::FieldNameNotUtf8 { index: 2 }),
            DeadLetterReason::Undecodable(DecodeError::FieldNotUtf8 { field: field() }),
            DeadLetterReason::Undecodable(DecodeError::DuplicateField { field: field() }),
            DeadLetterReason::Undecodable(DecodeError::TooManyFields { count: 2, max: 1 }),
            DeadLetterReason::Undecodable(DecodeError::Oversized {
                field: field(),
                len: 2,
                max: 1,
            }),
            DeadLetterReason::Undecodable(DecodeError::NotANumber { field: field() }),
            DeadLetterReason::Undecodable(DecodeError::BadJson {
                detail: "x: y".into(),
            }),
            DeadLetterReason::Undecodable(DecodeError::UnknownVersion {
                version: 3,
                current: 2,
            }),
            DeadLetterReason::Undecodable(DecodeError::UpcastFailed {
                from: 1,
                detail: "x".into(),
            }),
            DeadLetterReason::Rejected("endpoint_disabled: off".into()),
            DeadLetterReason::AttemptsExhausted { attempts: 4 },
            DeadLetterReason::BudgetSpent,
        ];
        for r in reasons {
            let text = r.to_string();
            assert_eq!(DeadLetterReason::code_of(&text), r.code(), "{text}");
        }
        // The texts the first releases wrote.
        assert_eq!(
            DeadLetterReason::AttemptsExhausted { attempts: 4 }.to_string(),
            "max_attempts_exceeded: 4 attempts failed"
        );
        assert_eq!(
            DeadLetterReason::BudgetSpent.to_string(),
            "max_attempts_exceeded: the attempt budget was already spent"
        );
        assert_eq!(
            DeadLetterReason::Rejected("no".into()).to_string(),
            "rejected: no"
        );
    }
}
