#!/usr/bin/env bash
# shoal against stock rmcp 3.11, measured from outside with wrk, side by side in one run, in both
# protocol eras, for throughput (--connections, 32, two wrk threads) and for latency at one
# request in flight (one connection), and in the legacy era with a session per connection:
#
#   legacy     tools/call echo on one legacy session (Mcp-Session-Id), shoal on Redis vs stock rmcp
#              (LocalSessionManager, rmcp's defaults: SSE responses) and stock rmcp in JSON-response
#              mode;
#   2026-07-28 the stateless tools/call (per-request _meta), shoal on Redis vs stock rmcp in
#              JSON-response mode;
#   traced     shoal with every request traced (OTLP over HTTP to shoal-otlp-sink, 100% sampling).
#
# Every request carries a JSON-RPC id of its own (scripts/wrk/call.lua): until 2026-12-07 they all
# had id 1, and the 32 connections' requests on one legacy session, all pending with one id, were
# served one at a time, so the legacy figures measured a queue (docs/benchmarks.md).
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
  if [ -z "$suffix" ]; then
    WRK_CONNECTIONS=1 wrk_measure "shoal legacy c1" legacy "$url" cpu_of "$base"
    WRK_CONNECTIONS=1 wrk_measure "shoal 2026 c1" modern "$url" cpu_of "$base"
    WRK_SESSION_PER_CONNECTION=1 wrk_measure "shoal legacy per-conn" legacy "$url" cpu_of "$base"
  fi
  stop_replica
}

stock_run() { # $1 = label, rest = extra arguments of bench-rmcp-stock
  local label=$1; shift
  start_stock "$@"
  wrk_measure "$label legacy" legacy "$stock_url" proc_cpu "$stock"
  WRK_CONNECTIONS=1 wrk_measure "$label legacy c1" legacy "$stock_url" proc_cpu "$stock"
  WRK_SESSION_PER_CONNECTION=1 wrk_measure "$label legacy per-conn" legacy "$stock_url" proc_cpu "$stock"
  if [ "${1:-}" = --json-response ]; then
    wrk_measure "$label 2026" modern "$stock_url" proc_cpu "$stock"
    WRK_CONNECTIONS=1 wrk_measure "$label 2026 c1" modern "$stock_url" proc_cpu "$stock"
  fi
  stop_stock
}

echo "wrk -t2 -c$CONNECTIONS and -t1 -c1 (c1), $DURATION per run, $ROUNDS rounds; tools/call echo, an id per request"
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
  "legacy, one in flight: shoal / stock rmcp=shoal legacy c1/rmcp legacy c1" \
  "legacy, a session per connection: shoal / rmcp=shoal legacy per-conn/rmcp legacy per-conn" \
  "2026, one in flight: shoal / rmcp JSON-response=shoal 2026 c1/rmcp-json 2026 c1" \
  "traced / untraced, legacy=shoal traced legacy/shoal legacy" \
  "traced / untraced, 2026=shoal traced 2026/shoal 2026"
