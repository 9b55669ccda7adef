#!/usr/bin/env bash
# Import benchmark: a generated CSV (5 rows per order) uploaded through the API and processed by a
# separate worker process, beside Postgres' own COPY of the same file into a plain staging table
# on the same database, and beside COPY of the same orders and items, already validated and
# grouped, into the service's own tables: what writing into this schema costs, whatever loads it.
# Prints rows/s, end-to-end seconds and the worker's peak RSS per size.
# A benchmark, not a test: it prints numbers and asserts nothing.
#
#   scripts/bench-imports.sh [rows[-scattered] ...]      (default: 100000 1000000 1000000-scattered)
#
# Uses a release build, a throwaway Postgres (scripts/local-postgres.sh, port BENCH_PGPORT,
# default 55440) and loopback ports 18480/19480 (API) and 19481 (worker metrics).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(100000 1000000 1000000-scattered)
pg_port=${BENCH_PGPORT:-55440}
work=$(mktemp -d /tmp/bench-imports.XXXXXX)
chmod 755 "$work"
name=$(sed -n 's/^name *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  # serve drains for a few seconds after SIGTERM: wait, so that a run straight after this one
  # finds its ports free.
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  PGPORT=$pg_port PGDATA_DIR=$work/pg bash scripts/local-postgres.sh destroy >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
say() { printf '==> %s\n' "$*" >&2; }

say "Building (release)"
SQLX_OFFLINE=true cargo build --release --locked --quiet
bin=${CARGO_TARGET_DIR:-$here/target}/release/$name

say "Starting Postgres on 127.0.0.1:$pg_port"
settings=$(PGPORT=$pg_port PGDATA_DIR=$work/pg bash scripts/local-postgres.sh start)  # fails the script if the server does not start
eval "$settings"
# The worker's phase timings ("file read", "rows staged", "orders written") are read from its log.
export DATABASE_URL APP_ENV=development RUST_LOG=warn,service::imports::job=info
psql=$(ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -n 1)
psql=${psql:-psql}
sql() { "$psql" -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }
"$bin" migrate
CREATE_USER_PASSWORD=bench-password-123 "$bin" create-user --email bench@example.com --role customer
owner=$(sql -At -c "SELECT id FROM users WHERE email = 'bench@example.com'")

# Big enough for the largest file; generous limits so that only the import is measured.
export IMPORT_MAX_BYTES=$((256 * 1024 * 1024)) IMPORT_MAX_ROWS=10000000 IMPORT_MAX_ACTIVE_PER_USER=100
export RATE_LIMIT_PER_MINUTE=100000 RATE_LIMIT_WRITES_PER_MINUTE=100000 REDIS_URL=
API_ADDR=127.0.0.1:18480 ADMIN_ADDR=127.0.0.1:19480 "$bin" serve >"$work/serve.log" 2>&1 &
serve=$!
pids+=($serve)
ADMIN_ADDR=127.0.0.1:19481 "$bin" worker >"$work/worker.log" 2>&1 &
worker=$!
pids+=($worker)
api=http://127.0.0.1:18480
until curl -sf "$api/readyz" >/dev/null; do
  if ! kill -0 "$serve" 2>/dev/null; then
    say "serve exited before it was ready:"; tail -n 5 "$work/serve.log" >&2; exit 1
  fi
  sleep 0.2
done
token=$(curl -sf -X POST "$api/v1/auth/token" -H 'content-type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password-123"}' | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')

now() { date +%s.%N; }
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
per_second() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.0f", n / s }'; }

phase() { { grep "\"message\":\"$1\"" "$work/worker.log" || true; } | tail -n 1 | sed -n 's/.*"elapsed_ms":"\{0,1\}\([0-9]*\).*/\1/p' | awk '{ printf "%.2f", $1 / 1000 }'; }
columns='%-18s %-9s %-12s %-13s %-14s %-13s %-10s %-11s %-9s %-10s %-10s %-10s %s\n'
printf "\n$columns" rows "file MiB" "COPY rows/s" "tables rows/s" "import rows/s" "end-to-end s" "% of COPY" \
  "% of tables" "upload s" "reading s" "staging s" "writing s" "worker peak RSS MiB"
for size in "${sizes[@]}"; do
  # "1000000" lists each order's rows together; "1000000-scattered" deals them out round robin,
  # so that each order's five rows are a fifth of the file apart.
  rows=${size%-scattered}
  if (( rows % 5 != 0 )); then echo "$size: the number of rows must be a multiple of 5 (5 per order)" >&2; exit 1; fi
  file=$work/orders-$size.csv
  n=$((${n:-0} + 1))
  python3 - "$rows" "$file" "$size" "$n" "$owner" <<'PY'
import sys, time, uuid
rows, path, scattered = int(sys.argv[1]), sys.argv[2], sys.argv[3].endswith("-scattered")
prefix, owner = f"P{sys.argv[4]}", sys.argv[5]
orders = rows // 5
with open(path, "w") as out:
    out.write("external_ref,currency,sku,quantity,unit_price_cents,note\n")
    for row in range(rows):
        line, order = divmod(row, orders) if scattered else divmod(row, 5)[::-1]
        # A prefix per file: each file's orders are new, not found from an earlier file.
        out.write(f"{prefix}-{order:08d},EUR,SKU-{line},{line + 1},{100 + order % 900},\n")
# The same orders as the service stores them (COPY text format): ids that grow, as UUIDv7 do.
now_ms = int(time.time() * 1000)
# For two connections, as the worker writes: blocks of 2 000 orders (the worker's batch), dealt
# out in turn, so both connections write next to each other at the right edge of every index.
for half in (0, 1):
    with open(f"{path}.orders.{half}", "w") as out_orders, open(f"{path}.items.{half}", "w") as out_items:
        for order in (order for order in range(orders) if order // 2000 % 2 == half):
            id = uuid.UUID(int=(now_ms + order // 4096) << 80 | 0x7 << 76 | (order % 4096) << 64 | 0b10 << 62)
            price = 100 + order % 900
            out_orders.write(f"{id}\t{owner}\tEUR\t{15 * price}\t\\N\t{prefix}-{order:08d}\n")
            for line in range(5):
                out_items.write(f"{id}\t{line + 1}\tSKU-{line}\t{line + 1}\t{price}\n")
PY
  mib=$(awk -v b="$(stat -c %s "$file")" 'BEGIN { printf "%.1f", b / 1048576 }')

  # Baseline: COPY of the same file into a plain table, on the same database.
  # Every timed step starts after a checkpoint, so that none pays for the one before it.
  sql -c 'SET client_min_messages = warning' -c 'DROP TABLE IF EXISTS bench_copy' \
    -c 'CREATE TABLE bench_copy (external_ref text, currency text, sku text, quantity bigint, unit_price_cents bigint, note text)' \
    -c CHECKPOINT
  start=$(now)
  sql -c "\\copy bench_copy FROM '$file' WITH (FORMAT csv, HEADER true)"
  copy_seconds=$(seconds "$start" "$(now)")
  sql -c CHECKPOINT

  # The schema's floor: COPY of the same orders and items, grouped already, into `orders` and
  # `order_items` with their indexes and constraints, on two connections as the worker writes
  # (but one COPY per table on each, where the worker commits every batch). Removed again before
  # the import writes the same keys into the same indexes.
  start=$(now)
  copies=()
  for half in 0 1; do
    sql -c "\\copy orders (id, owner_id, currency, total_cents, note, external_ref) FROM '$file.orders.$half'" \
      -c "\\copy order_items (order_id, position, sku, quantity, unit_price_cents) FROM '$file.items.$half'" &
    copies+=($!)
  done
  for copy in "${copies[@]}"; do wait "$copy"; done  # each, so that either one failing stops the script
  tables_seconds=$(seconds "$start" "$(now)")
  sql -c "DELETE FROM order_items WHERE order_id IN (SELECT id FROM orders WHERE external_ref LIKE 'P$n-%')" \
    -c "DELETE FROM orders WHERE external_ref LIKE 'P$n-%'" -c 'VACUUM (ANALYZE) orders, order_items' -c CHECKPOINT

  # The import: upload, then poll until the worker has finished.
  start=$(now)
  location=$(curl -sf -D - -o /dev/null -X POST "$api/v1/imports" -H "authorization: Bearer $token" \
    -H "idempotency-key: bench-$size-$start" -H 'content-type: text/csv' --data-binary @"$file" |
    sed -n 's/^location: *\([^[:space:]]*\).*/\1/Ip')
  upload_seconds=$(seconds "$start" "$(now)")
  while :; do
    body=$(curl -sf "$api$location" -H "authorization: Bearer $token")
    case $body in *'"status":"queued"'* | *'"status":"running"'*) sleep 0.1 ;; *) break ;; esac
  done
  total_seconds=$(seconds "$start" "$(now)")
  case $body in *'"status":"succeeded"'*) ;; *) echo "the import did not succeed: $body" >&2; exit 1 ;; esac
  rss_mib=$(awk '/^VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$worker/status")
  copy_rate=$(per_second "$rows" "$copy_seconds")
  import_rate=$(per_second "$rows" "$total_seconds")
  tables_rate=$(per_second "$rows" "$tables_seconds")
  share() { awk -v a="$import_rate" -v b="$1" 'BEGIN { printf "%.0f%%", 100 * a / b }'; }
  staging=-
  [ "$size" = "$rows" ] || staging=$(phase 'rows staged')
  printf "$columns" "$size" "$mib" "$copy_rate" "$tables_rate" "$import_rate" "$total_seconds" "$(share "$copy_rate")" \
    "$(share "$tables_rate")" "$upload_seconds" "$(phase 'file read')" "$staging" "$(phase 'orders written')" "$rss_mib"
  rm -f "$file" "$file".orders.* "$file".items.*
done
echo
echo "COPY: the file into a plain table. tables: the same orders and items, grouped, into the"
echo "service's orders and order_items, on two connections. Both rows/s count the file's rows."
echo "import rows/s and end-to-end time run from the start of the upload to the finished import."
echo "upload: until the 202. reading, staging (scattered files only) and writing (staging included):"
echo "the worker's own timings. The worker's peak RSS is its high-water mark so far (VmHWM)."
