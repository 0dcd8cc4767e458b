//! `pending` and `retries`: the entries a group holds, with redstream's own
//! attempts, retry times and last errors.

use redstream::broker::admin::PendingEntry;
use redstream::{Admin, RedisBroker};

use crate::output::{cell, human, print_json, relative, table};
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
