#!/usr/bin/env bash
# Issue 11, acceptance 6: shoal against stock rmcp 3.11, measured from outside with wrk (a Lua
# script, 32 connections), side by side in one run, in both protocol eras:
#
#   legacy     tools/call echo on one legacy session (Mcp-Session-Id), shoal on Redis vs stock rmcp
#              (LocalSessionManager, rmcp's defaults: SSE responses) and stock rmcp in JSON-response
#              mode;
#   2026-07-28 the stateless tools/call (per-request _meta), shoal on Redis vs stock rmcp in
#              JSON-response mode;
#   traced     shoal with every request traced (OTLP over HTTP to shoal-otlp-sink, 100% sampling).
#
# Each server's CPU per call comes from its own process (shoal: /metrics; stock: /proc/PID/stat).
# Rounds alternate nothing but are repeated; medians are printed. wrk shares the 2 cores with the
# server, the same for every server, so only ratios measured in one run mean anything.
#
# Usage: scripts/bench-wrk.sh [--duration 10s] [--connections 32] [--rounds 3]
# Needs: cargo build --release --workspace; wrk (scripts/install-deps.sh --bench).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=10s
CONNECTIONS=32
ROUNDS=3
while [ $# -gt 0 ]; do
  case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/bench-common.sh

proc_cpu() { python3 -c 'import os,sys; f=open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")",1)[1].split(); print((int(f[11])+int(f[12]))/os.sysconf("SC_CLK_TCK"))' "$1"; }

# measure LABEL ERA URL CPU-COMMAND...: a warm-up, then one measured wrk run; appends
# "label calls/s us-cpu/call p50 p99 failed" to the results.
measure() {
  local label=$1 era=$2 url=$3; shift 3
  local session="" before after line
  [ "$era" = legacy ] && session=$(open_session "$url")
  ERA=$era SESSION=$session wrk -t2 -c"$CONNECTIONS" -d2s -s scripts/wrk/call.lua "$url" > /dev/null
  before=$("$@")
  line=$(ERA=$era SESSION=$session wrk -t2 -c"$CONNECTIONS" -d"$DURATION" -s scripts/wrk/call.lua "$url" | grep '^WRK')
  after=$("$@")
  python3 - "$label" "$before" "$after" "$line" >> "$WORK/results.txt" <<'PY'
import sys
label, before, after, line = sys.argv[1:5]
f = dict(kv.split("=") for kv in line.split()[1:])
calls = int(f["requests"]); secs = float(f["seconds"])
print(f"{label}\t{calls / secs:.0f}\t{(float(after) - float(before)) / calls * 1e6:.1f}\t{f['p50_ms']}\t{f['p99_ms']}\t{f['failed']}")
PY
  tail -1 "$WORK/results.txt" | awk -F'\t' '{printf "  %-24s %7s calls/s %7s us CPU/call  p50 %s ms  p99 %s ms  failed %s\n", $1, $2, $3, $4, $5, $6}'
}

shoal_run() { # $1 = label suffix, rest = extra --env
  local suffix=$1; shift
  local url base
  start_replica --env SHOAL_TOOLSETS=kv "$@"
  measure "shoal$suffix legacy" legacy "$url" cpu_of "$base"
  measure "shoal$suffix 2026" modern "$url" cpu_of "$base"
  stop_replica
}

stock_run() { # $1 = label, rest = extra arguments of bench-rmcp-stock
  local label=$1; shift
  start_stock "$@"
  measure "$label legacy" legacy "$stock_url" proc_cpu "$stock"
  if [ "${1:-}" = --json-response ]; then
    measure "$label 2026" modern "$stock_url" proc_cpu "$stock"
  fi
  stop_stock
}

echo "wrk -t2 -c$CONNECTIONS, $DURATION per run, $ROUNDS rounds; tools/call echo"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"
  shoal_run ""
  stock_run "rmcp"
  stock_run "rmcp-json" --json-response
  shoal_run " traced" "${TRACE_ALL[@]}"
done
python3 - "$WORK/results.txt" <<'PY'
import statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
med = {}
for label in dict.fromkeys(r[0] for r in rows):
    mine = [r for r in rows if r[0] == label]
    med[label] = (statistics.median(float(r[1]) for r in mine), statistics.median(float(r[2]) for r in mine),
                  sum(int(r[5]) for r in mine))
print("\nmedians")
for label, (rate, cpu, failed) in med.items():
    print(f"  {label:<24} {rate:8.0f} calls/s {cpu:7.1f} us CPU/call  failed {failed}")
def ratio(a, b):
    return f"{med[a][0] / med[b][0]:.2f}x calls/s, {med[a][1] / med[b][1]:.2f}x CPU/call"
print("\nratios")
print("  legacy: shoal / stock rmcp           ", ratio("shoal legacy", "rmcp legacy"))
print("  legacy: shoal / rmcp JSON-response   ", ratio("shoal legacy", "rmcp-json legacy"))
print("  2026:   shoal / rmcp JSON-response   ", ratio("shoal 2026", "rmcp-json 2026"))
print("  traced / untraced, legacy            ", ratio("shoal traced legacy", "shoal legacy"))
print("  traced / untraced, 2026              ", ratio("shoal traced 2026", "shoal 2026"))
PY
