//! `dlq list / show / redrive / delete`: dead letters with their causes,
//! putting them back, and removing those nobody needs.

use clap::{Args, Subcommand};
use redstream::dead_letters::{
    DeadLetterEntry, Selected, Selection, all_letters, by_reason, delete, redrive, select,
};
use redstream::{Admin, DeadLetterReason, RedisBroker, dead_letter_stream};
use serde::Serialize;

use crate::output::{cell, check_entry_id, confirm, human, now_ms, print_json, table};
use crate::{Failure, stream_info};

#[derive(Subcommand)]
pub(crate) enum DlqCommand {
    /// The dead letters of a stream, oldest first, with their reason and
    /// last error.
    List {
        /// The stream (its dead letters are in `<stream>:dlq`).
        stream: String,
        /// Most letters to show.
        #[arg(long, default_value_t = 50)]
        count: usize,
        /// Only letters whose reason has this code (`rejected`,
        /// `max_attempts_exceeded`, `bad_json`, …).
        #[arg(long)]
        reason: Option<String>,
        /// Only letters this group gave up on.
        #[arg(long)]
        group: Option<String>,
        /// Count letters per reason code and group instead of listing them.
        #[arg(long)]
        by_reason: bool,
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
    /// remove each once its republish succeeded. Asks first for `--all` and
    /// `--reason`, unless `--yes`.
    Redrive {
        /// The stream.
        stream: String,
        /// Dead-letter ids to redrive.
        #[arg(long = "id", required_unless_present_any = ["all", "reason"], conflicts_with_all = ["all", "reason"])]
        ids: Vec<String>,
        #[command(flatten)]
        which: Which,
        #[command(flatten)]
        flags: Flags,
    },
    /// Delete dead letters for good (their events are not republished: for
    /// letters nobody needs). Asks first, unless `--yes`.
    Delete {
        /// The stream.
        stream: String,
        /// Dead-letter ids to delete.
        #[arg(required_unless_present_any = ["all", "reason"], conflicts_with_all = ["all", "reason"])]
        ids: Vec<String>,
        #[command(flatten)]
        which: Which,
        #[command(flatten)]
        flags: Flags,
    },
}

/// `dlq redrive` and `dlq delete`: the letters named other than by id.
#[derive(Args)]
pub(crate) struct Which {
    /// Every dead letter of the stream.
    #[arg(long, conflicts_with = "reason")]
    all: bool,
    /// Every dead letter whose reason has this code (`rejected`,
    /// `max_attempts_exceeded`, `bad_json`, …).
    #[arg(long)]
    reason: Option<String>,
    /// With `--reason`: only the letters this group wrote.
    #[arg(long, requires = "reason")]
    group: Option<String>,
}

impl Which {
    /// The selection, from these switches or the ids.
    fn selection(self, ids: Vec<String>) -> Result<Selection, Failure> {
        for id in &ids {
            check_entry_id(id, "dead-letter id")?;
        }
        Ok(match (self.all, self.reason, self.group) {
            (true, _, _) => Selection::All,
            (false, Some(reason), Some(group)) => Selection::GroupReason { group, reason },
            (false, Some(code), None) => Selection::Reason(code),
            (false, None, _) => Selection::Ids(ids),
        })
    }
}

/// `dlq redrive` and `dlq delete`: dry run and confirmation.
#[derive(Args, Clone, Copy)]
pub(crate) struct Flags {
    /// Only say what would be done.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask.
    #[arg(long)]
    yes: bool,
}

pub(crate) async fn run(
    broker: &RedisBroker,
    command: DlqCommand,
    json: bool,
) -> Result<(), Failure> {
    match command {
        DlqCommand::List {
            stream,
            count,
            reason,
            group,
            by_reason,
        } => {
            let filter = Filter { reason, group };
            if by_reason {
                counts(broker, &stream, &filter, json).await
            } else {
                list(broker, &stream, count, &filter, json).await
            }
        }
        DlqCommand::Show { id, stream } => show(broker, &id, stream.as_deref(), json).await,
        DlqCommand::Redrive {
            stream,
            ids,
            which,
            flags,
        } => {
            let selection = which.selection(ids)?;
            redrive_letters(broker, &stream, &selection, flags, json).await
        }
        DlqCommand::Delete {
            stream,
            ids,
            which,
            flags,
        } => {
            let selection = which.selection(ids)?;
            delete_letters(broker, &stream, &selection, flags, json).await
        }
    }
}

/// Which letters `dlq list` shows.
struct Filter {
    reason: Option<String>,
    group: Option<String>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.reason.is_none() && self.group.is_none()
    }

    fn keeps(&self, letter: &DeadLetterEntry) -> bool {
        self.reason
            .as_deref()
            .is_none_or(|code| DeadLetterReason::code_of(&letter.reason) == code)
            && self.group.as_deref().is_none_or(|g| letter.group == g)
    }
}

/// The letters the filter keeps, at most `count`, and how many it keeps in
/// all.
async fn letters(
    broker: &RedisBroker,
    stream: &str,
    count: usize,
    filter: &Filter,
) -> Result<(Vec<DeadLetterEntry>, u64), Failure> {
    let info = stream_info(broker, stream).await?;
    if filter.is_empty() {
        let letters: Vec<DeadLetterEntry> = broker
            .range(&dead_letter_stream(stream), "-", "+", count)
            .await?
            .into_iter()
            .filter_map(DeadLetterEntry::parse)
            .collect();
        return Ok((letters, info.dead_letters));
    }
    let mut all = all_letters(broker, stream).await?;
    all.retain(|l| filter.keeps(l));
    let total = all.len() as u64;
    all.truncate(count);
    Ok((all, total))
}

async fn list(
    broker: &RedisBroker,
    stream: &str,
    count: usize,
    filter: &Filter,
    json: bool,
) -> Result<(), Failure> {
    let (letters, total) = letters(broker, stream, count, filter).await?;
    if (letters.len() as u64) < total {
        eprintln!(
            "showing the oldest {} of {total} dead letters; --count N shows more",
            letters.len()
        );
    }
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
                l.redrives.to_string(),
                format!("{} ago", human(now_ms().saturating_sub(l.failed_at_ms))),
                cell(&l.reason, 48),
                l.error
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |e| cell(e, 60)),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "ORIGIN",
            "GROUP",
            "ATTEMPTS",
            "REDRIVES",
            "FAILED",
            "REASON",
            "LAST ERROR",
        ],
        &rows,
        &format!("no dead letters in `{}`", dead_letter_stream(stream)),
    );
    Ok(())
}

async fn counts(
    broker: &RedisBroker,
    stream: &str,
    filter: &Filter,
    json: bool,
) -> Result<(), Failure> {
    stream_info(broker, stream).await?;
    let letters: Vec<DeadLetterEntry> = all_letters(broker, stream)
        .await?
        .into_iter()
        .filter(|l| filter.keeps(l))
        .collect();
    let counts = by_reason(&letters);
    if json {
        return print_json(&counts);
    }
    let rows: Vec<Vec<String>> = counts
        .iter()
        .map(|c| {
            vec![
                c.reason.clone(),
                c.group.clone(),
                c.count.to_string(),
                c.newest_error
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |e| cell(e, 60)),
            ]
        })
        .collect();
    table(
        &["REASON", "GROUP", "LETTERS", "NEWEST ERROR"],
        &rows,
        &format!("no dead letters in `{}`", dead_letter_stream(stream)),
    );
    Ok(())
}

async fn show(
    broker: &RedisBroker,
    id: &str,
    stream: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    check_entry_id(id, "dead-letter id")?;
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
            println!("  redrives:  {}", letter.redrives);
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

/// The letters `selection` names now, on a stream that exists.
async fn selected(
    broker: &RedisBroker,
    stream: &str,
    selection: &Selection,
) -> Result<Selected, Failure> {
    stream_info(broker, stream).await?;
    Ok(select(broker, stream, selection).await?)
}

/// Asks `question` when `ask` (unless `--yes`), and returns what to act on:
/// the ids asked for as given (so that those missing are reported), else
/// exactly the letters counted and confirmed, leaving letters written
/// since for the next run.
fn confirmed(
    selection: &Selection,
    selected: &Selected,
    ask: bool,
    question: &str,
    yes: bool,
) -> Result<Selection, Failure> {
    if ask {
        confirm(question, yes)?;
    }
    Ok(match selection {
        Selection::Ids(_) => selection.clone(),
        _ => Selection::Ids(selected.letters.iter().map(|l| l.id.clone()).collect()),
    })
}

/// Prints the ids that are not dead letters of the stream.
fn print_not_found(not_found: &[String]) {
    for id in not_found {
        println!("  not found: {id}");
    }
}

/// "Not found" (exit 3) when some ids asked for are not in the stream's
/// dead letters.
fn all_found(not_found: &[String], stream: &str) -> Result<(), Failure> {
    if not_found.is_empty() {
        return Ok(());
    }
    Err(Failure::NotFound(format!(
        "{} dead-letter ids were not in `{}`",
        not_found.len(),
        dead_letter_stream(stream)
    )))
}

/// What a dry run would redrive.
#[derive(Serialize)]
struct RedrivePlan {
    dry_run: bool,
    would_redrive: u64,
    would_skip: Vec<(String, String)>,
    not_found: Vec<String>,
}

async fn redrive_letters(
    broker: &RedisBroker,
    stream: &str,
    selection: &Selection,
    Flags { dry_run, yes }: Flags,
    json: bool,
) -> Result<(), Failure> {
    let selected = selected(broker, stream, selection).await?;
    let would_skip: Vec<(String, String)> = selected
        .letters
        .iter()
        .filter_map(|l| l.original_entry().err().map(|why| (l.id.clone(), why)))
        .collect();
    let would_redrive = selected.letters.len() as u64 - would_skip.len() as u64;
    if dry_run {
        let plan = RedrivePlan {
            dry_run,
            would_redrive,
            would_skip,
            not_found: selected.not_found,
        };
        if json {
            return print_json(&plan);
        }
        println!("would redrive {would_redrive} dead letters to `{stream}` (dry run)");
        for (id, why) in &plan.would_skip {
            println!("  would skip {id}: {why}");
        }
        print_not_found(&plan.not_found);
        return Ok(());
    }
    // Redriving named ids puts them back, nothing is lost: asked only for
    // `--all` and `--reason`.
    let confirmed = confirmed(
        selection,
        &selected,
        !matches!(selection, Selection::Ids(_)) && would_redrive > 0,
        &format!("redrive {would_redrive} dead letters to `{stream}`"),
        yes,
    )?;
    let report = redrive(broker, stream, &confirmed, |done, total| {
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
        print_not_found(&report.not_found);
    }
    if !report.skipped.is_empty() {
        return Err(Failure::Failed(format!(
            "{} dead letters could not be redriven",
            report.skipped.len()
        )));
    }
    all_found(&report.not_found, stream)
}

/// What a dry run would delete.
#[derive(Serialize)]
struct DeletePlan {
    dry_run: bool,
    would_delete: u64,
    not_found: Vec<String>,
}

async fn delete_letters(
    broker: &RedisBroker,
    stream: &str,
    selection: &Selection,
    Flags { dry_run, yes }: Flags,
    json: bool,
) -> Result<(), Failure> {
    let selected = selected(broker, stream, selection).await?;
    let would_delete = selected.letters.len() as u64;
    let dlq = dead_letter_stream(stream);
    if dry_run {
        let plan = DeletePlan {
            dry_run,
            would_delete,
            not_found: selected.not_found,
        };
        if json {
            return print_json(&plan);
        }
        println!("would delete {would_delete} dead letters from `{dlq}` (dry run)");
        print_not_found(&plan.not_found);
        return Ok(());
    }
    // Nothing brings a deleted letter back: asked for named ids too.
    let confirmed = confirmed(
        selection,
        &selected,
        would_delete > 0,
        &format!("delete {would_delete} dead letters from `{dlq}` for good"),
        yes,
    )?;
    let report = delete(broker, stream, &confirmed).await?;
    if json {
        print_json(&report)?;
    } else {
        println!("deleted {} dead letters from `{dlq}`", report.deleted);
        print_not_found(&report.not_found);
    }
    all_found(&report.not_found, stream)
}
