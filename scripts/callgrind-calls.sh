#!/usr/bin/env bash
# Instructions per tools/call, shoal next to stock rmcp 3.11, counted by callgrind (valgrind).
# Unlike the wrk benchmarks, the count does not depend on what else the machine is doing: the same
# binary and requests give the same figure within a fraction of a percent, so a change of a few
# percent in the work a call costs shows up here when throughput runs are too noisy to see it.
#
# For each server and era: start it under callgrind, load it for 2 s with wrk on one connection
# (scripts/wrk/call.lua, as bench-wrk.sh: one call after another), zero the counters, load it again
# for --seconds, dump, and divide by the calls wrk counted. What it does not count: the kernel (system calls, scheduling) and waiting; those show in bench-wrk.sh.
#
# Usage: scripts/callgrind-calls.sh [--seconds 8] [--redis] [--traced]
#   --redis   shoal on a Redis started here (default: shoal's embedded in-memory backends, which is
#             closest to stock rmcp's in-process sessions)
#   --traced  also shoal with every request traced (100 % sampling, OTLP/HTTP to shoal-otlp-sink):
#             the instructions tracing adds, its batch exporter thread included
# Environment: CALLGRIND_ARGS, extra callgrind options (e.g. --cache-sim=yes for simulated cache
# misses). Caveats: callgrind counts every byte of a `rep movsb` copy as an instruction, and under
# valgrind SHA-256 runs without the CPU's SHA extensions, so copies and hashing weigh more here than
# in time (docs/benchmarks.md).
# Needs: cargo build --release --workspace; valgrind and wrk (scripts/install-deps.sh --bench);
# redis-server with --redis.
# Leaves the profiles in target/callgrind/ for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_COUNTED=8
REDIS=""
TRACED=""
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) SECONDS_COUNTED=$2; shift 2 ;;
    --redis) REDIS=1; shift ;;
    --traced) TRACED=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v valgrind > /dev/null || { echo "valgrind is not installed" >&2; exit 1; }
# BIN, WORK, free_port, open_session, the OTLP sink (on $HTTP) and TRACE_ALL.
. scripts/bench-common.sh
OUT=target/callgrind
mkdir -p "$OUT"
server=""; redis=""
stop() { # PID: ends a process started here
  if [ -n "$1" ]; then kill "$1" 2> /dev/null || true; wait "$1" 2> /dev/null || true; fi
}
trap 'stop "$server"; stop "$redis"; cleanup' EXIT

if [ -n "$REDIS" ]; then
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no > "$WORK/redis.log" 2>&1 &
  redis=$!
  for _ in $(seq 1 50); do redis-cli -p "$rport" ping > /dev/null 2>&1 && break; sleep 0.1; done
fi

# count NAME ERA PORT COMMAND...: prints "NAME ERA instructions-per-call"; the server's extra
# environment in RUN_ENV.
RUN_ENV=()
count() {
  local name=$1 era=$2 port=$3; shift 3
  local file="$OUT/$name-$era.out" url="http://127.0.0.1:$port/mcp" session="" line total
  rm -f "$file"*
  env "${RUN_ENV[@]}" valgrind --tool=callgrind ${CALLGRIND_ARGS:-} --callgrind-out-file="$file" "$@" > "$WORK/$name.log" 2>&1 &
  server=$!
  for _ in $(seq 1 600); do curl -s -o /dev/null "$url" && break; sleep 0.2; done
  [ "$era" = legacy ] && session=$(open_session "$url")
  ERA=$era SESSION=$session wrk -t1 -c1 -d2s -s scripts/wrk/call.lua "$url" > /dev/null
  callgrind_control -z "$server" > /dev/null 2>&1
  line=$(ERA=$era SESSION=$session wrk -t1 -c1 -d"${SECONDS_COUNTED}s" -s scripts/wrk/call.lua "$url" | grep '^WRK')
  callgrind_control -d "$server" > /dev/null 2>&1
  stop "$server"; server=""
  total=$(awk '/^totals:/{print $2}' "$file.1")
  python3 - "$name" "$era" "$total" "$line" <<'PY' | tee -a "$WORK/results.txt"
import sys
name, era, total, line = sys.argv[1:5]
f = dict(kv.split("=") for kv in line.split()[1:])
if int(f["failed"]):
    sys.exit(f"{name} {era}: {f['failed']} of {f['requests']} calls failed")
print(name, era, int(total) // int(f["requests"]), f["requests"])
PY
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

# TRACE_ALL as plain KEY=VALUE pairs (it is written as shoal-cluster's --env arguments).
traced_env=()
for arg in "${TRACE_ALL[@]}"; do [ "$arg" = --env ] || traced_env+=("$arg"); done

for era in legacy modern; do
  shoal shoal "$era"
  [ -n "$TRACED" ] && shoal shoal-traced "$era" "${traced_env[@]}"
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
