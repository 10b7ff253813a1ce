#!/usr/bin/env bash
# Runs every test of the project, the way CI does: formatting and lints, one release build, the unit
# and integration tests (real Redis and nginx processes started by the tests), and the official MCP
# conformance suite against one replica and against three replicas behind the balancer.
#
# Usage: scripts/test.sh [--quick]   (--quick skips the conformance suite)
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
[ "${1:-}" = "--quick" ] && quick=true

scripts/install-deps.sh
step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "format"
cargo fmt --all -- --check
step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "build (release, once for every stage)"
cargo build --release --workspace --all-targets --locked
step "unit and integration tests"
cargo nextest run --release --workspace --locked --no-fail-fast
if ! $quick; then
  step "MCP conformance suite"
  scripts/conformance.sh --bin-dir target/release
fi
step "all tests passed"
