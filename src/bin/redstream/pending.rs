//! `pending` and `retries`: the entries a group holds, with redstream's own
//! attempts, retry times and last errors; `retries --now` makes waiting
//! entries due at once.

use redstream::broker::admin::PendingEntry;
use redstream::{Admin, RedisBroker};
use serde::Serialize;

use crate::output::{cell, check_entry_id, human, print_json, relative, table};
use crate::{Failure, check_group};

fn rows(entries: &[PendingEntry]) -> Vec<Vec<String>> {
    entries
        .iter()
        .map(|e| {
            vec![
                e.id.clone(),
                e.consumer.clone(),
                human(e.idle_ms),
                e.attempts.to_string(),
                e.retry_at_ms.map_or_else(|| "-".to_owned(), relative),
                e.event_type.clone().unwrap_or_else(|| "-".to_owned()),
                e.last_error
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |err| cell(err, 60)),
            ]
        })
        .collect()
}

const HEADER: [&str; 7] = [
    "ENTRY",
    "OWNER",
    "IDLE",
    "ATTEMPTS",
    "NEXT RETRY",
    "TYPE",
    "LAST ERROR",
];

pub(crate) async fn pending(
    broker: &RedisBroker,
    stream: &str,
    group: &str,
    count: usize,
    consumer: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    check_group(broker, stream, group).await?;
    if let Some(consumer) = consumer {
        let known = broker.consumers(stream, group).await?;
        if !known.iter().any(|c| c.name == consumer) {
            return Err(Failure::NotFound(format!(
                "no consumer `{consumer}` in group `{group}` of stream `{stream}` (see `redstream consumers {stream} {group}`)"
            )));
        }
    }
    let entries = broker
        .pending_entries(stream, group, count, consumer)
        .await?;
    if json {
        return print_json(&entries);
    }
    let whose = consumer.map_or_else(String::new, |c| format!(" held by `{c}`"));
    table(
        &HEADER,
        &rows(&entries),
        &format!("no pending entries in group `{group}` of stream `{stream}`{whose}"),
    );
    Ok(())
}

pub(crate) async fn retries(
    broker: &RedisBroker,
    stream: &str,
    group: &str,
    count: usize,
    json: bool,
) -> Result<(), Failure> {
    check_group(broker, stream, group).await?;
    let entries = broker.waiting_retries(stream, group, count).await?;
    if json {
        return print_json(&entries);
    }
    table(
        &HEADER,
        &rows(&entries),
        &format!("no entries of group `{group}` of stream `{stream}` are waiting for a retry"),
    );
    Ok(())
}

/// What `retries --now` did.
#[derive(Serialize)]
struct MadeDue {
    /// How many were waiting for a retry and are due now (the console's
    /// `retry-now` answers the same figure).
    made_due: u64,
    /// Their ids.
    due_now: Vec<String>,
    /// Ids asked for that were not waiting for a retry (left alone).
    not_waiting: Vec<String>,
}

/// `retries --now`: makes the entries among `ids` that wait for a retry
/// due now; "not found" (exit 3) when none was waiting.
pub(crate) async fn retry_now(
    broker: &RedisBroker,
    stream: &str,
    group: &str,
    ids: &[String],
    json: bool,
) -> Result<(), Failure> {
    for id in ids {
        check_entry_id(id, "entry id")?;
    }
    check_group(broker, stream, group).await?;
    let mut done = MadeDue {
        made_due: 0,
        due_now: Vec::new(),
        not_waiting: Vec::new(),
    };
    let mut seen = std::collections::HashSet::new();
    for id in ids.iter().filter(|id| seen.insert(id.as_str())) {
        // One id at a time, to say which ones were not waiting.
        if broker
            .retry_now(stream, group, std::slice::from_ref(id))
            .await?
            > 0
        {
            done.made_due += 1;
            done.due_now.push(id.clone());
        } else {
            done.not_waiting.push(id.clone());
        }
    }
    if json {
        print_json(&done)?;
    } else {
        println!(
            "{} of {} entries were waiting for a retry in group `{group}` of `{stream}` and are due now (the reclaimer redelivers them at its next check)",
            done.made_due,
            done.due_now.len() + done.not_waiting.len()
        );
        for id in &done.not_waiting {
            println!("  not waiting for a retry: {id}");
        }
    }
    if done.made_due == 0 {
        return Err(Failure::NotFound(format!(
            "none of these entries is waiting for a retry in group `{group}` of `{stream}` (see `redstream retries {stream} {group}`)"
        )));
    }
    Ok(())
}
