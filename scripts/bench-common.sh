# Shared by the single-replica benchmarks (bench-tracing.sh, bench-ab.sh, bench-wrk.sh, bench-auth.sh,
# callgrind-calls.sh); sourced, not run.
# Sets BIN and WORK, defines start_replica / stop_replica / start_stock / stop_stock / open_session / TRACE_ALL (below), starts
# shoal-otlp-sink on two free ports (GRPC, HTTP; its spans kept:
# SINK_MAX_SPANS, default 0 = only counted), and on exit stops the sink and the cluster whose pid
# is in $cluster, then removes WORK.
BIN=target/release
WORK=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GRPC=$(free_port); HTTP=$(free_port)
cluster=""; sink=""; stock=""
cleanup() {
  stop_stock
  if [ -n "$cluster" ]; then kill "$cluster" 2>/dev/null || true; wait "$cluster" 2>/dev/null || true; fi
  if [ -n "$sink" ]; then kill "$sink" 2>/dev/null || true; wait "$sink" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
"$BIN/shoal-otlp-sink" --grpc "127.0.0.1:$GRPC" --http "127.0.0.1:$HTTP" --max-spans "${SINK_MAX_SPANS:-0}" 2> "$WORK/sink.log" &
sink=$!
json() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$@"; }
# open_session URL: opens a legacy session (initialize + initialized) and prints its id; with TOKEN
# set, as that bearer.
open_session() {
  local id auth=()
  [ -n "${TOKEN:-}" ] && auth=(-H "authorization: Bearer $TOKEN")
  id=$(curl -s -D - -o /dev/null "$1" "${auth[@]}" -H 'content-type: application/json' \
    -H 'accept: application/json, text/event-stream' \
    -d '{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"wrk","version":"1"}}}' \
    | awk 'tolower($1)=="mcp-session-id:"{print $2}' | tr -d '\r')
  curl -s -o /dev/null "$1" "${auth[@]}" -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' \
    -H "mcp-session-id: $id" -H 'mcp-protocol-version: 2025-11-25' \
    -d '{"jsonrpc":"2.0","method":"notifications/initialized"}'
  echo "$id"
}
cpu_of() { curl -s "$1/metrics" | awk '$1=="shoal_process_cpu_seconds_total"{print $2}'; }

# start_replica ARGS...: one replica on Redis through shoal-cluster (no balancer), ARGS passed on
# (--env ..., --server-bin ..., --postgres); sets cluster (its pid), url (/mcp) and base (its
# admin/metrics base URL). Exits with the cluster's log when it is not ready within 60 s.
start_replica() {
  rm -f "$WORK/ready.json"
  "$BIN/shoal-cluster" --replicas 1 --no-balancer --ready-file "$WORK/ready.json" "$@" \
    > "$WORK/cluster.log" 2>&1 &
  cluster=$!
  for _ in $(seq 1 600); do [ -s "$WORK/ready.json" ] && break; sleep 0.1; done
  [ -s "$WORK/ready.json" ] || { cat "$WORK/cluster.log" >&2; exit 1; }
  url=$(json "$WORK/ready.json" 'd["mcp_url"]')
  base=$(json "$WORK/ready.json" 'd["replicas"][0]["base_url"]')
}
# start_stock ARGS...: stock rmcp 3.11 (bench-rmcp-stock, ARGS passed on) on a free port; sets
# stock (its pid) and stock_url (/mcp) once it answers.
start_stock() {
  local port; port=$(free_port)
  "$BIN/bench-rmcp-stock" "127.0.0.1:$port" "$@" 2> "$WORK/stock.log" &
  stock=$!
  stock_url="http://127.0.0.1:$port/mcp"
  for _ in $(seq 1 100); do curl -s -o /dev/null "$stock_url" && break; sleep 0.1; done
}
stop_stock() { if [ -n "$stock" ]; then kill "$stock" 2>/dev/null || true; wait "$stock" 2>/dev/null || true; stock=""; fi; }
stop_replica() { kill "$cluster"; wait "$cluster" 2>/dev/null || true; cluster=""; }
# Every request traced (100 % sampling), exported over OTLP/HTTP to the sink: extra start_replica args.
TRACE_ALL=(--env "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$HTTP" --env OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf
  --env OTEL_TRACES_SAMPLER=always_on --env OTEL_METRICS_EXPORTER=none)

# wrk_options ARGS...: the options of the wrk-driven benchmarks: --duration (10s), --connections
# (32), --rounds (3), into DURATION, CONNECTIONS and ROUNDS.
wrk_options() {
  DURATION=10s; CONNECTIONS=32; ROUNDS=3
  while [ $# -gt 0 ]; do
    case $1 in
      --duration) DURATION=$2; shift 2 ;;
      --connections) CONNECTIONS=$2; shift 2 ;;
      --rounds) ROUNDS=$2; shift 2 ;;
      *) echo "unknown option $1" >&2; exit 2 ;;
    esac
  done
}

# wrk_measure LABEL ERA URL CPU-COMMAND...: a 2 s warm-up, then one measured run of
# scripts/wrk/call.lua (tools/call echo; a legacy session of its own, TOKEN as bearer when set)
# against URL; CPU-COMMAND prints the server's CPU seconds before and after. Appends
# "label calls/s us-cpu/call p50 p99 failed" to $WORK/results.txt and prints it.
# With WRK_CONNECTIONS set, that many connections instead of CONNECTIONS (1: latency at one request
# in flight, one wrk thread).
# With WRK_SESSION_PER_CONNECTION=1 (legacy), a session of its own for each connection (wrk runs
# one thread per connection then).
wrk_measure() {
  local label=$1 era=$2 url=$3 session="" sessions="" before after line; shift 3
  local connections=${WRK_CONNECTIONS:-$CONNECTIONS} threads=2
  [ "$connections" -lt 2 ] && threads=1
  [ "$era" = legacy ] && session=$(open_session "$url")
  if [ "$era" = legacy ] && [ "${WRK_SESSION_PER_CONNECTION:-0}" = 1 ]; then
    threads=$connections
    for _ in $(seq 1 "$connections"); do sessions="$sessions$(open_session "$url"),"; done
  fi
  ERA=$era SESSION=$session SESSIONS=$sessions wrk -t"$threads" -c"$connections" -d2s -s scripts/wrk/call.lua "$url" > /dev/null
  before=$("$@")
  line=$(ERA=$era SESSION=$session SESSIONS=$sessions wrk -t"$threads" -c"$connections" -d"$DURATION" -s scripts/wrk/call.lua "$url" | grep '^WRK')
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

# wrk_summary "TITLE=LABEL/BASE"...: the medians of every label in $WORK/results.txt (over the rounds),
# then for each argument the ratio of LABEL's medians to BASE's (calls/s and CPU per call, and the
# p50 and p99 latencies).
wrk_summary() {
  python3 - "$WORK/results.txt" "$@" <<'PY'
import statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
med = {}
for label in dict.fromkeys(r[0] for r in rows):
    mine = [r for r in rows if r[0] == label]
    med[label] = (statistics.median(float(r[1]) for r in mine), statistics.median(float(r[2]) for r in mine),
                  sum(int(r[5]) for r in mine), statistics.median(float(r[3]) for r in mine),
                  statistics.median(float(r[4]) for r in mine))
print("\nmedians")
for label, (rate, cpu, failed, p50, p99) in med.items():
    print(f"  {label:<28} {rate:8.0f} calls/s {cpu:7.1f} us CPU/call  p50 {p50:.3f} ms  p99 {p99:.3f} ms  failed {failed}")
print("\nratios")
for spec in sys.argv[2:]:
    title, pair = spec.split("=", 1)
    a, b = (med[label] for label in pair.split("/", 1))
    print(f"  {title:<42} {a[0] / b[0]:.3f}x calls/s, {a[1] / b[1]:.3f}x CPU/call, "
          f"{a[3] / b[3]:.3f}x p50, {a[4] / b[4]:.3f}x p99")
PY
}
