#!/usr/bin/env bash
# Instructions per tools/call, shoal next to stock rmcp 3.11, counted by callgrind (valgrind).
# Unlike the wrk benchmarks, the count does not depend on what else the machine is doing: the same
# binary and requests give the same figure within a fraction of a percent, so a change of a few
# percent in the work a call costs shows up here when throughput runs are too noisy to see it.
#
# For each server and era: start it under callgrind, send 200 warm-up calls, zero the counters,
# send N calls (one keep-alive connection, one call after another), dump, and divide. What it does
# not count: the kernel (system calls, scheduling) and waiting; those show in bench-wrk.sh.
#
# Usage: scripts/callgrind-calls.sh [--calls 2000] [--redis] [--traced]
#   --redis   shoal on a Redis started here (default: shoal's embedded in-memory backends, which is
#             closest to stock rmcp's in-process sessions)
#   --traced  also shoal with every request traced (100 % sampling, OTLP/HTTP to shoal-otlp-sink):
#             the instructions tracing adds, its batch exporter thread included
# Environment: CALLGRIND_ARGS, extra callgrind options (e.g. --cache-sim=yes for simulated cache
# misses). Caveats: callgrind counts every byte of a `rep movsb` copy as an instruction, and under
# valgrind SHA-256 runs without the CPU's SHA extensions, so copies and hashing weigh more here than
# in time (docs/benchmarks.md).
# Needs: cargo build --release --workspace; valgrind; redis-server with --redis.
# Leaves the profiles in target/callgrind/ for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."

CALLS=2000
REDIS=""
TRACED=""
while [ $# -gt 0 ]; do
  case $1 in
    --calls) CALLS=$2; shift 2 ;;
    --redis) REDIS=1; shift ;;
    --traced) TRACED=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v valgrind > /dev/null || { echo "valgrind is not installed" >&2; exit 1; }
BIN=target/release
OUT=target/callgrind
mkdir -p "$OUT"
WORK=$(mktemp -d)
server=""; redis=""; sink=""
cleanup() {
  if [ -n "$sink" ]; then kill "$sink" 2> /dev/null || true; wait "$sink" 2> /dev/null || true; fi
  if [ -n "$server" ]; then kill "$server" 2> /dev/null || true; wait "$server" 2> /dev/null || true; fi
  if [ -n "$redis" ]; then kill "$redis" 2> /dev/null || true; wait "$redis" 2> /dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
calls() { python3 scripts/callgrind/calls.py "$@"; }

if [ -n "$REDIS" ]; then
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no > "$WORK/redis.log" 2>&1 &
  redis=$!
  for _ in $(seq 1 50); do redis-cli -p "$rport" ping > /dev/null 2>&1 && break; sleep 0.1; done
fi

if [ -n "$TRACED" ]; then
  sink_http=$(free_port)
  "$BIN/shoal-otlp-sink" --grpc "127.0.0.1:$(free_port)" --http "127.0.0.1:$sink_http" --max-spans 0 \
    2> "$WORK/sink.log" &
  sink=$!
fi

# count NAME ERA PORT COMMAND...: prints "NAME ERA instructions-per-call"; the server's extra
# environment in RUN_ENV.
RUN_ENV=()
count() {
  local name=$1 era=$2 port=$3; shift 3
  local file="$OUT/$name-$era.out" session="" total
  rm -f "$file"*
  env "${RUN_ENV[@]}" valgrind --tool=callgrind ${CALLGRIND_ARGS:-} --callgrind-out-file="$file" "$@" > "$WORK/$name.log" 2>&1 &
  server=$!
  for _ in $(seq 1 600); do curl -s -o /dev/null "http://127.0.0.1:$port/mcp" && break; sleep 0.2; done
  [ "$era" = legacy ] && session=$(calls "$port" open legacy)
  calls "$port" call "$era" 200 "$session"
  callgrind_control -z "$server" > /dev/null 2>&1
  calls "$port" call "$era" "$CALLS" "$session"
  callgrind_control -d "$server" > /dev/null 2>&1
  kill "$server"; wait "$server" 2> /dev/null || true; server=""
  total=$(awk '/^totals:/{print $2}' "$file.1")
  echo "$name $era $((total / CALLS))" | tee -a "$WORK/results.txt"
}

# shoal NAME ERA [ENV...]: one shoal count, on Redis with --redis.
shoal() {
  local name=$1 era=$2 port; shift 2
  port=$(free_port)
  RUN_ENV=(SHOAL_LISTEN="127.0.0.1:$port" SHOAL_TOOLSETS=kv "$@")
  [ -n "$REDIS" ] && RUN_ENV+=(SHOAL_REDIS_URL="redis://127.0.0.1:$rport")
  count "$name" "$era" "$port" "$BIN/shoal-server"
  RUN_ENV=()
}

for era in legacy modern; do
  shoal shoal "$era"
  if [ -n "$TRACED" ]; then
    shoal shoal-traced "$era" OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$sink_http" \
      OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf OTEL_TRACES_SAMPLER=always_on OTEL_METRICS_EXPORTER=none
  fi
  port=$(free_port)
  count rmcp "$era" "$port" "$BIN/bench-rmcp-stock" "127.0.0.1:$port" --json-response
done
python3 - "$WORK/results.txt" <<'PY'
import sys
rows = {tuple(line.split()[:2]): int(line.split()[2]) for line in open(sys.argv[1])}
print("\ninstructions per call (user space)   shoal     stock rmcp   shoal / stock")
for era in ("legacy", "modern"):
    s, r = rows[("shoal", era)], rows[("rmcp", era)]
    print(f"  {era:<34} {s:>8,} {r:>12,}   {s / r:.2f}x")
    if ("shoal-traced", era) in rows:
        t = rows[("shoal-traced", era)]
        print(f"  {era + ', shoal traced':<34} {t:>8,}                {t / s:.2f}x untraced")
PY
