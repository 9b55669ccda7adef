#!/usr/bin/env bash
# Checks one rendered service: no placeholder left behind, and every placeholder value landed
# where it belongs.   check-render.sh <dir> <name> <api_port> <admin_port>
set -euo pipefail
dir=$1 name=$2 api_port=$3 admin_port=$4
fail() { echo "check-render: $*" >&2; exit 1; }

# Only this template's own placeholders: `{{route}}` in a Grafana legend or `${{ }}` in a GitHub
# workflow belong to those tools.
names='project-name|crate_name|description|authors|api_port|admin_port'
if leftovers=$(grep -rn --exclude-dir=.git --exclude-dir=target -E "\{\{ *($names) *\}\}" "$dir"); then
  fail "unrendered placeholders:"$'\n'"$leftovers"
fi
grep -q "^name = \"$name\"$" "$dir/Cargo.toml" || fail "package name is not $name"
grep -q "^name = \"$name\"$" "$dir/Cargo.lock" || fail "Cargo.lock does not carry the package name $name"
grep -q "\"title\": \"$name\"" "$dir/openapi.json" || fail "openapi.json title is not $name"
grep -q "0.0.0.0:$api_port" "$dir/src/config.rs" || fail "API port $api_port not in src/config.rs"
grep -q "127.0.0.1:$admin_port" "$dir/src/config.rs" || fail "admin port $admin_port not in src/config.rs"
grep -q "API_ADDR=0.0.0.0:$api_port" "$dir/.env.example" || fail "API port $api_port not in .env.example"
grep -q "api:$admin_port" "$dir/deploy/prometheus/prometheus.yml" || fail "admin port $admin_port not in the Prometheus scrape config"
grep -q "containerPort: $api_port" "$dir/deploy/kubernetes/api.yaml" || fail "API port $api_port not in the Kubernetes Deployment"
grep -q "image: $name:latest" "$dir/deploy/kubernetes/worker.yaml" || fail "image $name not in the Kubernetes manifests"
echo "render of $name is complete"
