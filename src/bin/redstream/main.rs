//! `redstream`: the operator CLI. Look at streams, groups, consumers,
//! pending entries, retries and dead letters; redrive dead letters; trim
//! streams without losing what a group still needs.
//!
//! ```text
//! redstream status                          # every stream with groups
//! redstream consumers orders order-processing
//! redstream pending orders order-processing
//! redstream retries orders order-processing
//! redstream retries orders order-processing --now 1732262400000-0
//! redstream dlq list orders --by-reason
//! redstream dlq show 1732262400000-0
//! redstream dlq redrive orders --reason rejected --dry-run
//! redstream dlq delete orders --reason bad_json --yes
//! redstream trim orders --dry-run
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod dlq;
mod groups;
mod manage;
mod output;
mod pending;
mod trim;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use redis::{AsyncConnectionConfig, ErrorKind};
use redstream::broker::admin::{GroupSummary, StreamInfo};
use redstream::{Admin, RedisBroker, RedisUrl, Settings};

const EXIT_CODES: &str = "Exit codes: 0 done, 1 failed (or cancelled at the prompt), 2 bad usage, \
3 stream, group, consumer or entry not found, 4 Redis unreachable (refused, timed out, or not a Redis server), \
5 access refused (wrong password, or the ACL user may not run the command).";

/// Look at and repair redstream's streams, groups and dead letters.
#[derive(Parser)]
#[command(name = "redstream", version = VERSION, after_help = EXIT_CODES)]
struct Cli {
    /// Redis URL [default: from settings/ and REDSTREAM__REDIS__URL, else redis://127.0.0.1:6379]
    #[arg(long, global = true)]
    redis_url: Option<String>,
    /// Print JSON instead of tables (errors too, on stderr).
    #[arg(long, global = true)]
    json: bool,
    /// Give up connecting after this long.
    #[arg(long, global = true, default_value_t = 2_000, value_name = "MS")]
    connect_timeout_ms: u64,
    /// Give up on one Redis command after this long.
    #[arg(long, global = true, default_value_t = 10_000, value_name = "MS")]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

/// The crate version and, when built from a git checkout, its commit
/// (set by `build.rs`).
const VERSION: &str = env!("REDSTREAM_VERSION_LINE");

#[derive(Subcommand)]
enum Command {
    /// Streams and their groups: live members, lag, pending, the longest
    /// time pending, queue latency, dead-letter depth.
    Status {
        /// Which streams, as a glob pattern.
        #[arg(default_value = "*")]
        pattern: String,
    },
    /// The server: its name and version, the newer stream commands
    /// redstream uses on it, and settings that can lose stream data.
    Server,
    /// The consumers (member names) of a group: live or stale, which
    /// process holds each, idle time, pending entries (`consumers <stream>
    /// <group>`); or `consumers remove`.
    Consumers(ConsumersArgs),
    /// Create or delete consumer groups.
    #[command(subcommand)]
    Groups(manage::GroupsCommand),
    /// Move a group's position (Kafka's `--reset-offsets`): re-read from a
    /// time, an id or the start, or skip to the end. Refused while live
    /// members serve the group, unless `--force`; asks first, unless
    /// `--yes`; `--dry-run` says how many entries are re-read or skipped.
    Seek {
        /// The stream.
        stream: String,
        /// The group.
        group: String,
        #[command(flatten)]
        target: manage::Target,
        #[command(flatten)]
        flags: manage::SeekFlags,
    },
    /// Print a shell completion script (`redstream completions bash >
    /// /etc/bash_completion.d/redstream`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// The pending entries of a group: owner, idle time, attempts, next
    /// retry, event type, last error.
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
    /// Entries waiting for a retry, soonest due first; or, with `--now`,
    /// make some of them due now.
    Retries {
        /// The stream.
        stream: String,
        /// The group.
        group: String,
        /// Most entries to show.
        #[arg(long, default_value_t = 50)]
        count: usize,
        /// Make these waiting entries due now instead of listing: the
        /// reclaimer redelivers them at its next check, their attempt
        /// count kept. An id not waiting for a retry is reported (exit 3
        /// when none was).
        #[arg(long, num_args = 1.., value_name = "ID")]
        now: Vec<String>,
    },
    /// Dead letters.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Remove the entries every group has acked (never one a group still
    /// needs). Asks first, unless `--yes`.
    Trim {
        /// The stream.
        stream: String,
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

/// `consumers <stream> <group>`, or `consumers remove …`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct ConsumersArgs {
    #[command(subcommand)]
    action: Option<manage::ConsumersCommand>,
    /// The stream.
    #[arg(required = true)]
    stream: Option<String>,
    /// The group.
    #[arg(required = true)]
    group: Option<String>,
}

/// Why a command failed, and its exit code.
pub(crate) enum Failure {
    /// Something else went wrong (1).
    Failed(String),
    /// The operator said no at the prompt (1).
    Cancelled,
    /// Bad usage: a malformed argument or setting (2).
    Usage(String),
    /// No such stream, group, consumer or entry (3).
    NotFound(String),
    /// Redis refused, did not answer, or is not Redis (4).
    Unreachable(String),
    /// Wrong credentials, or the ACL forbids the command (5).
    Refused(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Failed(_) | Failure::Cancelled => 1,
            Failure::Usage(_) => 2,
            Failure::NotFound(_) => 3,
            Failure::Unreachable(_) => 4,
            Failure::Refused(_) => 5,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Failure::Failed(_) => "failed",
            Failure::Cancelled => "cancelled",
            Failure::Usage(_) => "usage",
            Failure::NotFound(_) => "not_found",
            Failure::Unreachable(_) => "unreachable",
            Failure::Refused(_) => "refused",
        }
    }

    fn message(&self) -> String {
        match self {
            Failure::Failed(m) => format!("error: {m}"),
            Failure::Cancelled => "cancelled: nothing was changed".to_owned(),
            Failure::Usage(m) => format!("bad usage: {m}"),
            Failure::NotFound(m) => format!("not found: {m}"),
            Failure::Unreachable(m) => format!("Redis unreachable: {m}"),
            Failure::Refused(m) => format!("access refused: {m}"),
        }
    }
}

/// The Redis URL as shown to the operator (never the password), once
/// [`connect`] has read it: errors of later commands name it as the
/// connect errors do.
static SHOWN_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

impl From<redstream::Error> for Failure {
    fn from(e: redstream::Error) -> Self {
        if let redstream::Error::Redis(r) = &e {
            let shown = SHOWN_URL.get().map_or("Redis", String::as_str);
            if let Some(failure) = connect_failure(shown, r) {
                return failure;
            }
        }
        if e.needs_reconnect() {
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
    let json = cli.json;
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if json {
                let error = serde_json::json!({ "error": {
                    "kind": failure.kind(),
                    "message": failure.message(),
                    "exit_code": failure.code(),
                }});
                eprintln!("{error}");
            } else {
                eprintln!("{}", failure.message());
            }
            ExitCode::from(failure.code())
        }
    }
}

/// Connects within the connect timeout, and says why not in the operator's
/// terms: the address (never the password), and whether it refused, timed
/// out, asked for credentials or is not a Redis server.
async fn connect(cli: &Cli) -> Result<RedisBroker, Failure> {
    let mut settings = Settings::load().map_err(|e| Failure::Usage(e.to_string()))?;
    if let Some(url) = &cli.redis_url {
        settings.redis.url = url
            .parse::<RedisUrl>()
            .map_err(|e| Failure::Usage(format!("--redis-url: {e}")))?;
    }
    settings.redis.connect_timeout_ms = cli.connect_timeout_ms;
    settings.redis.command_timeout_ms = cli.timeout_ms;
    let shown = settings.redis.url.to_string();
    let _ = SHOWN_URL.set(shown.clone());
    let limit = Duration::from_millis(cli.connect_timeout_ms);
    let no_answer = || {
        Failure::Unreachable(format!(
            "{shown}: no answer within {} ms (--connect-timeout-ms)",
            cli.connect_timeout_ms
        ))
    };
    // One plain attempt says why a connection fails (the broker's own
    // connect retries refused ports, as a service starting beside its
    // Redis needs).
    let client = redis::Client::open(settings.redis.url.expose())
        .map_err(|e| Failure::Usage(format!("--redis-url: {e}")))?;
    let probe = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(limit))
        .set_response_timeout(Some(limit));
    match tokio::time::timeout(
        limit,
        client.get_multiplexed_async_connection_with_config(&probe),
    )
    .await
    {
        Err(_) => return Err(no_answer()),
        Ok(Err(e)) => return Err(connecting(&shown, &e).unwrap_or_else(no_answer)),
        Ok(Ok(_)) => {}
    }
    match tokio::time::timeout(limit, RedisBroker::connect(&settings.redis, "cli")).await {
        Ok(Ok(broker)) => Ok(broker),
        Err(_) => Err(no_answer()),
        Ok(Err(redstream::Error::Redis(e))) => {
            Err(connecting(&shown, &e).unwrap_or_else(no_answer))
        }
        Ok(Err(e)) => Err(Failure::from(e)),
    }
}

/// Why a connection to `shown` failed: what [`connect_failure`] says, and
/// any other error while connecting is "unreachable" too; `None` for a
/// timeout.
fn connecting(shown: &str, e: &redis::RedisError) -> Option<Failure> {
    if e.is_timeout() {
        return None;
    }
    Some(connect_failure(shown, e).unwrap_or_else(|| {
        if e.kind() == ErrorKind::UnexpectedReturnType {
            not_redis(shown)
        } else {
            Failure::Unreachable(format!("{shown}: {e}"))
        }
    }))
}

/// What a Redis error on `shown` means to an operator, the one classifier
/// of both the connect and every later command: the connection refused or
/// lost, or the server not speaking Redis (unreachable, 4), credentials or
/// the ACL refused (5). `None` for a timeout and for a command's own error
/// (`NOGROUP`, `WRONGTYPE`, …), which the caller names.
fn connect_failure(shown: &str, e: &redis::RedisError) -> Option<Failure> {
    if e.is_timeout() {
        return None;
    }
    if e.is_connection_refusal() {
        Some(Failure::Unreachable(format!(
            "{shown}: connection refused (is Redis running there?)"
        )))
    } else if e.kind() == ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
    {
        Some(Failure::Refused(format!(
            "{shown}: authentication failed: {e}"
        )))
    } else if e.code() == Some("NOPERM") {
        Some(Failure::Refused(format!(
            "{shown}: the ACL user may not run this: {e}"
        )))
    } else if e.kind() == ErrorKind::Parse {
        Some(not_redis(shown))
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
        Some(Failure::Unreachable(format!("{shown}: {e}")))
    } else {
        None
    }
}

/// A server at `shown` that does not answer as Redis does (4).
fn not_redis(shown: &str) -> Failure {
    Failure::Unreachable(format!(
        "{shown} does not answer as a Redis server does (another service on that port?)"
    ))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "redstream",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    let broker = connect(&cli).await?;
    let json = cli.json;
    match cli.command {
        Command::Status { pattern } => groups::status(&broker, &pattern, json).await,
        Command::Server => groups::server(&broker, json).await,
        Command::Consumers(ConsumersArgs {
            action: Some(action),
            ..
        }) => manage::consumers(&broker, action, json).await,
        Command::Consumers(ConsumersArgs {
            stream: Some(stream),
            group: Some(group),
            ..
        }) => groups::consumers(&broker, &stream, &group, json).await,
        Command::Consumers(_) => Err(Failure::Usage(
            "consumers <stream> <group>, or consumers remove <stream> <group> <consumer>"
                .to_owned(),
        )),
        Command::Groups(command) => manage::groups(&broker, command, json).await,
        Command::Seek {
            stream,
            group,
            target,
            flags,
        } => manage::seek(&broker, &stream, &group, &target, flags, json).await,
        Command::Completions { .. } => Ok(()),
        Command::Pending {
            stream,
            group,
            count,
            consumer,
        } => pending::pending(&broker, &stream, &group, count, consumer.as_deref(), json).await,
        Command::Retries {
            stream, group, now, ..
        } if !now.is_empty() => pending::retry_now(&broker, &stream, &group, &now, json).await,
        Command::Retries {
            stream,
            group,
            count,
            ..
        } => pending::retries(&broker, &stream, &group, count, json).await,
        Command::Dlq(command) => dlq::run(&broker, command, json).await,
        Command::Trim {
            stream,
            dry_run,
            yes,
        } => trim::trim(&broker, &stream, dry_run, yes, json).await,
    }
}

/// A stream's info, or "not found" (exit 3).
pub(crate) async fn stream_info(broker: &RedisBroker, stream: &str) -> Result<StreamInfo, Failure> {
    broker
        .stream_info(stream)
        .await?
        .ok_or_else(|| Failure::NotFound(format!("no stream `{stream}`")))
}

/// The group as `XINFO GROUPS` shows it, or "not found" (exit 3) when
/// the stream or the group is missing. One light command, not
/// [`stream_info`]'s full report.
pub(crate) async fn check_group(
    broker: &RedisBroker,
    stream: &str,
    group: &str,
) -> Result<GroupSummary, Failure> {
    broker
        .groups(stream)
        .await?
        .ok_or_else(|| Failure::NotFound(format!("no stream `{stream}`")))?
        .into_iter()
        .find(|g| g.name == group)
        .ok_or_else(|| Failure::NotFound(format!("no group `{group}` on stream `{stream}`")))
}
