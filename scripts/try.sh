#!/usr/bin/env bash
# Try it: generate a service, start a local Postgres, migrate, create a demo user, start the
# service in the background, and print the docs URL and a curl that works. Needs Rust and the
# PostgreSQL server binaries; no Docker. Installs cargo-generate if it is missing.
#
#   bash scripts/try.sh [destination]     (default: ./acme-orders)
#
# Run it again to restart the service; `kill $(cat <destination>/service.pid)` stops it and
# `scripts/local-postgres.sh destroy` (inside the destination) removes the database.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-$PWD/acme-orders}
mkdir -p "$(dirname "$dest")"
dest=$(cd "$(dirname "$dest")" && pwd)/$(basename "$dest")
name=$(basename "$dest")
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
say() { printf '==> %s\n' "$*" >&2; }
# Local mode: the service uses a built-in development SECRET_KEY instead of refusing to start.
export APP_ENV=development
# cargo-generate names the author from git's user.name, or else $USER; a fresh machine or a
# container may have neither.
export USER=${USER:-$(id -un)}

bash "$root/scripts/install-cargo-generate.sh" >&2

if [ -d "$dest" ]; then
  say "Using the service already generated in $dest"
else
  say "Generating $name into $dest"
  cargo generate --path "$root" --name "$name" --destination "$(dirname "$dest")" --silent >&2
fi
cd "$dest"

say "Starting a local Postgres (scripts/local-postgres.sh)"
settings=$(bash scripts/local-postgres.sh start)  # fails the script if the server does not start
eval "$settings"
export DATABASE_URL

say "Building (the first build compiles every dependency: a few minutes)"
SQLX_OFFLINE=true cargo build --quiet --locked
bin=${CARGO_TARGET_DIR:-$dest/target}/debug/$name

say "Migrating"
"$bin" migrate >&2

demo_email=demo@example.com
demo_password=demo-password-123
if CREATE_USER_PASSWORD=$demo_password "$bin" create-user --email "$demo_email" --role admin >/dev/null 2>"$dest/create-user.err"; then
  say "Created the admin user $demo_email"
elif grep -q "already exists" "$dest/create-user.err"; then
  say "The admin user $demo_email already exists"
else
  cat "$dest/create-user.err" >&2
  exit 1
fi

if [ -f service.pid ] && kill -0 "$(cat service.pid)" 2>/dev/null; then
  say "Stopping the previous run"
  kill "$(cat service.pid)"
  while kill -0 "$(cat service.pid)" 2>/dev/null; do sleep 0.2; done
fi
api_addr=${API_ADDR:-127.0.0.1:$(sed -n 's/^API_ADDR=.*:\([0-9]*\)$/\1/p' .env.example)}
API_ADDR=$api_addr LOG_FORMAT=${LOG_FORMAT:-pretty} SHUTDOWN_READINESS_DELAY_SECS=0 \
  nohup "$bin" serve >service.log 2>&1 &
echo $! >service.pid

for _ in $(seq 1 100); do
  if curl --silent --fail "http://$api_addr/readyz" >/dev/null 2>&1; then break; fi
  sleep 0.2
done
curl --silent --fail "http://$api_addr/readyz" >/dev/null || { tail -n 20 service.log >&2; exit 1; }

base="http://$api_addr"
login_body="{\"email\":\"$demo_email\",\"password\":\"$demo_password\"}"
order_body='{"currency":"EUR","items":[{"sku":"BOOK-1","quantity":2,"unit_price_cents":1250}],"note":"first order"}'
cat <<MSG

$name is running (pid $(cat service.pid), logs in $dest/service.log).

  Interactive docs: $base/docs/
  Admin user:       $demo_email / $demo_password

Try:
  curl -s $base/readyz
  TOKEN=\$(curl -s -X POST $base/v1/auth/token -H 'content-type: application/json' -d '$login_body' | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')
  curl -s -X POST $base/v1/orders -H "authorization: Bearer \$TOKEN" -H "idempotency-key: \$(date +%s%N)" -H 'content-type: application/json' -d '$order_body'

Stop it with: kill \$(cat $dest/service.pid)
MSG
