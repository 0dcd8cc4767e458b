//! The deliberately non-idempotent ledger the worker writes: `accounts`
//! (balances) and `effects_log` (one row per effect, no unique key).

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

/// Creates the ledger tables (an account per member, created on its first
/// credit).
pub async fn create(db: &DatabaseConnection) {
    for sql in [
        "CREATE TABLE IF NOT EXISTS accounts (id TEXT PRIMARY KEY, balance BIGINT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS effects_log (event_id TEXT NOT NULL, seq BIGINT NOT NULL, \
         attempt BIGINT NOT NULL, calls BIGINT NOT NULL, member TEXT NOT NULL)",
    ] {
        db.execute_unprepared(sql)
            .await
            .expect("create ledger table");
    }
}

async fn query(db: &DatabaseConnection, sql: &str) -> Vec<sea_orm::QueryResult> {
    db.query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .expect("ledger query")
}

/// Rows in `effects_log`.
pub async fn effect_rows(db: &DatabaseConnection) -> u64 {
    query(db, "SELECT COUNT(*) FROM effects_log")
        .await
        .first()
        .and_then(|r| r.try_get_by_index::<i64>(0).ok())
        .unwrap_or(0) as u64
}

/// Sum of all balances.
pub async fn balance(db: &DatabaseConnection) -> i64 {
    query(
        db,
        "SELECT CAST(COALESCE(SUM(balance), 0) AS BIGINT) FROM accounts",
    )
    .await
    .first()
    .and_then(|r| r.try_get_by_index::<i64>(0).ok())
    .unwrap_or(0)
}

/// One event's effects: how many rows, and the highest attempt recorded.
#[derive(Clone, Copy, Debug, Default)]
pub struct Effects {
    pub count: u64,
    pub attempt: u64,
}

/// Effects per event id.
pub async fn effects(db: &DatabaseConnection) -> std::collections::HashMap<String, Effects> {
    query(
        db,
        "SELECT event_id, COUNT(*), MAX(attempt) FROM effects_log GROUP BY event_id",
    )
    .await
    .into_iter()
    .filter_map(|r| {
        let id: String = r.try_get_by_index(0).ok()?;
        let count: i64 = r.try_get_by_index(1).ok()?;
        let attempt: i64 = r.try_get_by_index(2).ok()?;
        Some((
            id,
            Effects {
                count: count as u64,
                attempt: attempt as u64,
            },
        ))
    })
    .collect()
}
