#!/usr/bin/env bash
# A throwaway PostgreSQL for development and tests, from the system's own server binaries, on
# loopback only. For machines without Docker (with Docker, `docker compose up -d postgres`).
#
#   scripts/local-postgres.sh start    initialise if needed, start, create the database, print DATABASE_URL
#   scripts/local-postgres.sh stop     stop the server (the data directory stays)
#   scripts/local-postgres.sh destroy  stop and delete the data directory
#   scripts/local-postgres.sh url      print DATABASE_URL
#
# Settings (environment): PGPORT (default 5433, beside a system server on 5432), PGDATA_DIR
# (default /tmp/<service>-postgres-<port>), DATABASE_NAME (default: the service name).
#
# initdb refuses to run as root: when run as root the server runs as the `postgres` user (or
# $PG_USER), which owns the data directory. As a normal user it runs as you.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
service=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$here/Cargo.toml" | head -n 1)
port=${PGPORT:-5433}
datadir=${PGDATA_DIR:-/tmp/${service}-postgres-${port}}
dbname=${DATABASE_NAME:-${service//-/_}}
password=postgres   # a throwaway cluster on loopback; never use this script for real data
url="postgres://postgres:${password}@127.0.0.1:${port}/${dbname}"

find_bindir() {
  # pg_ctl on PATH may be a symlink into the real bin directory, which also holds psql.
  if command -v pg_ctl >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v pg_ctl)")"; return; fi
  local candidate
  candidate=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$candidate" ] && [ -x "$candidate/pg_ctl" ]; then echo "$candidate"; return; fi
  echo "PostgreSQL server binaries not found: install the server (Debian: apt-get install postgresql)" >&2
  exit 1
}
bindir=$(find_bindir)

# Runs a command as the user who owns the cluster.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u "${PG_USER:-postgres}" -- "$@"
  else
    "$@"
  fi
}

start() {
  if [ ! -s "$datadir/PG_VERSION" ]; then
    mkdir -p "$datadir"
    if [ "$(id -u)" -eq 0 ]; then chown "${PG_USER:-postgres}" "$datadir"; fi
    chmod 700 "$datadir"
    local pwfile
    pwfile=$(mktemp)
    echo "$password" > "$pwfile"
    if [ "$(id -u)" -eq 0 ]; then chown "${PG_USER:-postgres}" "$pwfile"; fi
    as_owner "$bindir/initdb" --pgdata="$datadir" --username=postgres --pwfile="$pwfile" \
      --auth=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
  fi
  if ! as_owner "$bindir/pg_ctl" status --pgdata="$datadir" >/dev/null 2>&1; then
    # Sockets go in the data directory: /var/run/postgresql may not exist or be writable.
    # fsync=off: the data is thrown away, so commits need not wait for the disk (faster tests;
    # benchmarks measured on this server leave flush waits out, on both sides).
    as_owner "$bindir/pg_ctl" start --pgdata="$datadir" --wait --log="$datadir/server.log" \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $datadir -c max_connections=200 -c fsync=off" >/dev/null
  fi
  if ! PGPASSWORD=$password as_owner "$bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$dbname'" | grep -q 1; then
    PGPASSWORD=$password as_owner "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres "$dbname"
  fi
  echo "DATABASE_URL=$url"
}

case "${1:-}" in
  start) start ;;
  stop) as_owner "$bindir/pg_ctl" stop --pgdata="$datadir" --mode=fast >/dev/null 2>&1 || true ;;
  destroy)
    as_owner "$bindir/pg_ctl" stop --pgdata="$datadir" --mode=fast >/dev/null 2>&1 || true
    rm -rf "$datadir" ;;
  url) echo "DATABASE_URL=$url" ;;
  *) echo "usage: $0 start|stop|destroy|url" >&2; exit 64 ;;
esac
