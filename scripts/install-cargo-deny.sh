#!/usr/bin/env bash
# Installs cargo-deny 0.20.2 unless it is already on PATH. Checks the generated service's
# dependency policy (deny.toml: licenses, bans, sources).
set -euo pipefail

version=0.20.2
if command -v cargo-deny >/dev/null 2>&1 && cargo-deny --version | grep -q "$version"; then
  echo "cargo-deny $version already installed"
  exit 0
fi
cargo install --quiet --locked cargo-deny --version "$version"
cargo-deny --version
