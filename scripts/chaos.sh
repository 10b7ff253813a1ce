#!/usr/bin/env bash
# The chaos run: one baseline run of the load generator (150 sessions, half of each protocol era,
# subscriptions on, a share of PostgreSQL reads) through nginx in front of 3 replicas, with every
# fault of the schedule below injected through shoal-cluster's control endpoint: a replica killed
# (and started again), Redis restarted (append-only file on), one replica partitioned from Redis
# for 10 s, PostgreSQL restarted, Redis frozen for 5 s, and a rolling restart. Prints the per-fault
# report and writes it (JSON, SVG) to $CHAOS_OUT (default target/chaos). Exits non-zero when a
# notification or a write was lost, or a call failed other than as a fault struck (see the end).
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
# What a fault may cost: database calls fail (clearly, as tool errors) while PostgreSQL is down, and
# a Redis fault catches the key-value calls already in flight on the replicas it strikes (they wait
# for their command to time out, SHOAL_REDIS_TIMEOUT_MS = 2 s by default, and end in a "retry
# shortly" tool error), until those replicas fail closed. Nothing else may fail, and nothing at
# other times: a failure outside [fault, fault + 2 timeouts + 1 s] (Redis) or [stop, start + 1 s]
# (PostgreSQL) fails the run.
kinds=$(jq -r '[.errors_by_kind | keys[] | select(. != "tool_error_kv_get" and . != "tool_error_kv_set" and . != "tool_error_pg_query")] | join(" ")' "$out/report.json")
if [ -n "$kinds" ]; then
  echo "FAILED: calls failed with $kinds" >&2
  status=1
fi
outside=$(jq -c --argjson t 2 '
  ([.faults[] | select(.name | test("Redis")) | [(.at_secs | floor), .at_secs + 2 * $t + 1]]
   + [.faults[] | select(.name | test("PostgreSQL")) | [(.at_secs | floor), (.ended_secs // .at_secs) + 1]]) as $windows
  | [.timeline[] | select(.errors > 0) | .second as $s
     | select([$windows[] | select($s >= .[0] and $s < .[1])] | length == 0) | $s]' "$out/report.json")
if [ "$outside" != "[]" ]; then
  echo "FAILED: calls failed outside the faults' windows, at seconds $outside" >&2
  status=1
fi
echo "chaos: report $out/report.json, plot $out/report.svg"
exit $status
