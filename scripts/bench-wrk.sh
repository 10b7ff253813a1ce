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

. scripts/bench-common.sh
wrk_options "$@"

proc_cpu() { python3 -c 'import os,sys; f=open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")",1)[1].split(); print((int(f[11])+int(f[12]))/os.sysconf("SC_CLK_TCK"))' "$1"; }

shoal_run() { # $1 = label suffix, rest = extra --env
  local suffix=$1; shift
  local url base
  start_replica --env SHOAL_TOOLSETS=kv "$@"
  wrk_measure "shoal$suffix legacy" legacy "$url" cpu_of "$base"
  wrk_measure "shoal$suffix 2026" modern "$url" cpu_of "$base"
  stop_replica
}

stock_run() { # $1 = label, rest = extra arguments of bench-rmcp-stock
  local label=$1; shift
  start_stock "$@"
  wrk_measure "$label legacy" legacy "$stock_url" proc_cpu "$stock"
  if [ "${1:-}" = --json-response ]; then
    wrk_measure "$label 2026" modern "$stock_url" proc_cpu "$stock"
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
wrk_summary \
  "legacy: shoal / stock rmcp=shoal legacy/rmcp legacy" \
  "legacy: shoal / rmcp JSON-response=shoal legacy/rmcp-json legacy" \
  "2026:   shoal / rmcp JSON-response=shoal 2026/rmcp-json 2026" \
  "traced / untraced, legacy=shoal traced legacy/shoal legacy" \
  "traced / untraced, 2026=shoal traced 2026/shoal 2026"
