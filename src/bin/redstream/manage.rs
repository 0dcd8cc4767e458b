//! `groups create / delete`, `consumers remove` and `seek`: changing a
//! group, refusing what a live process would suffer from unless forced.

use clap::{Args, Subcommand};
use redstream::broker::admin::{ORPHANS, SeekTo};
use redstream::{Admin, RedisBroker};
use serde::Serialize;

use crate::output::{check_entry_id, confirm, print_json};
use crate::{Failure, check_group};

#[derive(Subcommand)]
pub(crate) enum GroupsCommand {
    /// Create a consumer group (and its stream, if missing).
    Create {
        /// The stream.
        stream: String,
        /// The group.
        group: String,
        /// Where it starts: `start` (every entry in the stream), `end`
        /// (only new entries) or an entry id (entries after it).
        #[arg(long, default_value = "start")]
        from: String,
    },
    /// Delete a consumer group with its pending list, retry schedule and
    /// attempt counts. Refused while a live process serves it, unless
    /// `--force`; asks first, unless `--yes`.
    Delete {
        /// The stream.
        stream: String,
        /// The group.
        group: String,
        /// Delete even while live members serve it.
        #[arg(long)]
        force: bool,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum ConsumersCommand {
    /// Remove a consumer (member name) from a group. The pending entries it
    /// holds move to `redstream-orphans` with their idle time kept, and the
    /// reclaimer hands them to a live member: nothing is dropped. Refused
    /// for a live member unless `--force`.
    Remove {
        /// The stream.
        stream: String,
        /// The group.
        group: String,
        /// The consumer.
        consumer: String,
        /// Remove even a member a live process runs (it comes back at its
        /// next read).
        #[arg(long)]
        force: bool,
    },
}

/// `seek`: where to move the group.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub(crate) struct Target {
    /// Before the first entry: re-read everything still in the stream.
    #[arg(long)]
    to_start: bool,
    /// After the last entry: skip everything not yet delivered.
    #[arg(long)]
    to_end: bool,
    /// After this entry id: the next entry read is the first one after it.
    #[arg(long, value_name = "ID")]
    to_id: Option<String>,
    /// Entries added at or after this time are read: RFC 3339
    /// (`2026-12-01T10:00:00Z`) or ms since the Unix epoch.
    #[arg(long, value_name = "TIME")]
    to_time: Option<String>,
    /// Entries added within this long before now are read (`15m`, `2h`).
    #[arg(long, value_name = "DURATION")]
    by_duration: Option<String>,
}

impl Target {
    fn seek_to(&self) -> Result<SeekTo, Failure> {
        if self.to_start {
            return Ok(SeekTo::Start);
        }
        if self.to_end {
            return Ok(SeekTo::End);
        }
        if let Some(id) = &self.to_id {
            check_entry_id(id, "--to-id")?;
            return Ok(SeekTo::AfterId(id.clone()));
        }
        if let Some(time) = &self.to_time {
            if let Ok(ms) = time.parse::<u64>() {
                return Ok(SeekTo::Time(ms));
            }
            let at = humantime::parse_rfc3339_weak(time).map_err(|e| {
                Failure::Usage(format!(
                    "--to-time `{time}`: {e} (expected RFC 3339 such as 2026-12-01T10:00:00Z, or ms since the epoch)"
                ))
            })?;
            return Ok(SeekTo::Time(epoch_ms(at)));
        }
        if let Some(d) = &self.by_duration {
            let back = humantime::parse_duration(d)
                .map_err(|e| Failure::Usage(format!("--by-duration `{d}`: {e} (e.g. 15m, 2h)")))?;
            let at = std::time::SystemTime::now()
                .checked_sub(back)
                .unwrap_or(std::time::UNIX_EPOCH);
            return Ok(SeekTo::Time(epoch_ms(at)));
        }
        Err(Failure::Usage(
            "say where to: --to-start, --to-end, --to-id, --to-time or --by-duration".to_owned(),
        ))
    }
}

fn epoch_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Refuses a change to a group that live processes serve, unless forced.
async fn refuse_if_live(
    broker: &RedisBroker,
    stream: &str,
    group: &str,
    what: &str,
    force: bool,
) -> Result<(), Failure> {
    if force {
        return Ok(());
    }
    let live: Vec<String> = broker
        .consumers(stream, group)
        .await?
        .into_iter()
        .filter(|c| c.live())
        .map(|c| c.name)
        .collect();
    if live.is_empty() {
        return Ok(());
    }
    Err(Failure::Failed(format!(
        "refusing to {what}: live members serve group `{group}` ({}); stop them first, or pass --force",
        live.join(", ")
    )))
}

#[derive(Serialize)]
struct Changed {
    changed: bool,
}

pub(crate) async fn groups(
    broker: &RedisBroker,
    command: GroupsCommand,
    json: bool,
) -> Result<(), Failure> {
    match command {
        GroupsCommand::Create {
            stream,
            group,
            from,
        } => {
            let from = match from.as_str() {
                "start" => "0".to_owned(),
                "end" => "$".to_owned(),
                id => {
                    check_entry_id(id, "--from")?;
                    id.to_owned()
                }
            };
            let created = broker.create_group(&stream, &group, &from).await?;
            if json {
                return print_json(&Changed { changed: created });
            }
            if created {
                println!("created group `{group}` on `{stream}`");
                Ok(())
            } else {
                Err(Failure::Failed(format!(
                    "group `{group}` already exists on `{stream}`"
                )))
            }
        }
        GroupsCommand::Delete {
            stream,
            group,
            force,
            yes,
        } => {
            let pending = check_group(broker, &stream, &group).await?.pending;
            refuse_if_live(broker, &stream, &group, "delete the group", force).await?;
            confirm(
                &format!(
                    "delete group `{group}` of `{stream}` ({pending} pending entries are forgotten)"
                ),
                yes,
            )?;
            let deleted = broker.delete_group(&stream, &group).await?;
            if json {
                return print_json(&Changed { changed: deleted });
            }
            println!("deleted group `{group}` of `{stream}`");
            Ok(())
        }
    }
}

pub(crate) async fn consumers(
    broker: &RedisBroker,
    command: ConsumersCommand,
    json: bool,
) -> Result<(), Failure> {
    let ConsumersCommand::Remove {
        stream,
        group,
        consumer,
        force,
    } = command;
    check_group(broker, &stream, &group).await?;
    let known = broker.consumers(&stream, &group).await?;
    let Some(found) = known.iter().find(|c| c.name == consumer) else {
        return Err(Failure::NotFound(format!(
            "no consumer `{consumer}` in group `{group}` of stream `{stream}`"
        )));
    };
    if found.live() && !force {
        return Err(Failure::Failed(format!(
            "refusing to remove `{consumer}`: a live process holds it ({}); stop it first, or pass --force",
            found.held_by.as_deref().unwrap_or("?")
        )));
    }
    let removed = broker.remove_consumer(&stream, &group, &consumer).await?;
    if json {
        return print_json(&removed);
    }
    println!(
        "removed consumer `{consumer}`; its {} pending entries moved to `{ORPHANS}`, where the reclaimer hands them to a live member",
        removed.moved
    );
    Ok(())
}

pub(crate) async fn seek(
    broker: &RedisBroker,
    stream: &str,
    group: &str,
    target: &Target,
    flags: SeekFlags,
    json: bool,
) -> Result<(), Failure> {
    let to = target.seek_to()?;
    check_group(broker, stream, group).await?;
    let plan = broker
        .seek_plan(stream, group, &to)
        .await?
        .ok_or_else(|| Failure::NotFound(format!("no group `{group}` on stream `{stream}`")))?;
    let what = format!(
        "move group `{group}` of `{stream}` from {} to {}: {} entries read again, {} skipped",
        plan.from_id, plan.to_id, plan.reread, plan.skipped
    );
    if !flags.dry_run {
        refuse_if_live(broker, stream, group, "move the group", flags.force).await?;
        confirm(&what, flags.yes)?;
        broker.seek(stream, group, &plan.to_id).await?;
    }
    if json {
        #[derive(Serialize)]
        struct Seek<'a> {
            #[serde(flatten)]
            plan: &'a redstream::broker::admin::SeekPlan,
            dry_run: bool,
        }
        return print_json(&Seek {
            plan: &plan,
            dry_run: flags.dry_run,
        });
    }
    if flags.dry_run {
        println!("would {what} (dry run)");
    } else {
        println!("moved: {what}");
    }
    if plan.pending > 0 {
        println!(
            "{} pending entries stay pending (they are still reclaimed and retried)",
            plan.pending
        );
    }
    Ok(())
}

/// `seek`'s switches.
#[derive(Args, Clone, Copy)]
pub(crate) struct SeekFlags {
    /// Only say what would change.
    #[arg(long)]
    dry_run: bool,
    /// Move even while live members serve the group.
    #[arg(long)]
    force: bool,
    /// Do not ask.
    #[arg(long)]
    yes: bool,
}
