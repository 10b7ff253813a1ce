#!/usr/bin/env bash
# Before/after: the same workloads against two shoal-server binaries, side by side in one run, so
# a change to a hot path is measured against its parent on the same machine at the same time.
# Rounds alternate which binary goes first, spreading the machine's drift over both; prints every
# run and, per workload, the medians and the after/before ratios.
#
# Workloads (one replica on Redis, no balancer, 32 legacy sessions in a closed loop, no think time):
#   echo       tools/call echo: the per-request path (HTTP entry, session checks, limits)
#   traced     kv_get/kv_set/echo 4:1:2 with every request traced (100 % sampling, OTLP
#              HTTP/protobuf into shoal-otlp-sink): the span path
#   notify     kv_set with every session subscribed to a key another session writes and holding
#              its GET stream: the event-append and bus path
#   pg         pg_query on the demo schema with the result cache off: the database path
#
# Both binaries run under the topology of this checkout's test kit (its Redis ACL user, database
# roles and environment); settings one binary does not know are ignored by it.
#
# Usage: scripts/bench-ab.sh --before BIN --after BIN [--duration 15s] [--rounds 3]
#                            [--workloads echo,traced,notify,pg]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=15s
ROUNDS=3
SESSIONS=32
WORKLOADS=echo,traced,notify,pg
BEFORE=""; AFTER=""
while [ $# -gt 0 ]; do
  case "$1" in
    --before) BEFORE=$(realpath "$2"); shift 2 ;;
    --after) AFTER=$(realpath "$2"); shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --workloads) WORKLOADS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -x "$BEFORE" ] && [ -x "$AFTER" ] || { echo "--before and --after must name shoal-server binaries" >&2; exit 2; }
. scripts/bench-common.sh
sink_bytes() { curl -s "127.0.0.1:$HTTP/api/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes"])'; }

run() { # $1 = workload, $2 = label (before|after), $3 = binary; appends a result line
  local workload=$1 label=$2 server=$3
  local cluster_args=(--env SHOAL_TOOLSETS=kv) load_args=(--mix echo=1)
  case "$workload" in
    echo) ;;
    traced)
      cluster_args+=("${TRACE_ALL[@]}")
      load_args=(--mix kv_get=4,kv_set=1,echo=2) ;;
    notify) load_args=(--mix kv_set=1 --subscribe true) ;;
    pg)
      cluster_args=(--postgres --env SHOAL_TOOLSETS=postgres --env SHOAL_CACHE_TTLS=pg_query=0)
      load_args=(--mix pg_query=1 --pg-sql "SELECT name, tier FROM services ORDER BY name") ;;
    *) echo "unknown workload $workload" >&2; exit 2 ;;
  esac
  local url base before after bytes_before bytes_after
  start_replica --server-bin "$server" "${cluster_args[@]}"
  "$BIN/shoal-loadtest" run --url "$url" --scenario max --era legacy --sessions "$SESSIONS" \
    "${load_args[@]}" --duration 3s --warmup 0s --quiet > /dev/null
  before=$(cpu_of "$base"); bytes_before=$(sink_bytes)
  "$BIN/shoal-loadtest" run --url "$url" --scenario max --era legacy --sessions "$SESSIONS" \
    "${load_args[@]}" --duration "$DURATION" --warmup 0s --json "$WORK/run.json" --quiet > /dev/null
  after=$(cpu_of "$base")
  sleep 6 # the exporter's batch interval (5 s): spans of the run reach the sink
  bytes_after=$(sink_bytes)
  python3 - "$WORK/run.json" "$before" "$after" "$workload" "$label" "$bytes_before" "$bytes_after" >> "$WORK/results.txt" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
ok = report["ok"]; secs = report["duration_secs"]; errors = report.get("errors", 0)
cpu = float(sys.argv[3]) - float(sys.argv[2])
otlp = (int(sys.argv[7]) - int(sys.argv[6])) / ok
print(f"{sys.argv[4]}\t{sys.argv[5]}\t{ok / secs:.0f}\t{cpu / ok * 1e6:.1f}\t{errors}\t{otlp:.0f}")
PY
  tail -1 "$WORK/results.txt" | awk -F'\t' '{printf "%-7s %-6s %8s ok/s %8s us CPU/call %s errors %6s OTLP bytes/call\n", $1, $2, $3, $4, $5, $6}'
  stop_replica
}

echo "before: $BEFORE"
echo "after:  $AFTER"
echo "workloads: $WORKLOADS; $SESSIONS legacy sessions, closed loop, $DURATION per run, $ROUNDS rounds"
IFS=, read -ra LIST <<< "$WORKLOADS"
for round in $(seq 1 "$ROUNDS"); do
  for workload in "${LIST[@]}"; do
    if [ $((round % 2)) = 1 ]; then
      run "$workload" before "$BEFORE"; run "$workload" after "$AFTER"
    else
      run "$workload" after "$AFTER"; run "$workload" before "$BEFORE"
    fi
  done
done
python3 - "$WORK/results.txt" <<'PY'
import statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
print()
print("| workload | before ok/s | after ok/s | after/before | before µs CPU/call | after µs CPU/call | after/before | errors |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for workload in dict.fromkeys(r[0] for r in rows):
    med = {}
    for label in ("before", "after"):
        sel = [r for r in rows if r[0] == workload and r[1] == label]
        med[label] = (statistics.median(float(r[2]) for r in sel),
                      statistics.median(float(r[3]) for r in sel),
                      sum(int(r[4]) for r in sel))
    b, a = med["before"], med["after"]
    print(f"| {workload} | {b[0]:.0f} | {a[0]:.0f} | {a[0] / b[0]:.2f}× | {b[1]:.1f} | {a[1]:.1f} | {a[1] / b[1]:.2f}× | {b[2]} / {a[2]} |")
PY
