#!/usr/bin/env bash
# The main example (order processing; with no argument a self-contained
# demo that exits when done): makes sure Redis answers on 127.0.0.1:6379 (starting or
# installing it, see scripts/services.sh) unless REDSTREAM__REDIS__URL
# points elsewhere, then runs the example.
#
# usage: scripts/demo.sh [example arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${REDSTREAM__REDIS__URL:-}" ]; then
  scripts/services.sh redis
fi
exec cargo run --release --example order_processing -- "$@"
