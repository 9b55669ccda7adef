#!/usr/bin/env bash
# Installs promtool (Debian's prometheus package) unless it is already on PATH. It validates the
# generated service's alert rules and lints its /metrics output. Needs root, or sudo without a
# password.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  echo "promtool already installed"
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then as_root=(); else as_root=(sudo -n); fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get install --yes --quiet --no-install-recommends prometheus >/dev/null 2>&1 || {
  "${as_root[@]}" apt-get update --quiet >/dev/null
  "${as_root[@]}" apt-get install --yes --quiet --no-install-recommends prometheus >/dev/null
}
promtool --version | head -n 1
