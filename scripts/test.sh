#!/usr/bin/env bash
# The test command: makes sure Redis and PostgreSQL answer on loopback and
# Chromium is installed (starting or installing them, see
# scripts/services.sh), then runs every test. Tests that need their own redis-server start one on a free port.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh redis postgres chromium faketime
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/test}"
cargo test --all-targets --features failpoints "$@"
cargo test --doc
