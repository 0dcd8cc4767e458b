//! The migrations of redstream's own tables, run by `redstream::Store` at
//! start-up on SQLite or PostgreSQL.
//!
//! | table | holds |
//! |---|---|
//! | `processed_events` | one row per (group, event id) whose effect committed: the exactly-once fence |
//! | `outbox` | events written inside the application's transactions, waiting to be relayed to a stream (with their trace context: `traceparent`, `tracestate`) |
//! | `redstream_leases` | named leases, e.g. which process relays the outbox (holder, a version the holder raises at each renewal, and the holder's expiry for display) |
//!
//! Bookkeeping goes to `redstream_migrations`, not sea-orm's default
//! `seaql_migrations`, so redstream can share a database with its host
//! application and its migrations.

pub use sea_orm_migration::prelude::*;

mod m20261122_000001_processed_events;
mod m20261122_000002_outbox;
mod m20261122_000003_leases;
mod m20261201_000004_lease_version;
mod m20261203_000005_outbox_tracestate;

/// redstream's migrator.
pub struct Migrator;

/// The name of redstream's migration bookkeeping table.
pub const MIGRATION_TABLE: &str = "redstream_migrations";

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261122_000001_processed_events::Migration),
            Box::new(m20261122_000002_outbox::Migration),
            Box::new(m20261122_000003_leases::Migration),
            Box::new(m20261201_000004_lease_version::Migration),
            Box::new(m20261203_000005_outbox_tracestate::Migration),
        ]
    }

    fn migration_table_name() -> DynIden {
        Alias::new(MIGRATION_TABLE).into_iden()
    }
}
