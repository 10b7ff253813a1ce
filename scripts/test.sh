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
step "free disk"
# What a full run writes on a fresh machine, measured (docs/operations.md, "Tests"): the host's
# target/ (about 6 GB) and, for the compose test, podman's images and the image build's cache
# (about 6 GB under /var/lib/containers and /var/tmp). Later runs reuse most of it.
need_gb=$($quick && echo 8 || echo 16)
for dir in . /var/lib/containers /var/tmp; do
  [ -d "$dir" ] || continue
  free_gb=$(( $(df --output=avail -k "$dir" | tail -1) / 1024 / 1024 ))
  if [ "$free_gb" -lt "$need_gb" ]; then
    echo "warning: $(realpath "$dir") has $free_gb GB free; a full run may need up to $need_gb GB (podman image prune -f --filter label=io.shoal.image, and docs/operations.md on the build cache)"
  else
    echo "$(realpath "$dir"): $free_gb GB free"
  fi
done
step "format"
cargo fmt --all -- --check
step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "build (release, once for every stage)"
cargo build --release --workspace --all-targets --locked
step "the OAuth test server's packages (oidc-provider, pinned in testkit/oidc/package-lock.json)"
npm ci --prefix testkit/oidc --no-audit --no-fund --loglevel=error
step "the official Python SDK for the interop test (mcp, pinned in testkit/python/requirements.txt)"
[ -x testkit/python/.venv/bin/python ] || python3 -m venv testkit/python/.venv
testkit/python/.venv/bin/pip install -q --disable-pip-version-check -r testkit/python/requirements.txt
step "unit and integration tests"
cargo nextest run --release --workspace --locked --no-fail-fast
if ! $quick; then
  step "MCP conformance suite"
  # Each bounded well above its normal duration (3 and 16 minutes on a fresh 2-core machine), so a
  # hang fails the run with its name instead of running CI into its own limit.
  timeout --kill-after=60 15m scripts/conformance.sh --bin-dir target/release \
    || { echo "the conformance suite failed or ran over 15 minutes (status $?)"; exit 1; }
  step "docker compose: the real docker-compose.yml on podman"
  timeout --kill-after=60 35m scripts/compose-test.sh \
    || { echo "the compose test failed or ran over 35 minutes (status $?)"; exit 1; }
fi
step "all tests passed"
