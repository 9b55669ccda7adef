#!/usr/bin/env bash
# A throwaway Redis for development and tests, from the system's redis-server, on loopback only.
# For machines without Docker (with Docker, `docker compose up -d redis`).
#
#   scripts/local-redis.sh start     start it (if not running) and print REDIS_URL
#   scripts/local-redis.sh stop      stop it
#
# Settings: REDIS_PORT (default 6380, beside a system server on 6379), REDIS_DIR (default
# /tmp/<service>-redis-<port>). Install the server with `apt-get install redis-server`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
service=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$here/Cargo.toml" | head -n 1)
port=${REDIS_PORT:-6380}
dir=${REDIS_DIR:-/tmp/${service}-redis-${port}}
url="redis://127.0.0.1:${port}"

command -v redis-server >/dev/null 2>&1 || {
  echo "redis-server not found: install it (Debian: apt-get install redis-server)" >&2
  exit 1
}

case "${1:-}" in
  start)
    mkdir -p "$dir"
    if ! redis-cli -p "$port" ping >/dev/null 2>&1; then
      # No persistence: a throwaway server for buckets that expire on their own anyway.
      redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --save '' --appendonly no \
        --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
      for _ in $(seq 1 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    fi
    echo "REDIS_URL=$url"
    ;;
  stop) redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true ;;
  *) echo "usage: $0 start|stop" >&2; exit 64 ;;
esac
