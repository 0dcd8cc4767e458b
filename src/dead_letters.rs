//! Reading dead letters back, and redriving them to their stream.
//!
//! A redrive republishes the original fields, event `id` included, to the
//! original stream, and deletes the dead letter only after that write
//! succeeded: a crash in between leaves both, and the duplicate is absorbed
//! by idempotent consumers. Every group of the stream sees the redriven
//! event again; groups that already processed it absorb it by its event id
//! (exactly-once handlers do so by themselves). Entries written without an
//! `id` get a new entry id and so a new fallback idempotency key.

use std::sync::Arc;

use serde::Serialize;

use crate::broker::{Admin, PublishItem, Streams};
use crate::error::Result;
use crate::wire::{
    DeadLetterReason, OutgoingEntry, RawEntry, dead_letter_field as f, dead_letter_stream, field,
};

/// A dead letter read back from `<stream>:dlq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeadLetterEntry {
    /// Its id in the dead-letter stream.
    pub id: String,
    /// The original entry id.
    pub origin_id: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// The group that gave up on it.
    pub group: String,
    /// Failed attempts.
    pub attempts: u32,
    /// When, in ms since the Unix epoch.
    pub failed_at_ms: u64,
    /// The last error, if an attempt failed.
    pub error: Option<String>,
    /// How many times the entry had been redriven before this letter was
    /// written (its `redrives` field; 0 for a first failure).
    pub redrives: u32,
    /// Original fields left out of the letter (past
    /// [`MAX_FIELDS`](crate::wire::MAX_FIELDS)); such a letter is not
    /// redriven.
    pub omitted_fields: u64,
    /// The original entry's fields (empty if its payload was trimmed away),
    /// lossily shown as text.
    #[serde(serialize_with = "lossy_fields")]
    pub original: Vec<(Vec<u8>, Vec<u8>)>,
}

fn lossy_fields<S: serde::Serializer>(
    fields: &[(Vec<u8>, Vec<u8>)],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(fields.len()))?;
    for (k, v) in fields {
        map.serialize_entry(&String::from_utf8_lossy(k), &String::from_utf8_lossy(v))?;
    }
    map.end()
}

impl DeadLetterEntry {
    /// Splits a dead-letter stream entry into its metadata and the
    /// original fields; `None` if it is not a dead letter.
    pub fn parse(raw: RawEntry) -> Option<Self> {
        let fields = raw.fields?;
        let mut letter = DeadLetterEntry {
            id: raw.id,
            origin_id: String::new(),
            reason: String::new(),
            group: String::new(),
            attempts: 0,
            failed_at_ms: 0,
            error: None,
            redrives: 0,
            omitted_fields: 0,
            original: Vec::new(),
        };
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        for (name, value) in fields {
            match name.as_slice() {
                n if n == f::REASON.as_bytes() => letter.reason = text(&value),
                n if n == f::ORIGIN_ID.as_bytes() => letter.origin_id = text(&value),
                n if n == f::GROUP.as_bytes() => letter.group = text(&value),
                n if n == f::ATTEMPTS.as_bytes() => {
                    letter.attempts = text(&value).parse().unwrap_or(0)
                }
                n if n == f::FAILED_AT.as_bytes() => {
                    letter.failed_at_ms = text(&value).parse().unwrap_or(0)
                }
                n if n == f::ERROR.as_bytes() => letter.error = Some(text(&value)),
                n if n == f::OMITTED_FIELDS.as_bytes() => {
                    letter.omitted_fields = text(&value).parse().unwrap_or(0)
                }
                n => {
                    let original = n
                        .strip_prefix(f::ORIGINAL_PREFIX.as_bytes())
                        .unwrap_or(n)
                        .to_vec();
                    letter.original.push((original, value));
                }
            }
        }
        letter.redrives = letter
            .original
            .iter()
            .find(|(name, _)| name.as_slice() == field::REDRIVES.as_bytes())
            .and_then(|(_, value)| std::str::from_utf8(value).ok()?.parse().ok())
            .unwrap_or(0);
        (!letter.origin_id.is_empty()).then_some(letter)
    }

    /// The original entry, ready to publish again (its `redrives` field one
    /// higher), or why it cannot be.
    pub fn original_entry(&self) -> std::result::Result<OutgoingEntry, String> {
        if self.original.is_empty() {
            return Err("its payload was trimmed away; nothing to redrive".to_owned());
        }
        if self.omitted_fields > 0 {
            return Err(format!(
                "{} of its fields were left out of the letter (too many fields); it cannot be redriven whole",
                self.omitted_fields
            ));
        }
        let mut fields = Vec::with_capacity(self.original.len());
        let mut event_id = None;
        for (name, value) in &self.original {
            let name = std::str::from_utf8(name)
                .map_err(|_| "a field name is not UTF-8; it would fail again".to_owned())?;
            if name == field::ID {
                event_id = Some(String::from_utf8_lossy(value).into_owned());
            }
            if name == field::REDRIVES {
                continue;
            }
            fields.push((std::borrow::Cow::Owned(name.to_owned()), value.clone()));
        }
        fields.push((
            std::borrow::Cow::Borrowed(field::REDRIVES),
            (self.redrives + 1).to_string().into_bytes(),
        ));
        Ok(OutgoingEntry {
            event_id: event_id.unwrap_or_default(),
            fields,
        })
    }
}

/// Dead letters counted by reason code and group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ReasonCount {
    /// The reason's code (`rejected`, `max_attempts_exceeded`, `bad_json`, …).
    pub reason: String,
    /// The group that gave up on them.
    pub group: String,
    /// How many.
    pub count: u64,
    /// The newest letter's error (or its reason, when it has none).
    pub newest_error: Option<String>,
}

/// Counts letters (oldest first) by reason code and group, most first.
pub fn by_reason<'a>(letters: impl IntoIterator<Item = &'a DeadLetterEntry>) -> Vec<ReasonCount> {
    let mut by: std::collections::BTreeMap<(String, String), ReasonCount> = Default::default();
    for letter in letters {
        let code = DeadLetterReason::code_of(&letter.reason).to_owned();
        let entry = by
            .entry((code.clone(), letter.group.clone()))
            .or_insert_with(|| ReasonCount {
                reason: code,
                group: letter.group.clone(),
                ..ReasonCount::default()
            });
        entry.count += 1;
        // Oldest first: the last one seen is the newest.
        entry.newest_error = letter.error.clone().or_else(|| Some(letter.reason.clone()));
    }
    let mut counts: Vec<ReasonCount> = by.into_values().collect();
    counts.sort_by_key(|c| std::cmp::Reverse(c.count));
    counts
}

/// Which dead letters to redrive.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Selection {
    /// Every dead letter of the stream.
    All,
    /// These dead-letter ids.
    Ids(Vec<String>),
    /// Every dead letter whose reason has this code (`rejected`,
    /// `max_attempts_exceeded`, `bad_json`, …; see
    /// [`DeadLetterReason::code_of`](crate::DeadLetterReason::code_of)).
    Reason(String),
    /// Every dead letter that this group wrote with a reason of this code
    /// (one row of [`by_reason`]).
    GroupReason {
        /// The group that gave up on them.
        group: String,
        /// The reason's code.
        reason: String,
    },
}

/// The dead letters a [`Selection`] names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Selected {
    /// The letters found, oldest first.
    pub letters: Vec<DeadLetterEntry>,
    /// Ids asked for that are not in the dead-letter stream.
    pub not_found: Vec<String>,
}

/// Every dead letter of `stream`, oldest first, read a page at a time.
pub async fn all_letters<B>(broker: &B, stream: &str) -> Result<Vec<DeadLetterEntry>>
where
    B: Admin + ?Sized,
{
    let dlq = dead_letter_stream(stream);
    let mut all = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let page = broker.range(&dlq, &start, "+", PAGE).await?;
        let full = page.len() == PAGE;
        if let Some(last) = page.last() {
            start = format!("({}", last.id);
        }
        all.extend(page.into_iter().filter_map(DeadLetterEntry::parse));
        if !full {
            return Ok(all);
        }
    }
}

/// The dead letters of `stream` that `selection` names (what a redrive
/// would take: a dry run shows these).
pub async fn select<B>(broker: &B, stream: &str, selection: &Selection) -> Result<Selected>
where
    B: Admin + ?Sized,
{
    let mut selected = Selected::default();
    match selection {
        Selection::All => selected.letters = all_letters(broker, stream).await?,
        Selection::Reason(code) => {
            selected.letters = all_letters(broker, stream).await?;
            selected
                .letters
                .retain(|l| DeadLetterReason::code_of(&l.reason) == code);
        }
        Selection::GroupReason { group, reason } => {
            selected.letters = all_letters(broker, stream).await?;
            selected
                .letters
                .retain(|l| &l.group == group && DeadLetterReason::code_of(&l.reason) == reason);
        }
        Selection::Ids(ids) => {
            let dlq = dead_letter_stream(stream);
            for id in ids {
                match broker.range(&dlq, id, id, 1).await?.pop() {
                    Some(raw) => selected.letters.extend(DeadLetterEntry::parse(raw)),
                    None => selected.not_found.push(id.clone()),
                }
            }
        }
    }
    Ok(selected)
}

/// What a redrive did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RedriveReport {
    /// Republished and removed from the dead-letter stream.
    pub redriven: u64,
    /// Left in place, with why.
    pub skipped: Vec<(String, String)>,
    /// Ids asked for that are not in the dead-letter stream.
    pub not_found: Vec<String>,
}

/// Letters read and republished per round trip.
const PAGE: usize = 100;

/// Redrives dead letters of `stream` back to it. `progress` is called with
/// (done, total) after each page.
pub async fn redrive<B>(
    broker: &B,
    stream: &str,
    selection: &Selection,
    progress: impl FnMut(u64, u64),
) -> Result<RedriveReport>
where
    B: Streams + Admin + ?Sized,
{
    redrive_through(broker, broker, stream, selection, progress).await
}

/// [`redrive`], with the writes and the reads through separate handles
/// (the processor holds its broker's two sides apart).
pub(crate) async fn redrive_through<S, A>(
    streams: &S,
    admin: &A,
    stream: &str,
    selection: &Selection,
    mut progress: impl FnMut(u64, u64),
) -> Result<RedriveReport>
where
    S: Streams + ?Sized,
    A: Admin + ?Sized,
{
    let dlq = dead_letter_stream(stream);
    let Selected { letters, not_found } = select(admin, stream, selection).await?;
    let mut report = RedriveReport {
        not_found,
        ..RedriveReport::default()
    };
    let total = letters.len() as u64;
    let stream: Arc<str> = Arc::from(stream);
    let mut done = 0;
    for page in letters.chunks(PAGE) {
        let mut items = Vec::with_capacity(page.len());
        let mut sources = Vec::with_capacity(page.len());
        for letter in page {
            match letter.original_entry() {
                Ok(entry) => {
                    items.push(PublishItem {
                        stream: Arc::clone(&stream),
                        entry,
                        max_len: None,
                    });
                    sources.push(letter.id.clone());
                }
                Err(why) => report.skipped.push((letter.id.clone(), why)),
            }
        }
        let results = streams.publish(&items).await?;
        let mut written = Vec::with_capacity(sources.len());
        for (id, result) in sources.into_iter().zip(results) {
            match result {
                Ok(_) => written.push(id),
                Err(e) => report.skipped.push((id, format!("publish failed: {e}"))),
            }
        }
        // Only what is safely back in the stream leaves the dead letters.
        admin.delete(&dlq, &written).await?;
        report.redriven += written.len() as u64;
        done += page.len() as u64;
        progress(done, total);
    }
    Ok(report)
}

/// What a deletion of dead letters did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeleteReport {
    /// Removed from the dead-letter stream.
    pub deleted: u64,
    /// Ids asked for that are not in the dead-letter stream.
    pub not_found: Vec<String>,
}

/// Deletes the dead letters of `stream` that `selection` names, for good
/// (their events are not redriven: use it for letters nobody needs).
pub async fn delete<B>(broker: &B, stream: &str, selection: &Selection) -> Result<DeleteReport>
where
    B: Admin + ?Sized,
{
    let dlq = dead_letter_stream(stream);
    let Selected { letters, not_found } = select(broker, stream, selection).await?;
    let mut report = DeleteReport {
        not_found,
        ..DeleteReport::default()
    };
    let ids: Vec<String> = letters.into_iter().map(|l| l.id).collect();
    for page in ids.chunks(PAGE) {
        report.deleted += broker.delete(&dlq, page).await?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::DeadLetter;
    use crate::wire::dead_letter_fields;

    #[test]
    fn a_dead_letter_reads_back_to_its_original_fields() {
        let original: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"id".to_vec(), b"E1".to_vec()),
            (b"reason".to_vec(), b"theirs".to_vec()),
            (b"data".to_vec(), b"{}".to_vec()),
        ];
        let letter = DeadLetter {
            origin_id: "5-0".into(),
            fields: original.clone(),
            reason: crate::wire::DeadLetterReason::Rejected("no".into()),
            attempts: 2,
            error: Some("boom".into()),
            failed_at_ms: 42,
        };
        let raw = RawEntry {
            id: "9-0".into(),
            fields: Some(dead_letter_fields(&letter, "g")),
        };
        let back = DeadLetterEntry::parse(raw).expect("a dead letter");
        assert_eq!(back.origin_id, "5-0");
        assert_eq!(back.reason, "rejected: no");
        assert_eq!(
            (back.group.as_str(), back.attempts, back.failed_at_ms),
            ("g", 2, 42)
        );
        assert_eq!(back.error.as_deref(), Some("boom"));
        assert_eq!(
            back.original, original,
            "a colliding field comes back under its own name"
        );
        let entry = back.original_entry().expect("redrivable");
        assert_eq!(entry.event_id, "E1");
        assert_eq!(back.redrives, 0, "never redriven");
        let redrives = |fields: &[(std::borrow::Cow<'static, str>, Vec<u8>)]| {
            fields
                .iter()
                .filter(|(n, _)| n == "redrives")
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(redrives(&entry.fields), ["1"], "a redrive counts itself");

        // Dead-lettered again after two redrives: the letter says so, and
        // the next redrive writes one field with the next count.
        let mut again = original.clone();
        again.push((b"redrives".to_vec(), b"2".to_vec()));
        let raw = RawEntry {
            id: "10-0".into(),
            fields: Some(dead_letter_fields(
                &DeadLetter {
                    fields: again,
                    ..letter
                },
                "g",
            )),
        };
        let back = DeadLetterEntry::parse(raw).expect("a dead letter");
        assert_eq!(back.redrives, 2);
        let entry = back.original_entry().expect("redrivable");
        assert_eq!(redrives(&entry.fields), ["3"]);
    }
}
