#!/usr/bin/env bash
# The chaos run: one baseline run of the load generator (150 sessions, half of each protocol era,
# subscriptions on, a share of PostgreSQL reads) through nginx in front of 3 replicas, with every
# fault of the schedule below injected through shoal-cluster's control endpoint: a replica killed
# (and started again), Redis restarted (append-only file on), one replica partitioned from Redis
# for 10 s, PostgreSQL restarted, Redis frozen for 5 s, and a rolling restart. Prints the per-fault
# report and writes it (JSON, SVG) to $CHAOS_OUT (default target/chaos). Exits non-zero when a
# call other than a database call failed, or a notification or a write was lost.
#
# Usage: scripts/chaos.sh [DURATION]   (default 115s; the schedule ends at 110 s)
# Needs: cargo build --release --workspace --all-targets --locked (run here when stale),
# redis-server, nginx, PostgreSQL, curl, jq (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-115s}
out=${CHAOS_OUT:-target/chaos}
bin=target/release
mkdir -p "$out"
cargo build --release --workspace --all-targets --locked

ready="$out/ready.json"
rm -f "$ready"
"$bin/shoal-cluster" --replicas 3 --postgres --redis-aof --redis-proxies --control-port 0 \
  --env SHOAL_CACHE_TTLS=pg_query=0 \
  --ready-file "$ready" >"$out/cluster.log" 2>&1 &
cluster=$!
trap 'kill $cluster 2>/dev/null || true; wait $cluster 2>/dev/null || true' EXIT
for _ in $(seq 1 900); do [ -s "$ready" ] && break; sleep 0.1; done
[ -s "$ready" ] || { cat "$out/cluster.log"; echo "the cluster did not start" >&2; exit 1; }
url=$(jq -r .mcp_url "$ready")
control=$(jq -r .control_url "$ready")
post="curl -fsS -X POST $control"

cat >"$out/schedule.toml" <<EOF
[[fault]]
name = "replica r2 killed"
at = "10s"
run = "$post/replicas/r2/kill"
heal_after = "15s"
heal = "$post/replicas/r2/start"

[[fault]]
name = "Redis restarted (AOF)"
at = "30s"
run = "$post/redis/restart"

[[fault]]
name = "r3 cut off from Redis"
at = "45s"
run = "$post/redis/partition/r3"
heal_after = "10s"
heal = "$post/redis/heal/r3"

[[fault]]
name = "PostgreSQL restarted"
at = "65s"
run = "$post/postgres/stop"
heal_after = "5s"
heal = "$post/postgres/start"

[[fault]]
name = "Redis frozen 5 s"
at = "80s"
run = "$post/redis/freeze"
heal_after = "5s"
heal = "$post/redis/thaw"

[[fault]]
name = "rolling restart"
at = "95s"
run = "$post/replicas/rolling-restart"
EOF

status=0
"$bin/shoal-loadtest" run --url "$url" --scenario baseline --era both --sessions 150 \
  --mix kv_get=35,echo=25,kv_set=20,sleep=10,pg_query=10 --duration "$duration" --retries 10 \
  --chaos "$out/schedule.toml" --max-error-rate 1 --quiet \
  --json "$out/report.json" --plot "$out/report.svg" || status=$?
# Database calls fail (clearly, as tool errors) while PostgreSQL is down: nothing else may.
other=$(jq '[.errors_by_kind | to_entries[] | select(.key != "tool_error_pg_query") | .value] | add // 0' "$out/report.json")
if [ "$other" != 0 ]; then
  echo "FAILED: $other calls other than database calls failed" >&2
  status=1
fi
echo "chaos: report $out/report.json, plot $out/report.svg"
exit $status
