#!/usr/bin/env bash
# Packages both crates as crates.io would get them, and checks that the
# packages build, cheaply: `cargo package --no-verify` (verifying would
# build every dependency again in target/package/), then the two .crate
# files unpacked side by side and `cargo check --all-targets` in the
# unpacked redstream with the build's target directory, so only the two
# crates compile (the dependencies' artefacts are reused from the clippy
# run before, same features since dev-dependencies are included).
# `redstream-migrations` is not on crates.io yet: `--workspace` packages it
# first and resolves redstream's dependency on it locally, and the check
# patches crates.io's `redstream-migrations` to the unpacked one.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"
# `--allow-dirty` only outside CI, where a clean clone is packaged.
dirty=()
[ "${CI:-}" = "true" ] || dirty=(--allow-dirty)
version=$(cargo metadata --no-deps --format-version 1 \
  | python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "redstream"))')
rm -f "$target/package/"*.crate
cargo package --workspace --no-verify --quiet "${dirty[@]}"
# A fixed place, so repeated runs leave one set of artefacts, not one per run.
work="$target/package-check"
rm -rf "$work"
mkdir -p "$work"
for crate in "$target/package/"*.crate; do
  tar -xzf "$crate" -C "$work"
done
migrations=$(find "$work" -maxdepth 1 -name 'redstream-migrations-*' -type d)
# The unpacked crates may sit below this workspace (target/ inside the
# checkout): an empty [workspace] makes each its own root, as it is for a
# user who downloads it.
for manifest in "$work"/*/Cargo.toml; do
  grep -q '^\[workspace\]' "$manifest" || printf '\n[workspace]\n' >> "$manifest"
done
cd "$work/redstream-$version"
CARGO_TARGET_DIR="$target" cargo check --all-targets --quiet \
  --config "patch.crates-io.redstream-migrations.path=\"$migrations\""
echo "packages build: $(cd "$target/package" && ls ./*.crate | tr '\n' ' ')" >&2
