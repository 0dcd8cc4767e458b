//! One result row per scenario and database, printed and appended to
//! `CHAOS_REPORT` (a Markdown table) when set.

use std::io::Write;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: String,
    pub db: String,
    pub redis_mode: String,
    pub seed: u64,
    pub n: usize,
    pub faults: u32,
    pub lost: usize,
    pub dup_effects: usize,
    pub recovered: usize,
    pub dead: String,
    pub recovery_p50: Option<Duration>,
    pub recovery_max: Option<Duration>,
    pub drain: Option<Duration>,
    pub peak_rss_mb: f64,
    pub wall: Duration,
    pub note: String,
}

/// The table header matching [`Row::line`].
pub const HEADER: &str = "| scenario | db | redis | seed | events | faults | lost | dup effects | recovered | dead-lettered | recovery p50 / max (s) | drain (s) | peak RSS (MB) | wall (s) | notes |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2}", d.as_secs_f64()))
        .unwrap_or_else(|| "-".to_owned())
}

impl Row {
    pub fn line(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {:.1} | {:.1} | {} |",
            self.scenario,
            self.db,
            self.redis_mode,
            self.seed,
            self.n,
            self.faults,
            self.lost,
            self.dup_effects,
            self.recovered,
            self.dead,
            secs(self.recovery_p50),
            secs(self.recovery_max),
            secs(self.drain),
            self.peak_rss_mb,
            self.wall.as_secs_f64(),
            self.note,
        )
    }

    /// Prints the row, and appends it to `CHAOS_REPORT` if set.
    pub fn emit(&self) {
        let line = self.line();
        eprintln!("{HEADER}\n{line}");
        println!("CHAOS RESULT {line}");
        if let Ok(path) = std::env::var("CHAOS_REPORT") {
            let fresh = std::fs::metadata(&path)
                .map(|m| m.len() == 0)
                .unwrap_or(true);
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
            {
                if fresh {
                    let _ = writeln!(f, "{HEADER}");
                }
                let _ = writeln!(f, "{line}");
            }
        }
    }
}
