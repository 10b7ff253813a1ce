#!/usr/bin/env bash
# What spreading the keys over a Redis Cluster's shards buys, measured side by side: the same load
# on the same 6-node cluster (3 primaries, 3 replicas), once with every key in one slot (the key
# prefix a hash tag: one shard does all the work) and once with the keys spread (the default).
# Alternates the two modes for --rounds rounds and prints, per run, the cluster's throughput and
# each primary's Redis CPU (used_cpu_sys + used_cpu_user over the measured run, in % of a core).
#
# Usage: scripts/shard-scaling.sh [--duration 20s] [--rounds 2] [--sessions 64]
#                                 [--mix kv_set=50,kv_get=50] [--bin-dir target/release]
# Needs built binaries (cargo build --release --workspace) and redis-server/redis-cli.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=20s
ROUNDS=2
SESSIONS=64
MIX="kv_set=50,kv_get=50"
BIN_DIR=target/release
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --sessions) SESSIONS=$2; shift 2 ;;
    --mix) MIX=$2; shift 2 ;;
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
for bin in shoal-cluster shoal-loadtest shoal-server; do
  [ -x "$BIN_DIR/$bin" ] || { echo "$BIN_DIR/$bin missing: cargo build --release --workspace" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/shoal-shard-scaling.XXXXXX)
CLUSTER_PID=
cleanup() {
  if [ -n "$CLUSTER_PID" ]; then kill "$CLUSTER_PID" 2>/dev/null || true; wait "$CLUSTER_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

# Redis CPU seconds (sys + user) of the node on port $1.
redis_cpu() {
  timeout 5 redis-cli -p "$1" INFO cpu | tr -d '\r' |
    awk -F: '/^used_cpu_sys:/ {s=$2} /^used_cpu_user:/ {u=$2} END {printf "%.3f", s + u}'
}

run_one() {
  local mode=$1 round=$2 dir="$WORK/$1-$2" flags=(--redis-cluster)
  mkdir -p "$dir"
  [ "$mode" = one-slot ] && flags+=(--redis-one-slot)
  "$BIN_DIR/shoal-cluster" "${flags[@]}" --replicas 3 --ready-file "$dir/ready.json" \
    > "$dir/cluster.log" 2>&1 &
  CLUSTER_PID=$!
  for _ in $(seq 1 240); do
    [ -s "$dir/ready.json" ] && break
    kill -0 "$CLUSTER_PID" 2>/dev/null || { cat "$dir/cluster.log" >&2; exit 1; }
    sleep 0.5
  done
  [ -s "$dir/ready.json" ] || { echo "the cluster did not start in 120 s" >&2; exit 1; }
  local url ports
  url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mcp_url"])' "$dir/ready.json")
  ports=$(python3 -c 'import json,sys; print(" ".join(map(str, json.load(open(sys.argv[1]))["redis_primary_ports"])))' "$dir/ready.json")
  # Warm-up outside the measurement: sessions, subscriptions and scripts loaded on every node.
  "$BIN_DIR/shoal-loadtest" run --url "$url" --quiet --scenario max --era both \
    --sessions "$SESSIONS" --mix "$MIX" --subscribe true --duration 3s --warmup 1s > /dev/null
  local before=() after=() port
  for port in $ports; do before+=("$(redis_cpu "$port")"); done
  "$BIN_DIR/shoal-loadtest" run --url "$url" --quiet --scenario max --era both \
    --sessions "$SESSIONS" --mix "$MIX" --subscribe true --duration "$DURATION" --warmup 1s \
    --json "$dir/report.json" > "$dir/load.log" 2>&1 || true
  for port in $ports; do after+=("$(redis_cpu "$port")"); done
  python3 - "$mode" "$round" "$dir/report.json" "${before[*]}" "${after[*]}" <<'EOF'
import json, sys
mode, rnd, path, before, after = sys.argv[1:6]
report = json.load(open(path))
secs = report["duration_secs"]
shards = [100 * (float(a) - float(b)) / secs for a, b in zip(after.split(), before.split())]
shards.sort(reverse=True)
n = report["notifications"]
print(f"{mode:<9} round {rnd}: {report['throughput_per_sec']:8.0f} calls/s, "
      f"{report['errors']} errors, notifications {n['delivered']}/{n['expected']} (lost {n['lost']}); "
      f"Redis CPU per primary " + ", ".join(f"{c:5.1f} %" for c in shards) +
      f" (sum {sum(shards):5.1f} %, busiest {shards[0]:5.1f} %)")
EOF
  cleanup
  CLUSTER_PID=
}

echo "shard scaling: --duration $DURATION --sessions $SESSIONS --mix $MIX, both eras, subscriptions on"
for round in $(seq 1 "$ROUNDS"); do
  run_one one-slot "$round"
  run_one spread "$round"
done
echo "runs kept in $WORK"
