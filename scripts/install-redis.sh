#!/usr/bin/env bash
# Installs the Redis server from Debian's packages unless redis-server is already on PATH.
# Needs root, or sudo without a password.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
  echo "redis-server already installed"
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then as_root=(); else as_root=(sudo -n); fi
export DEBIAN_FRONTEND=noninteractive
# A brand-new machine may have no package lists yet.
"${as_root[@]}" apt-get install --yes --quiet --no-install-recommends redis-server >/dev/null 2>&1 || {
  "${as_root[@]}" apt-get update --quiet >/dev/null
  "${as_root[@]}" apt-get install --yes --quiet --no-install-recommends redis-server >/dev/null
}
redis-server --version
