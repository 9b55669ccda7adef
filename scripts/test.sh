#!/usr/bin/env bash
# Test it: render the template and run everything the project verifies, on a machine that has
# Rust and the PostgreSQL server binaries (no Docker). Installs what it needs; skips what is there.
#
#   bash scripts/test.sh
#
# What it runs, in order: tool installs (cargo-generate, sqlx-cli, Redis, promtool); a render
# with every placeholder changed (`--git`) and one with default values (`--path`); in the rendered
# service: rustfmt, clippy with warnings denied, an offline build (SQLX_OFFLINE=true, no
# database), the offline-query check, the whole test suite against a throwaway Postgres and
# Redis, the Dockerfile built and run without a container engine, promtool on the alert rules; finally the "Try it" command end to end, running the
# commands it prints, and promtool on the live service's metrics.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
started=$SECONDS
step() { printf '\n==> [%dm%02ds] %s\n' $(((SECONDS - started) / 60)) $(((SECONDS - started) % 60)) "$*"; }

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
export CARGO_INCREMENTAL=0
# The service's local mode: a built-in development SECRET_KEY instead of refusing to start.
export APP_ENV=development
# cargo-generate names the author from git's user.name, or else $USER; a fresh machine or a
# container may have neither.
export USER=${USER:-$(id -un)}
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

step "Installing tools"
bash "$root/scripts/install-cargo-generate.sh"
bash "$root/scripts/install-sqlx-cli.sh"
bash "$root/scripts/install-cargo-deny.sh"
bash "$root/scripts/install-redis.sh"
bash "$root/scripts/install-promtool.sh"

work=$(mktemp -d /tmp/template-test.XXXXXX)
chmod 755 "$work"
# One target directory for every render: they share a package name, so dependencies build once.
export CARGO_TARGET_DIR="$work/target"
pg_port=${TEST_PGPORT:-55432}
redis_port=${TEST_REDIS_PORT:-56379}
service="$work/acme-orders"
cleanup() {
  if [ -x "$service/scripts/local-postgres.sh" ]; then
    PGPORT=$pg_port bash "$service/scripts/local-postgres.sh" destroy || true
    REDIS_PORT=$redis_port bash "$service/scripts/local-redis.sh" stop || true
  fi
  if [ -f "$work/try/acme-orders/service.pid" ]; then kill "$(cat "$work/try/acme-orders/service.pid")" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

step "Rendering the template with every placeholder changed (the --git form, from this checkout's HEAD)"
mkdir -p "$work/variant"
if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then source_flag=(--git "$root"); else source_flag=(--path "$root"); fi
cargo generate "${source_flag[@]}" --name other-service --destination "$work/variant" --silent \
  --define description="Another service" --define api_port=18181 --define admin_port=19191 >/dev/null
bash "$root/scripts/check-render.sh" "$work/variant/other-service" other-service 18181 19191

step "Rendering the template with default values"
cargo generate --path "$root" --name acme-orders --destination "$work" --silent >/dev/null
bash "$root/scripts/check-render.sh" "$service" acme-orders 8080 9090
cd "$service"

step "cargo fmt --check"
cargo fmt --check

step "YAML files parse (compose, Prometheus, alert rules, workflows)"
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet pyyaml
python3 - compose.yaml deploy/prometheus/*.yml .github/workflows/*.yml <<'PY'
import sys, yaml
for path in sys.argv[1:]:
    with open(path) as file:
        yaml.safe_load(file)
    print("ok", path)
PY

step "Kubernetes manifests validate against the Kubernetes 1.30 schemas (kubernetes-validate, offline)"
python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
# Called by path: a fresh pip install may not be on PATH yet (pyenv shims, --user installs).
"$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/kubernetes-validate" \
  --strict --kubernetes-version 1.30.0 deploy/kubernetes/*.yaml

step "cargo deny check licenses bans sources (the dependency policy in deny.toml; advisories need the network and run in the generated CI)"
cargo fetch --locked --quiet
cargo deny --offline --log-level error check licenses bans sources

step "cargo clippy --all-targets -- -D warnings (offline: no database)"
SQLX_OFFLINE=true cargo clippy --locked --all-targets -- -D warnings

step "Starting a throwaway Postgres on 127.0.0.1:$pg_port"
settings=$(PGPORT=$pg_port bash scripts/local-postgres.sh start)  # fails the script if the server does not start
eval "$settings"
export DATABASE_URL

step "cargo sqlx prepare --check (the committed .sqlx data is current)"
SQLX_OFFLINE=true cargo run --locked --quiet -- migrate
cargo sqlx prepare --check -- --all-targets

step "Starting a throwaway Redis on 127.0.0.1:$redis_port"
settings=$(REDIS_PORT=$redis_port bash scripts/local-redis.sh start)  # fails the script if the server does not start
eval "$settings"
export REDIS_URL

step "cargo test (real Postgres, real Redis)"
SQLX_OFFLINE=true cargo test --locked --all-targets

step "Contract: spectral lints openapi.json, schemathesis fuzzes the live service (zero failures)"
bash scripts/contract-test.sh

step "Dockerfile: every stage built and the image run, as its non-root user, without a container engine"
# No Docker engine or image registry here: the script carries out the Dockerfile's instructions in
# Debian root filesystems (debootstrap) and runs the result against this Postgres. The generated
# service's own CI builds the image with Docker.
python3 "$root/scripts/build-image-without-engine.py" "$service" --database-url "$DATABASE_URL"

step "promtool check rules (the alert rules the service ships)"
promtool check rules deploy/prometheus/alerts.yml

step "Try it: the README's first command, end to end"
PGPORT=$pg_port API_ADDR=127.0.0.1:18080 ADMIN_ADDR=127.0.0.1:19090 \
  bash "$root/scripts/try.sh" "$work/try/acme-orders" | tee "$work/try.log"
# The commands try.sh printed under "Try:", run exactly as a user would paste them.
sed -n '/^Try:$/,/^$/p' "$work/try.log" | sed -n 's/^  //p' > "$work/try-commands.sh"
[ -s "$work/try-commands.sh" ] || { echo "try.sh printed no commands" >&2; exit 1; }
step "Running the commands try.sh printed"
cat "$work/try-commands.sh"
answer=$(bash -e "$work/try-commands.sh")
echo "$answer"
grep -q '"status":"pass"' <<<"$answer" || { echo "the readiness command did not pass" >&2; exit 1; }
grep -q '"status":"draft"' <<<"$answer" || { echo "the create-order command did not create a draft" >&2; exit 1; }
step "promtool check metrics (the live service's /metrics: every metric described, names well formed)"
curl --fail --silent --show-error http://127.0.0.1:19090/metrics | promtool check metrics
kill "$(cat "$work/try/acme-orders/service.pid")"

step "All checks passed"
