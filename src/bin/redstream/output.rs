//! How the CLI prints: aligned tables, JSON, durations for people, and the
//! confirmation destructive commands ask for.

use std::io::{BufRead, IsTerminal, Write};

use serde::Serialize;

use crate::Failure;

/// Prints `value` as pretty JSON on stdout.
pub(crate) fn print_json<T: Serialize>(value: &T) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Failure::Failed(e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// Prints rows as aligned columns; with no rows, `empty` instead (on
/// stdout, so a script sees the same stream either way).
pub(crate) fn table(header: &[&str], rows: &[Vec<String>], empty: &str) {
    if rows.is_empty() {
        println!("{empty}");
        return;
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for row in rows {
        line(row);
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// "3.2 s", "5 min", "2.0 h" for a duration in ms.
pub(crate) fn human(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..120_000 => format!("{:.1} s", ms as f64 / 1000.0),
        120_000..7_200_000 => format!("{} min", ms / 60_000),
        _ => format!("{:.1} h", ms as f64 / 3_600_000.0),
    }
}

/// `human` of an optional duration, `-` for none.
pub(crate) fn human_or_dash(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".to_owned(), human)
}

/// A time as "in 3.2 s" or "4 min ago", from now.
pub(crate) fn relative(at_ms: u64) -> String {
    let now = now_ms();
    if at_ms >= now {
        format!("in {}", human(at_ms - now))
    } else {
        format!("{} ago", human(now - at_ms))
    }
}

/// `text` on one line and at most `max` characters, for a table cell.
pub(crate) fn cell(text: &str, max: usize) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Asks before a destructive step: `--yes` goes ahead; otherwise a terminal
/// is asked `question [y/N]`, and without a terminal the command refuses
/// (bad usage), so a script never destroys data by accident.
pub(crate) fn confirm(question: &str, yes: bool) -> Result<(), Failure> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Usage(format!(
            "{question}: refusing without --yes (stdin is not a terminal to ask)"
        )));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Failure::Failed(format!("reading the answer: {e}")))?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(Failure::Cancelled)
    }
}

/// Whether `id` is a stream entry id (`<ms>-<seq>` or `<ms>`).
pub(crate) fn check_entry_id(id: &str, what: &str) -> Result<(), Failure> {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    let number = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u64>().is_ok()
    };
    if number(ms) && number(seq) {
        Ok(())
    } else {
        Err(Failure::Usage(format!(
            "{what} `{id}` is not a stream entry id (expected <ms>-<seq>, e.g. 1732262400000-0)"
        )))
    }
}
