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

// The `it` suite's support: its databases, test-owned servers and helpers
// (not every re-export is used here).
#[path = "../it/support/mod.rs"]
#[allow(unused_imports, unused_macros)]
mod support;

pub use support::{db, in_ci, redis_server};

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

/// Installs a test log subscriber once (RUST_LOG to see it; errors only
/// when it is not set).
pub fn init_tracing() {
    support::init_tracing_at("error");
}
