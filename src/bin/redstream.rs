//! `redstream`: the operator CLI. Look at streams, groups and dead letters,
//! redrive dead letters, and trim streams without losing what a group still
//! needs.
//!
//! ```text
//! redstream status                          # every stream with groups
//! redstream pending orders order-processing
//! redstream dlq list orders
//! redstream dlq show 1732262400000-0
//! redstream dlq redrive orders --all
//! redstream trim orders --dry-run
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use redstream::broker::Diagnostics;
use redstream::broker::admin::StreamInfo;
use redstream::dead_letters::{DeadLetterEntry, Selection, redrive};
use redstream::{Admin, RedisBroker, RedisUrl, Settings, dead_letter_stream};
use serde::Serialize;

const EXIT_CODES: &str = "Exit codes: 0 done, 1 failed, 2 bad usage, 3 stream, group or entry not found, 4 Redis unreachable.";

/// Look at and repair redstream's streams, groups and dead letters.
#[derive(Parser)]
#[command(name = "redstream", version, after_help = EXIT_CODES)]
struct Cli {
    /// Redis URL [default: from settings/ and REDSTREAM__REDIS__URL, else redis://127.0.0.1:6379]
    #[arg(long, global = true)]
    redis_url: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Streams and their groups: consumers, lag, pending, oldest pending,
    /// dead-letter depth.
    Status {
        /// Which streams, as a glob pattern.
        #[arg(default_value = "*")]
        pattern: String,
    },
    /// The server: its name and version, the newer stream commands
    /// redstream uses on it, and settings that can lose stream data.
    Server,
    /// The pending entries of a group: owner, idle time, deliveries.
    Pending {
        /// The stream.
        stream: String,
        /// The group.
        group: String,
        /// Most entries to show.
        #[arg(long, default_value_t = 50)]
        count: usize,
        /// Only this consumer's entries.
        #[arg(long)]
        consumer: Option<String>,
    },
    /// Dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Remove the entries every group has acked (never one a group still
    /// needs).
    Trim {
        /// The stream.
        stream: String,
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// The dead letters of a stream, oldest first.
    List {
        /// The stream (its dead letters are in `<stream>:dlq`).
        stream: String,
        /// Most letters to show.
        #[arg(long, default_value_t = 50)]
        count: usize,
    },
    /// One dead letter, with its original fields.
    Show {
        /// The dead letter's id.
        id: String,
        /// The stream, if known (otherwise every `*:dlq` is searched).
        #[arg(long)]
        stream: Option<String>,
    },
    /// Republish dead letters to their stream, keeping their event ids, and
    /// remove each once its republish succeeded.
    Redrive {
        /// The stream.
        stream: String,
        /// Dead-letter ids to redrive.
        #[arg(long = "id", required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Redrive every dead letter of the stream.
        #[arg(long)]
        all: bool,
    },
}

/// Why a command failed, and its exit code.
enum Failure {
    NotFound(String),
    Unreachable(String),
    Failed(String),
}

impl From<redstream::Error> for Failure {
    fn from(e: redstream::Error) -> Self {
        if e.needs_reconnect()
            || matches!(&e, redstream::Error::Redis(r) if r.is_connection_refusal())
        {
            Failure::Unreachable(e.to_string())
        } else if e.is_missing_group() {
            Failure::NotFound(e.to_string())
        } else {
            Failure::Failed(e.to_string())
        }
    }
}

#[actix_rt::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Failed(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(Failure::NotFound(e)) => {
            eprintln!("not found: {e}");
            ExitCode::from(3)
        }
        Err(Failure::Unreachable(e)) => {
            eprintln!("Redis unreachable: {e}");
            ExitCode::from(4)
        }
    }
}

async fn connect(url: Option<&str>) -> Result<RedisBroker, Failure> {
    let mut settings = Settings::load().map_err(|e| Failure::Failed(e.to_string()))?;
    if let Some(url) = url {
        settings.redis.url = url
            .parse::<RedisUrl>()
            .map_err(|e| Failure::Failed(e.to_string()))?;
    }
    settings.redis.connect_timeout_ms = settings.redis.connect_timeout_ms.min(3_000);
    let shown = settings.redis.url.to_string();
    RedisBroker::connect(&settings.redis, "cli")
        .await
        .map_err(|e| Failure::Unreachable(format!("{shown}: {e}")))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let broker = connect(cli.redis_url.as_deref()).await?;
    match cli.command {
        Command::Status { pattern } => status(&broker, &pattern, cli.json).await,
        Command::Server => server(&broker, cli.json).await,
        Command::Pending {
            stream,
            group,
            count,
            consumer,
        } => {
            pending(
                &broker,
                &stream,
                &group,
                count,
                consumer.as_deref(),
                cli.json,
            )
            .await
        }
        Command::Dlq(DlqCommand::List { stream, count }) => {
            dlq_list(&broker, &stream, count, cli.json).await
        }
        Command::Dlq(DlqCommand::Show { id, stream }) => {
            dlq_show(&broker, &id, stream.as_deref(), cli.json).await
        }
        Command::Dlq(DlqCommand::Redrive { stream, ids, all }) => {
            let selection = if all {
                Selection::All
            } else {
                Selection::Ids(ids)
            };
            dlq_redrive(&broker, &stream, &selection, cli.json).await
        }
        Command::Trim { stream, dry_run } => trim(&broker, &stream, dry_run, cli.json).await,
    }
}

fn print_json<T: Serialize>(value: &T) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Failure::Failed(e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// Prints rows as aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// "3.2 s", "5 min", "2.0 h" for a duration in ms.
fn human(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..120_000 => format!("{:.1} s", ms as f64 / 1000.0),
        120_000..7_200_000 => format!("{} min", ms / 60_000),
        _ => format!("{:.1} h", ms as f64 / 3_600_000.0),
    }
}

fn age_of_id(id: &str) -> Option<u64> {
    let ms: u64 = id.split('-').next()?.parse().ok()?;
    Some(now_ms().saturating_sub(ms))
}

async fn stream_info(broker: &RedisBroker, stream: &str) -> Result<StreamInfo, Failure> {
    broker
        .stream_info(stream)
        .await?
        .ok_or_else(|| Failure::NotFound(format!("no stream `{stream}`")))
}

#[derive(Serialize)]
struct ServerView {
    server: String,
    redis_version: String,
    xackdel: bool,
    trim_acked: bool,
    warnings: Vec<String>,
}

async fn server(broker: &RedisBroker, json: bool) -> Result<(), Failure> {
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

async fn status(broker: &RedisBroker, pattern: &str, json: bool) -> Result<(), Failure> {
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
    for s in &infos {
        if s.groups.is_empty() {
            rows.push(vec![
                s.stream.clone(),
                "(no groups)".into(),
                s.length.to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                s.dead_letters.to_string(),
            ]);
        }
        for g in &s.groups {
            rows.push(vec![
                s.stream.clone(),
                g.name.clone(),
                s.length.to_string(),
                g.consumers.to_string(),
                g.lag.map_or("?".into(), |l| l.to_string()),
                g.pending.to_string(),
                g.waiting_retry.to_string(),
                g.oldest_pending_id
                    .as_deref()
                    .and_then(age_of_id)
                    .map_or("-".into(), human),
                s.dead_letters.to_string(),
            ]);
        }
    }
    table(
        &[
            "STREAM",
            "GROUP",
            "LENGTH",
            "CONSUMERS",
            "LAG",
            "PENDING",
            "WAITING RETRY",
            "OLDEST PENDING",
            "DEAD LETTERS",
        ],
        &rows,
    );
    Ok(())
}

async fn pending(
    broker: &RedisBroker,
    stream: &str,
    group: &str,
    count: usize,
    consumer: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    let info = stream_info(broker, stream).await?;
    if !info.groups.iter().any(|g| g.name == group) {
        return Err(Failure::NotFound(format!(
            "no group `{group}` on stream `{stream}`"
        )));
    }
    let entries = broker
        .pending_entries(stream, group, count, consumer)
        .await?;
    if json {
        return print_json(&entries);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.id.clone(),
                e.consumer.clone(),
                human(e.idle_ms),
                e.deliveries.to_string(),
            ]
        })
        .collect();
    table(&["ENTRY", "OWNER", "IDLE", "DELIVERIES"], &rows);
    Ok(())
}

async fn dlq_list(
    broker: &RedisBroker,
    stream: &str,
    count: usize,
    json: bool,
) -> Result<(), Failure> {
    stream_info(broker, stream).await?;
    let letters: Vec<DeadLetterEntry> = broker
        .range(&dead_letter_stream(stream), "-", "+", count)
        .await?
        .into_iter()
        .filter_map(DeadLetterEntry::parse)
        .collect();
    if json {
        return print_json(&letters);
    }
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            vec![
                l.id.clone(),
                l.origin_id.clone(),
                l.group.clone(),
                l.attempts.to_string(),
                format!("{} ago", human(now_ms().saturating_sub(l.failed_at_ms))),
                l.reason.clone(),
            ]
        })
        .collect();
    table(
        &["ID", "ORIGIN", "GROUP", "ATTEMPTS", "FAILED", "REASON"],
        &rows,
    );
    Ok(())
}

async fn dlq_show(
    broker: &RedisBroker,
    id: &str,
    stream: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    let dlqs = match stream {
        Some(s) => vec![dead_letter_stream(s)],
        None => broker.streams("*:dlq").await?,
    };
    for dlq in dlqs {
        if let Some(raw) = broker.range(&dlq, id, id, 1).await?.pop()
            && let Some(letter) = DeadLetterEntry::parse(raw)
        {
            if json {
                return print_json(&letter);
            }
            println!("dead letter {} in {dlq}", letter.id);
            println!("  origin id: {}", letter.origin_id);
            println!("  group:     {}", letter.group);
            println!("  attempts:  {}", letter.attempts);
            println!(
                "  failed:    {} ago",
                human(now_ms().saturating_sub(letter.failed_at_ms))
            );
            println!("  reason:    {}", letter.reason);
            if let Some(error) = &letter.error {
                println!("  error:     {error}");
            }
            println!("  original fields:");
            for (k, v) in &letter.original {
                println!(
                    "    {} = {}",
                    String::from_utf8_lossy(k),
                    String::from_utf8_lossy(v)
                );
            }
            return Ok(());
        }
    }
    Err(Failure::NotFound(format!("no dead letter `{id}`")))
}

async fn dlq_redrive(
    broker: &RedisBroker,
    stream: &str,
    selection: &Selection,
    json: bool,
) -> Result<(), Failure> {
    stream_info(broker, stream).await?;
    let report = redrive(broker, stream, selection, |done, total| {
        if total > 100 {
            eprint!("\rredriving: {done}/{total}");
            if done == total {
                eprintln!();
            }
        }
    })
    .await?;
    if json {
        print_json(&report)?;
    } else {
        println!("redriven {} dead letters to `{stream}`", report.redriven);
        for (id, why) in &report.skipped {
            println!("  skipped {id}: {why}");
        }
        for id in &report.not_found {
            println!("  not found: {id}");
        }
    }
    if !report.skipped.is_empty() {
        return Err(Failure::Failed(format!(
            "{} dead letters could not be redriven",
            report.skipped.len()
        )));
    }
    if !report.not_found.is_empty() {
        return Err(Failure::NotFound(format!(
            "{} dead-letter ids were not in `{}`",
            report.not_found.len(),
            dead_letter_stream(stream)
        )));
    }
    Ok(())
}

#[derive(Serialize)]
struct TrimResult {
    #[serde(flatten)]
    plan: redstream::broker::admin::TrimPlan,
    dry_run: bool,
    removed: u64,
}

async fn trim(
    broker: &RedisBroker,
    stream: &str,
    dry_run: bool,
    json: bool,
) -> Result<(), Failure> {
    stream_info(broker, stream).await?;
    let plan = broker.trim_plan(stream).await?;
    let removed = match (&plan.min_id, dry_run) {
        (Some(min), false) => broker.trim_acked_below(stream, min).await?,
        _ => 0,
    };
    if json {
        return print_json(&TrimResult {
            plan,
            dry_run,
            removed,
        });
    }
    for (group, id) in &plan.needed_by {
        println!("group `{group}` still needs entries from {id}");
    }
    match (&plan.min_id, dry_run) {
        (None, _) => {
            println!("nothing can be trimmed from `{stream}`: no group has finished any entry")
        }
        (Some(min), true) => println!(
            "would remove {} entries below {min} from `{stream}` (dry run)",
            plan.removable
        ),
        (Some(min), false) => println!("removed {removed} entries below {min} from `{stream}`"),
    }
    Ok(())
}
