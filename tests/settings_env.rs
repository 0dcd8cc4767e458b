//! Environment overrides, in their own test binary: environment variables
//! are process-global, so no other test may run beside these.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    unsafe_code
)]

use std::path::Path;

use redstream::{Error, Settings};

/// Sets an environment variable. Sound here: this binary has one test and
/// spawns no threads that read the environment.
fn set(key: &str, value: &str) {
    unsafe { std::env::set_var(key, value) }
}

fn settings_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/settings"))
}

// One test function, so the steps never run concurrently.
#[test]
fn environment_layers_over_files() {
    set("REDSTREAM__REDIS__URL", "redis://127.0.0.1:6390/2");
    set("REDSTREAM__DATABASE__URL", "postgres://u:p@127.0.0.1/x");
    set("REDSTREAM__CONSUMER__BLOCK_MS", "750");
    let s = Settings::load_from(settings_dir()).unwrap();
    assert_eq!(s.redis.url.expose(), "redis://127.0.0.1:6390/2");
    assert_eq!(s.database.url.expose(), "postgres://u:p@127.0.0.1/x");
    assert_eq!(s.consumer.block_ms, 750);
    assert_eq!(
        s.consumer.count, 100,
        "untouched keys keep the file's value"
    );

    set("REDSTREAM__CONSUMER__BLOCK_MS", "soon");
    match Settings::load_from(settings_dir()) {
        Err(Error::Settings { key, reason }) => {
            assert_eq!(key, "consumer.block_ms");
            assert!(reason.contains("integer"), "{reason}");
        }
        other => panic!("expected a settings error, got {other:?}"),
    }
    set("REDSTREAM__CONSUMER__BLOCK_MS", "900");
    set("REDSTREAM_ENV", "nonexistent");
    match Settings::load_from(settings_dir()) {
        Err(Error::Settings { key, .. }) => assert_eq!(key, "REDSTREAM_ENV"),
        other => panic!("expected a settings error, got {other:?}"),
    }
}
