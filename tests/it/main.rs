//! Integration tests against a real Redis. One binary, one module per
//! concern; each test isolates itself with a unique key prefix
//! (`support::TestContext`) and cleans up. Tests that hurt every client of a
//! server start their own (`support::RedisServer`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub,
    missing_docs
)]

mod bad_entries;
mod boundary;
mod cli;
mod console;
mod core;
mod embed;
mod identity;
mod janitor;
mod many_streams;
mod market;
mod observe;
mod order_saga;
mod orders;
mod privilege;
mod producer;
mod reclaim;
mod retry;
mod run_time_groups;
mod schedule;
mod servers;
mod settings;
mod shutdown;
mod store;
mod supervision;
mod support;
mod webhook_fanout;
