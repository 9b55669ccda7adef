#!/usr/bin/env bash
# HTTP benchmark and load test: the full service beside bare handlers running the same SQL on the
# same pool (examples/bench_http.rs), against the release build and a throwaway Postgres.
# A benchmark, not a test: it prints throughput, p50 and p99 and the ratios to the bare handlers.
#
#   scripts/bench-http.sh [--seconds 10] [--concurrency 32]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
pg_port=${BENCH_PGPORT:-55441}
work=$(mktemp -d /tmp/bench-http.XXXXXX)
chmod 755 "$work"
trap 'PGPORT=$pg_port PGDATA_DIR=$work/pg bash scripts/local-postgres.sh destroy >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

echo "==> Building (release)" >&2
SQLX_OFFLINE=true cargo build --release --locked --quiet --example bench_http
name=$(sed -n 's/^name *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
SQLX_OFFLINE=true cargo build --release --locked --quiet
echo "==> Starting Postgres on 127.0.0.1:$pg_port" >&2
settings=$(PGPORT=$pg_port PGDATA_DIR=$work/pg bash scripts/local-postgres.sh start)  # fails the script if the server does not start
eval "$settings"
export DATABASE_URL APP_ENV=development RUST_LOG=error REDIS_URL=
"${CARGO_TARGET_DIR:-$here/target}/release/$name" migrate
"${CARGO_TARGET_DIR:-$here/target}/release/examples/bench_http" "$@"
