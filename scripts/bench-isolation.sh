#!/usr/bin/env bash
# Request isolation: latency of a light tool (echo) on one replica, alone and while CPU-heavy
# calls (hash, 1M rounds each) keep its concurrency limit saturated. Prints both tables.
#
# Usage: scripts/bench-isolation.sh [--duration 15s]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=15s
[ "${1:-}" = "--duration" ] && DURATION=$2
BIN=target/release
WORK=$(mktemp -d)
trap 'kill $cluster 2>/dev/null; wait $cluster 2>/dev/null; rm -rf "$WORK"' EXIT
"$BIN/shoal-cluster" --embedded --ready-file "$WORK/ready.json" --env SHOAL_TOOLSETS=kv,compute > "$WORK/cluster.log" 2>&1 &
cluster=$!
for _ in $(seq 1 100); do [ -s "$WORK/ready.json" ] && break; sleep 0.1; done
URL=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mcp_url"])' "$WORK/ready.json")

light() { "$BIN/shoal-loadtest" run --url "$URL" --scenario open --rate 200 --sessions 8 --mix echo=1 --era modern --duration "$DURATION" --quiet --max-error-rate 1; }
echo "== echo alone"
light | sed -n '1,5p'
echo "== echo while hash saturates its limit (2 running, more queued or refused)"
"$BIN/shoal-loadtest" run --url "$URL" --scenario max --sessions 4 --mix hash=1 --era modern --hash-rounds 1000000 \
  --duration 40s --warmup 0s --quiet --max-error-rate 1 > "$WORK/heavy.txt" 2>&1 &
heavy=$!
sleep 3
light | sed -n '1,5p'
wait $heavy || true
echo "== the heavy load meanwhile"
sed -n '1,5p;/errors:/,/^$/p' "$WORK/heavy.txt"
