#!/usr/bin/env bash
# Runs every test of the project, the way CI does: formatting and lints, one release build, the unit
# and integration tests (real Redis, PostgreSQL and nginx processes started by the tests, the load
# generator's baseline against a 3-replica cluster), the official MCP conformance suite against one
# replica and against three replicas behind the balancer, and the docker-compose test (the real
# docker-compose.yml on podman).
#
# Usage: scripts/test.sh [--quick]   (--quick skips the conformance suite and the compose test)
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
[ "${1:-}" = "--quick" ] && quick=true

if $quick; then scripts/install-deps.sh; else scripts/install-deps.sh --containers; fi
step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "packages a fresh machine would lack (scripts/fresh-check.sh)"
scripts/fresh-check.sh || echo "warning: the packages above were installed by hand; CI on this machine passes with them, a fresh machine would not"
step "format"
cargo fmt --all -- --check
step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "build (release, once for every stage)"
cargo build --release --workspace --all-targets --locked
step "the OAuth test server's packages (oidc-provider, pinned in testkit/oidc/package-lock.json)"
npm ci --prefix testkit/oidc --no-audit --no-fund --loglevel=error
step "unit and integration tests"
cargo nextest run --release --workspace --locked --no-fail-fast
if ! $quick; then
  step "MCP conformance suite"
  scripts/conformance.sh --bin-dir target/release
  step "docker compose: the real docker-compose.yml on podman"
  scripts/compose-test.sh
fi
step "all tests passed"
