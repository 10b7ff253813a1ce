# Shared by the single-replica benchmarks (bench-tracing.sh, bench-ab.sh); sourced, not run.
# Sets BIN and WORK, starts shoal-otlp-sink on two free ports (GRPC, HTTP; its spans kept:
# SINK_MAX_SPANS, default 0 = only counted), and on exit stops the sink and the cluster whose pid
# is in $cluster, then removes WORK.
BIN=target/release
WORK=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GRPC=$(free_port); HTTP=$(free_port)
cluster=""; sink=""
cleanup() {
  if [ -n "$cluster" ]; then kill "$cluster" 2>/dev/null || true; wait "$cluster" 2>/dev/null || true; fi
  if [ -n "$sink" ]; then kill "$sink" 2>/dev/null || true; wait "$sink" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
"$BIN/shoal-otlp-sink" --grpc "127.0.0.1:$GRPC" --http "127.0.0.1:$HTTP" --max-spans "${SINK_MAX_SPANS:-0}" 2> "$WORK/sink.log" &
sink=$!
json() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$@"; }
cpu_of() { curl -s "$1/metrics" | awk '$1=="shoal_process_cpu_seconds_total"{print $2}'; }
