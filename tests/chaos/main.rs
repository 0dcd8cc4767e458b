//! The fault-injection suite: nothing lost, nothing done twice, under real
//! faults (RELIABILITY.md). One `#[test]` per scenario and database; they
//! take a global lock and run one at a time. Workers are child processes
//! (`examples/chaos_worker.rs`) on a test-owned redis-server (free port,
//! AOF `always` unless the scenario says otherwise) and a fresh SQLite file
//! or PostgreSQL database.
//!
//! ```text
//! cargo test --features failpoints --test chaos            # CI tier (crash points need the feature)
//! CHAOS_TIER=soak cargo test --release --test chaos         # soak tier (or: -- --ignored soak)
//! CHAOS_SEED=123 cargo test --test chaos f01                # replay a schedule
//! CHAOS_REPORT=chaos.md cargo test --test chaos             # append the result rows to a file
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs,
    dead_code
)]

/// One `#[actix_rt::test]` per line, `name => scenario(args);`, that awaits
/// the scenario: most scenarios run once per database or variant, the test
/// only naming which. Attributes (`#[ignore = "…"]`) go before the name.
macro_rules! scenario_tests {
    ($($(#[$attr:meta])* $name:ident => $scenario:expr;)+) => {
        $(
            #[actix_rt::test]
            $(#[$attr])*
            async fn $name() {
                $scenario.await;
            }
        )+
    };
}

#[path = "../it/support/db.rs"]
mod db;
#[path = "../it/support/redis_server.rs"]
mod redis_server;

mod checker;
mod harness;
mod ledger;
mod report;
mod worker;
mod workload;

mod f01_worker_kill;
mod f02_crash_points;
mod f03_panic;
mod f07_db_outage;
mod f08_ambiguous_commit;
mod f12_zombie;
mod f13_large_pel;
mod f16_group_race;
mod f17_bad_input;
mod f18_duplicates_replay;
mod f19_flood;
mod f21_identity;
mod f21_unique_names;
mod f24_sigterm_loop;
mod f25_disk_full;
mod f27_clocks;
mod proxy;
mod redis_restart;
mod redis_stall;
mod retry_wait_kill;
mod soak;

/// Whether the tests run in CI, where a missing service is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Installs a test log subscriber once (RUST_LOG to see it).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_test_writer()
        .try_init();
}
