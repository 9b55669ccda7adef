#!/usr/bin/env bash
# Installs cargo-generate 0.26.0 unless it is already on PATH.
#
# Why not `cargo install cargo-generate --locked`: its lock file pins two crates that need a newer
# rustc than 1.95. We unpack the published crate, move exactly those two to versions that build on
# 1.95, and install from the unpacked source with the adjusted lock file (still --locked, so every
# other version stays the one the cargo-generate authors tested).
set -euo pipefail

version=0.26.0
if command -v cargo-generate >/dev/null 2>&1 && cargo-generate --version | grep -q "$version"; then
  echo "cargo-generate $version already installed"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl --fail --silent --show-error --location --retry 3 \
  "https://static.crates.io/crates/cargo-generate/cargo-generate-$version.crate" | tar -xz -C "$work"
cd "$work/cargo-generate-$version"
cargo update --quiet --precise 0.14.1 cargo-util-schemas
cargo update --quiet --precise 2.0.2 kstring
cargo install --quiet --locked --path . --root "${CARGO_HOME:-$HOME/.cargo}"
cargo-generate --version
