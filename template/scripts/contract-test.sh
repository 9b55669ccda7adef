#!/usr/bin/env bash
# Contract checks against a live service: spectral lints openapi.json (.spectral.yaml), then
# schemathesis runs every check and phase against the running API (schemathesis.toml says which
# answers the contract gives to requests a schema alone cannot rule out). Zero failures required.
#
#   DATABASE_URL=... scripts/contract-test.sh
#
# Needs a migrated database it may add a user to, Node.js (npm) and Python 3 (pip); installs
# spectral and schemathesis itself. Serves on 127.0.0.1:18580 (CONTRACT_API_PORT) while it runs.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
name=$(sed -n 's/^name *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
port=${CONTRACT_API_PORT:-18580}
tools=${CONTRACT_TOOLS_DIR:-$HOME/.cache/$name-contract-tools}
say() { printf '==> %s\n' "$*" >&2; }

say "Installing spectral 6.16.3 and schemathesis 4.32.5"
mkdir -p "$tools"
[ -x "$tools/node_modules/.bin/spectral" ] ||
  npm install --prefix "$tools" --silent --no-audit --no-fund @stoplight/spectral-cli@6.16.3
python3 -m pip install --quiet --disable-pip-version-check schemathesis==4.32.5
# Called by path: a fresh pip install may not be on PATH yet (pyenv shims, --user installs).
schemathesis="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/schemathesis"

say "spectral lint openapi.json (every warning fails)"
"$tools/node_modules/.bin/spectral" lint --ruleset .spectral.yaml --fail-severity warn openapi.json

SQLX_OFFLINE=true cargo build --locked --quiet
bin=${CARGO_TARGET_DIR:-$here/target}/debug/$name
export APP_ENV=development RUST_LOG=warn
password=contract-password-123
email="contract-$(date +%s%N)@example.com"
CREATE_USER_PASSWORD=$password "$bin" create-user --email "$email" --role admin >/dev/null

say "Serving on 127.0.0.1:$port with limits that fuzzing does not reach"
log=$(mktemp)
API_ADDR=127.0.0.1:$port ADMIN_ADDR=127.0.0.1:0 SHUTDOWN_READINESS_DELAY_SECS=0 \
  RATE_LIMIT_PER_MINUTE=100000 RATE_LIMIT_WRITES_PER_MINUTE=100000 \
  LOGIN_ATTEMPTS_PER_MINUTE_PER_IP=100000 LOGIN_ATTEMPTS_PER_MINUTE_PER_ACCOUNT=100000 \
  IMPORT_MAX_ACTIVE_PER_USER=1000 REDIS_URL= "$bin" serve >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { cat "$log" >&2; echo "the service did not start" >&2; exit 1; }
token=$(curl -sf -X POST "http://127.0.0.1:$port/v1/auth/token" -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"$password\"}" | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')
[ -n "$token" ] || { cat "$log" >&2; echo "no token" >&2; exit 1; }

say "schemathesis: every check, every phase (a fixed seed, so a failure reproduces)"
"$schemathesis" run "http://127.0.0.1:$port/openapi.json" --checks all \
  -H "Authorization: Bearer $token" --max-examples "${CONTRACT_MAX_EXAMPLES:-30}" --workers 1 \
  --seed "${CONTRACT_SEED:-42}"
