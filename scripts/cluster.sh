#!/usr/bin/env bash
# Starts a local shoal cluster from real processes, for people without Docker: Redis, PostgreSQL
# (with a demo schema), 3 replicas and an nginx round-robin balancer on http://127.0.0.1:8080/mcp.
# Ctrl-C stops everything.
#
# Usage: scripts/cluster.sh [shoal-cluster options, e.g. --replicas 5 --port 9000 --env SHOAL_TOOLSETS=kv,conformance]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked -p shoal-server -p shoal-loadtest
args=("$@")
printf '%s\n' "${args[@]}" | grep -q -- '--port' || args+=(--port 8080)
printf '%s\n' "${args[@]}" | grep -q -- '--embedded' || args+=(--postgres)
exec target/release/shoal-cluster "${args[@]}"
