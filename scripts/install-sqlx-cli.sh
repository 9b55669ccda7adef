#!/usr/bin/env bash
# Installs sqlx-cli 0.9.0 (Postgres only, rustls) unless it is already on PATH. Needed for
# `cargo sqlx prepare --check`, which proves the committed offline query data is current.
set -euo pipefail

version=0.9.0
if command -v sqlx >/dev/null 2>&1 && sqlx --version | grep -q "$version"; then
  echo "sqlx-cli $version already installed"
  exit 0
fi
cargo install --quiet --locked sqlx-cli --version "$version" --no-default-features --features postgres,rustls
sqlx --version
