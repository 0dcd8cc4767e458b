//! The checker: classifies every published event against the ledger and the
//! dead-letter stream (rabbitmq/jepsen's total-queue classes).

use std::collections::{BTreeMap, HashMap};

use sea_orm::DatabaseConnection;

use crate::ledger;
use crate::workload::{History, Outcome};

/// What became of the events of a run.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// Published ok (or unknown, or err) and effected exactly once.
    pub effected_once: usize,
    /// Published ok, no effect, not dead-lettered.
    pub lost: Vec<i64>,
    /// Effected more than once (seq, effects).
    pub duplicated: Vec<(i64, u64)>,
    /// The balance minus the sum of the amounts of effected events (0 unless
    /// an effect was applied twice or partly).
    pub balance_drift: i64,
    /// Published with an unknown outcome, yet effected.
    pub recovered: usize,
    /// Published with an unknown outcome and never effected (never written).
    pub unknown_absent: usize,
    /// Publish returned err, yet effected (should not happen).
    pub unexpected: usize,
    /// Effects of event ids the producer never published.
    pub foreign_effects: usize,
    /// Dead letters per reason code (the part before the colon).
    pub dead_lettered: BTreeMap<String, usize>,
    /// Dead letters by event id: (reason, attempts).
    pub dead_letters: HashMap<String, (String, u32)>,
    /// Highest attempt that committed an effect, per seq.
    pub attempts: HashMap<i64, u64>,
}

impl Verdict {
    pub fn dead_total(&self) -> usize {
        self.dead_lettered.values().sum()
    }

    pub fn dup_effects(&self) -> usize {
        self.duplicated.len() + usize::from(self.balance_drift != 0)
    }

    /// `reason:count` pairs.
    pub fn dead_summary(&self) -> String {
        if self.dead_lettered.is_empty() {
            return "0".to_owned();
        }
        self.dead_lettered
            .iter()
            .map(|(r, n)| format!("{r}:{n}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Dead letters of `stream`: event id (or origin entry id) → (reason, attempts).
pub async fn dead_letters(redis_url: &str, stream: &str) -> HashMap<String, (String, u32)> {
    let client = redis::Client::open(redis_url).expect("redis url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let reply: redis::Value = redis::cmd("XRANGE")
        .arg(redstream::dead_letter_stream(stream))
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .expect("XRANGE dlq");
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        other => format!("{other:?}"),
    };
    let mut out = HashMap::new();
    let redis::Value::Array(items) = reply else {
        return out;
    };
    for item in &items {
        let redis::Value::Array(pair) = item else {
            continue;
        };
        let Some(redis::Value::Array(flat)) = pair.get(1) else {
            continue;
        };
        let fields: HashMap<String, String> = flat
            .chunks(2)
            .filter(|kv| kv.len() == 2)
            .map(|kv| (text(&kv[0]), text(&kv[1])))
            .collect();
        let key = fields
            .get("id")
            .or_else(|| fields.get("original.id"))
            .or_else(|| fields.get("origin_id"))
            .cloned()
            .unwrap_or_default();
        // The reason code, then the last error (a panic's message lives there).
        let reason = match fields.get("error") {
            Some(error) => format!(
                "{}: {error}",
                fields.get("reason").cloned().unwrap_or_default()
            ),
            None => fields.get("reason").cloned().unwrap_or_default(),
        };
        let attempts = fields
            .get("attempts")
            .and_then(|a| a.parse().ok())
            .unwrap_or(0);
        out.insert(key, (reason, attempts));
    }
    out
}

/// Classifies every event of `history`.
pub async fn check(
    history: &History,
    db: &DatabaseConnection,
    redis_url: &str,
    stream: &str,
) -> Verdict {
    let effects = ledger::effects(db).await;
    let dead = dead_letters(redis_url, stream).await;
    let mut v = Verdict::default();
    let mut expected_balance = 0i64;
    let mut known = std::collections::HashSet::new();
    for r in &history.records {
        // An id published twice (injected duplicates) is judged once.
        if !known.insert(r.id.as_str()) {
            continue;
        }
        let e = effects.get(&r.id).copied().unwrap_or_default();
        if e.count > 0 {
            expected_balance += r.amount;
            v.attempts.insert(r.seq, e.attempt);
        }
        if e.count > 1 {
            v.duplicated.push((r.seq, e.count));
        }
        match (r.outcome, e.count) {
            (Outcome::Ok, 0) if dead.contains_key(&r.id) => {}
            (Outcome::Ok, 0) => v.lost.push(r.seq),
            (Outcome::Ok, _) => v.effected_once += usize::from(e.count == 1),
            (Outcome::Unknown, 0) => {
                if !dead.contains_key(&r.id) {
                    v.unknown_absent += 1;
                }
            }
            (Outcome::Unknown, _) => {
                v.recovered += 1;
                v.effected_once += usize::from(e.count == 1);
            }
            (Outcome::Err, 0) => {}
            (Outcome::Err, _) => v.unexpected += 1,
        }
    }
    v.foreign_effects = effects
        .keys()
        .filter(|id| !known.contains(id.as_str()))
        .count();
    v.balance_drift = ledger::balance(db).await - expected_balance;
    for (reason, _) in dead.values() {
        let code = reason.split(':').next().unwrap_or("").to_owned();
        *v.dead_lettered.entry(code).or_insert(0) += 1;
    }
    v.dead_letters = dead;
    v
}
