//! Example binaries that tests run as child processes.

use std::path::PathBuf;
use std::process::Command;

/// Builds `examples/<name>` with `cargo build --quiet --example <name>
/// <extra…>` and returns where it is: the `examples/` directory next to
/// this test binary's `deps/`, so `extra` must pick this binary's profile.
pub fn build_example(name: &str, extra: &[&str]) -> PathBuf {
    let mut build = Command::new(env!("CARGO"));
    // Cargo gives the test process its package's variables
    // (`CARGO_MANIFEST_DIR`, `CARGO_PKG_…`); some build scripts (ring)
    // track them, so passing them on would rebuild the dependencies
    // here, and again at the next `cargo test`.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
            "CARGO_TARGET_TMPDIR",
        ]
        .iter()
        .any(|prefix| key.starts_with(prefix))
        {
            build.env_remove(&*key);
        }
    }
    build
        .args(["build", "--quiet", "--example", name])
        .args(extra);
    let status = build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap_or_else(|e| panic!("cargo build --example {name}: {e}"));
    assert!(status.success(), "building the example {name}");
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test>-… → target/<profile>/examples/<name>
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples")
        .join(name)
}
