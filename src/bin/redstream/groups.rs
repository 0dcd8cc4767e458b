//! `status`, `server` and `consumers`: what the groups are doing and who
//! serves them.

use redstream::broker::admin::ConsumerInfo;
use redstream::broker::{Diagnostics, GroupRef, MemberPresence};
use redstream::{Admin, RedisBroker};
use serde::Serialize;

use crate::output::{human, human_or_dash, now_ms, print_json, table};

/// A consumer as Redis knows it, with what its process last recorded.
#[derive(Serialize)]
struct ConsumerView {
    #[serde(flatten)]
    consumer: ConsumerInfo,
    /// The process's record of this member (restarts, since, entries in
    /// flight, last error).
    record: Option<MemberPresence>,
}
use crate::{Failure, check_group};

#[derive(Serialize)]
struct ServerView {
    server: String,
    redis_version: String,
    xackdel: bool,
    trim_acked: bool,
    warnings: Vec<String>,
}

pub(crate) async fn server(broker: &RedisBroker, json: bool) -> Result<(), Failure> {
    let report = broker.server_report().await?;
    if json {
        return print_json(&ServerView {
            server: report.server,
            redis_version: report.version,
            xackdel: report.features.xackdel,
            trim_acked: report.features.trim_acked,
            warnings: report.warnings,
        });
    }
    println!(
        "server: {} (redis_version {})",
        report.server, report.version
    );
    println!("newer commands used: {}", report.features.describe());
    for w in &report.warnings {
        println!("warning: {w}");
    }
    Ok(())
}

pub(crate) async fn status(broker: &RedisBroker, pattern: &str, json: bool) -> Result<(), Failure> {
    let mut infos = Vec::new();
    let mut refused = 0usize;
    for stream in broker.streams(pattern).await? {
        // SCAN lists every key; an ACL user restricted to some key patterns
        // may not read the others: skip those rather than fail.
        match broker.stream_info(&stream).await {
            Ok(Some(info)) => infos.push(info),
            Ok(None) => {}
            Err(e) if e.redis_code() == Some("NOPERM") => refused += 1,
            Err(e) => return Err(e.into()),
        }
    }
    if refused > 0 {
        eprintln!("{refused} stream(s) skipped: this Redis user may not read them (NOPERM)");
    }
    if infos.is_empty() && pattern != "*" {
        return Err(Failure::NotFound(format!("no stream matches `{pattern}`")));
    }
    if json {
        return print_json(&infos);
    }
    let mut rows = Vec::new();
    let mut unattended = Vec::new();
    for s in &infos {
        if s.groups.is_empty() {
            let mut row = vec![s.stream.clone(), "(no groups)".into(), s.length.to_string()];
            row.extend(std::iter::repeat_n("-".to_owned(), 7));
            row.push(s.dead_letters.to_string());
            rows.push(row);
        }
        for g in &s.groups {
            let live = match (g.live_members, g.live_processes) {
                (0, _) => "none".to_owned(),
                (m, 1) => format!("{m} in 1 process"),
                (m, p) => format!("{m} in {p} processes"),
            };
            if g.unattended() {
                unattended.push(format!("{}/{}", s.stream, g.name));
            }
            rows.push(vec![
                s.stream.clone(),
                g.name.clone(),
                s.length.to_string(),
                live,
                g.consumers.to_string(),
                g.lag.map_or("?".into(), |l| l.to_string()),
                g.pending.to_string(),
                g.waiting_retry.to_string(),
                human_or_dash(g.longest_pending_ms),
                human_or_dash(g.queue_latency_ms),
                s.dead_letters.to_string(),
            ]);
        }
    }
    table(
        &[
            "STREAM",
            "GROUP",
            "LENGTH",
            "LIVE MEMBERS",
            "CONSUMERS",
            "LAG",
            "PENDING",
            "WAITING RETRY",
            "LONGEST PENDING",
            "QUEUE LATENCY",
            "DEAD LETTERS",
        ],
        &rows,
        "no streams",
    );
    for group in &unattended {
        println!("warning: `{group}` has work and no live process serves it");
    }
    Ok(())
}

pub(crate) async fn consumers(
    broker: &RedisBroker,
    stream: &str,
    group: &str,
    json: bool,
) -> Result<(), Failure> {
    check_group(broker, stream, group).await?;
    let consumers = broker.consumers(stream, group).await?;
    // What each process last recorded of its members (restarts, since,
    // entries in flight); a user that may not read the records gets the
    // rest.
    let presence = broker
        .presence(&GroupRef::new(stream, group))
        .await
        .unwrap_or_default();
    let views: Vec<ConsumerView> = consumers
        .into_iter()
        .map(|c| ConsumerView {
            record: presence.iter().find(|p| p.name == c.name).cloned(),
            consumer: c,
        })
        .collect();
    if json {
        return print_json(&views);
    }
    let now = now_ms();
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let c = &v.consumer;
            let record = v.record.as_ref();
            vec![
                c.name.clone(),
                match (c.live(), record.is_some_and(|r| !r.running)) {
                    (true, true) => "live, restarting",
                    (true, false) => "live",
                    (false, _) => "stale",
                }
                .to_owned(),
                c.held_by.clone().unwrap_or_else(|| "-".to_owned()),
                human(c.idle_ms),
                c.pending.to_string(),
                // A figure of the moment: only from a record still fresh.
                record
                    .filter(|r| r.fresh_at(now))
                    .map_or_else(|| "-".to_owned(), |r| r.in_flight.to_string()),
                record.map_or_else(|| "-".to_owned(), |r| r.restarts.to_string()),
                record.map_or_else(|| "-".to_owned(), |r| human(now.saturating_sub(r.since_ms))),
            ]
        })
        .collect();
    table(
        &[
            "CONSUMER",
            "STATE",
            "HELD BY (host/pid/process)",
            "IDLE",
            "PENDING",
            "IN-FLIGHT",
            "RESTARTS",
            "UP",
        ],
        &rows,
        &format!("group `{group}` has no consumers"),
    );
    Ok(())
}
