#!/usr/bin/env bash
# For template developers: after changing the template's code, dependencies or queries, refresh
# the files that are produced from it and committed in template/: Cargo.lock, openapi.json and
# the sqlx offline query data (.sqlx/). Renders the template, regenerates them in the rendered
# service against a throwaway Postgres, and copies them back with the placeholders restored.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
bash "$root/scripts/install-cargo-generate.sh" >/dev/null
bash "$root/scripts/install-sqlx-cli.sh" >/dev/null

work=$(mktemp -d /tmp/template-refresh.XXXXXX)
chmod 755 "$work"
pg_port=${REFRESH_PGPORT:-55433}
service="$work/acme-orders"
trap 'PGPORT=$pg_port bash "$service/scripts/local-postgres.sh" destroy >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/refresh}

cargo generate --path "$root" --name acme-orders --destination "$work" --silent >/dev/null
cd "$service"
cargo update --workspace --quiet
sed 's/^name = "acme-orders"$/name = "{{project-name}}"/' Cargo.lock > "$root/template/Cargo.lock"

settings=$(PGPORT=$pg_port bash scripts/local-postgres.sh start)  # fails the script if the server does not start
eval "$settings"
export DATABASE_URL
sqlx migrate run
# The job queue's tables, from apalis's own migration files: the service's queries on
# apalis.jobs are checked against them (the service's `migrate` subcommand creates them too, but
# it cannot be built before its query data exists).
apalis_dir=$(cargo metadata --format-version 1 --locked | python3 -c \
  'import json, sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "apalis-postgres").rsplit("/", 1)[0])')
psql=$(ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -n 1)
psql=${psql:-psql}
"$psql" -q "$DATABASE_URL" -c 'CREATE SCHEMA IF NOT EXISTS apalis'
for migration in "$apalis_dir"/migrations/*.sql; do
  "$psql" -q -v ON_ERROR_STOP=1 "$DATABASE_URL" -f "$migration" >/dev/null
done
rm -rf .sqlx
mkdir .sqlx
# With DATABASE_URL and SQLX_OFFLINE_DIR set, sqlx's macros describe each query against the
# database and write its data there; cleaning the package forces every macro to run again.
cargo clean --quiet --package acme-orders
SQLX_OFFLINE_DIR="$PWD/.sqlx" cargo build --quiet --all-targets
rm -rf "$root/template/.sqlx"
cp -r .sqlx "$root/template/.sqlx"

cargo run --quiet -- openapi | sed 's/"title": "acme-orders"/"title": "{{project-name}}"/' > "$root/template/openapi.json"
echo "refreshed template/Cargo.lock, template/openapi.json and template/.sqlx"
