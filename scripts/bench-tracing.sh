#!/usr/bin/env bash
# Cost of tracing: maximum throughput and server CPU per request of one replica on Redis with
# tracing off, and with every request traced (100 % sampling, OTLP HTTP/protobuf) into
# shoal-otlp-sink. Rounds alternate off/on to spread the machine's drift over both; prints each
# round and the medians.
#
# The sink runs on the same machine as the server, Redis and the load generator. By default it only
# counts what it receives (--max-spans 0), so its own CPU use stays small; --decode makes it decode
# and keep spans like a real backend would, at a CPU cost the server then competes with.
#
# Usage: scripts/bench-tracing.sh [--duration 15s] [--rounds 3] [--sessions 32] [--sampler always_on]
#                                 [--sampler-arg 1.0] [--protocol http/protobuf|grpc] [--decode]
#                                 [--on-env KEY=VALUE]...   (extra environment of the traced runs)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=15s
ROUNDS=3
SESSIONS=32
SAMPLER=always_on
SAMPLER_ARG=1.0
PROTOCOL=http/protobuf
MAX_SPANS=0
ON_ENV=()
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --sessions) SESSIONS=$2; shift 2 ;;
    --sampler) SAMPLER=$2; shift 2 ;;
    --sampler-arg) SAMPLER_ARG=$2; shift 2 ;;
    --protocol) PROTOCOL=$2; shift 2 ;;
    --decode) MAX_SPANS=100000; shift ;;
    --on-env) ON_ENV+=(--env "$2"); shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
SINK_MAX_SPANS=$MAX_SPANS
. scripts/bench-common.sh
if [ "$PROTOCOL" = grpc ]; then ENDPOINT="http://127.0.0.1:$GRPC"; else ENDPOINT="http://127.0.0.1:$HTTP"; fi

run() { # $1 = label, rest = extra --env for the replica; appends "label ok/s us/request" to results
  local label=$1; shift
  local url base before after
  start_replica --env SHOAL_TOOLSETS=kv "$@"
  # Warm up outside the measurement, then measure the server's CPU over the measured run.
  "$BIN/shoal-loadtest" run --url "$url" --scenario max --era legacy --sessions "$SESSIONS" \
    --mix kv_get=4,kv_set=1,echo=2 --duration 3s --warmup 0s --quiet > /dev/null
  before=$(cpu_of "$base")
  "$BIN/shoal-loadtest" run --url "$url" --scenario max --era legacy --sessions "$SESSIONS" \
    --mix kv_get=4,kv_set=1,echo=2 --duration "$DURATION" --warmup 0s --json "$WORK/run.json" --quiet > /dev/null
  after=$(cpu_of "$base")
  python3 - "$WORK/run.json" "$before" "$after" "$label" >> "$WORK/results.txt" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
ok = report["ok"]; secs = report["duration_secs"]
cpu = float(sys.argv[3]) - float(sys.argv[2])
print(f"{sys.argv[4]}\t{ok / secs:.0f}\t{cpu / ok * 1e6:.1f}")
PY
  tail -1 "$WORK/results.txt" | awk -F'\t' '{printf "%-4s %8s ok/s %8s us CPU/request\n", $1, $2, $3}'
  stop_replica
}

echo "workload: legacy sessions=$SESSIONS mix kv_get=4,kv_set=1,echo=2, $DURATION per run; sampler $SAMPLER; OTLP $PROTOCOL; sink decodes: $([ "$MAX_SPANS" = 0 ] && echo no || echo yes)"
for _ in $(seq 1 "$ROUNDS"); do
  run off
  run on --env "OTEL_EXPORTER_OTLP_ENDPOINT=$ENDPOINT" --env "OTEL_EXPORTER_OTLP_PROTOCOL=$PROTOCOL" \
    --env "OTEL_TRACES_SAMPLER=$SAMPLER" --env "OTEL_TRACES_SAMPLER_ARG=$SAMPLER_ARG" --env OTEL_METRICS_EXPORTER=none "${ON_ENV[@]}"
done
python3 - "$WORK/results.txt" <<'PY'
import statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
med = {}
for label in ("off", "on"):
    ok = statistics.median(float(r[1]) for r in rows if r[0] == label)
    cpu = statistics.median(float(r[2]) for r in rows if r[0] == label)
    med[label] = (ok, cpu)
    print(f"median {label:3}: {ok:8.0f} ok/s {cpu:8.1f} us CPU/request")
print(f"tracing cost: throughput {100 * (1 - med['on'][0] / med['off'][0]):.1f} %, server CPU per request +{100 * (med['on'][1] / med['off'][1] - 1):.1f} %")
PY
stats=$(curl -s "127.0.0.1:$HTTP/api/stats")
echo "sink received: $stats"
