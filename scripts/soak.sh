#!/usr/bin/env bash
# The soak: the baseline load on a local 3-replica cluster (real Redis, replicas, nginx) for a long
# time, sampling once a minute what must stay flat: every replica's resident memory and live async
# tasks, Redis's memory and key count. Writes a CSV and an SVG plot; fails when a run's error rate
# or lost notifications are not zero, or when a quantity grew beyond the tolerance between the
# second and the last quarter of the run (the first is the warm-up, in which caches and Redis fill
# up). Not part of CI (it takes 30 minutes).
#
# Usage: scripts/soak.sh [DURATION]        (default 30m; humantime syntax: 90s, 10m, 1h)
#   SOAK_OUT=dir       where the CSV, the reports and the plot go (default target/soak)
#   SOAK_SESSIONS=150  sessions, half per protocol era (the baseline's 150)
#   SOAK_GROWTH=1.25   tolerated ratio last-quarter / second-quarter mean for every series
#
# Needs: cargo build --release --workspace --all-targets --locked (run here when stale),
# redis-server, nginx (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-30m}
out=${SOAK_OUT:-target/soak}
sessions=${SOAK_SESSIONS:-150}
growth=${SOAK_GROWTH:-1.25}
bin=target/release
mkdir -p "$out"
cargo build --release --workspace --all-targets --locked

ready="$out/ready.json"
rm -f "$ready"
"$bin/shoal-cluster" --replicas 3 --ready-file "$ready" >"$out/cluster.log" 2>&1 &
cluster=$!
loads=()
cleanup() {
  for pid in "${loads[@]}"; do kill "$pid" 2>/dev/null || true; done
  kill "$cluster" 2>/dev/null || true
  wait "$cluster" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 600); do [ -s "$ready" ] && break; sleep 0.1; done
[ -s "$ready" ] || { cat "$out/cluster.log"; echo "the cluster did not start" >&2; exit 1; }
url=$(jq -r .mcp_url "$ready")
redis=$(jq -r .redis_admin_url "$ready")

# One load generator for both eras (even sessions legacy, odd ones 2026-07-28): the subscription
# keys and the notification accounting are per run, so two runs on one cluster would write each
# other's keys.
"$bin/shoal-loadtest" run --url "$url" --era both --sessions "$sessions" --duration "$duration" \
  --retries 3 --quiet --json "$out/report.json" >"$out/loadtest.log" 2>&1 &
loads+=($!)

csv="$out/soak.csv"
echo "minute,series,value" >"$csv"
sample() {
  local minute=$1
  for base in $(jq -r '.replicas[].base_url' "$ready"); do
    local name metrics
    name=$(jq -r --arg b "$base" '.replicas[] | select(.base_url == $b) | .name' "$ready")
    metrics=$(curl -fsS --max-time 5 "$base/metrics" || true)
    echo "$minute,rss_mib_$name,$(awk '/^shoal_process_resident_memory_bytes /{printf "%.1f", $2/1048576}' <<<"$metrics")" >>"$csv"
    echo "$minute,tasks_$name,$(awk '/^shoal_runtime_alive_tasks /{print $2}' <<<"$metrics")" >>"$csv"
  done
  echo "$minute,redis_used_mib,$(redis-cli -u "$redis" info memory | awk -F: '/^used_memory:/{printf "%.2f", $2/1048576}')" >>"$csv"
  echo "$minute,redis_keys,$(redis-cli -u "$redis" dbsize | tr -d '\r')" >>"$csv"
}
minute=0
sample "$minute"
running() { kill -0 "${loads[0]}" 2>/dev/null; }
while running; do
  for _ in $(seq 1 60); do
    sleep 1
    running || break
  done
  running || break
  minute=$((minute + 1))
  sample "$minute"
done
# Once the load is over (its sessions deleted): what is left, apart from the series above.
csv_loaded=$csv
csv="$out/after.csv"
echo "minute,series,value" >"$csv"
sleep 5
sample "$((minute + 1))"
cat "$csv"
csv=$csv_loaded
status=0
wait "${loads[0]}" || status=1
cat "$out/loadtest.log"
"$bin/shoal-loadtest" plot-soak --csv "$csv" --svg "$out/soak.svg" --max-growth "$growth" || status=1
echo "soak: CSV $csv, plot $out/soak.svg, report $out/report.json"
exit $status
