#!/usr/bin/env bash
# Measures the memory one replica holds for idle legacy sessions: RSS before, with N sessions open,
# and after they expired (idle TTL), plus Redis memory. Prints a Markdown table row set.
#
# Usage: scripts/bench-idle-sessions.sh [--count 10000] [--ttl 30]
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=10000
TTL=30
while [ $# -gt 0 ]; do
  case "$1" in
    --count) COUNT=$2; shift 2 ;;
    --ttl) TTL=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
BIN=target/release
WORK=$(mktemp -d)
trap 'kill $cluster 2>/dev/null; wait $cluster 2>/dev/null; rm -rf "$WORK"' EXIT
"$BIN/shoal-cluster" --replicas 1 --no-balancer --ready-file "$WORK/ready.json" \
  --env SHOAL_SESSION_IDLE_TTL_SECS="$TTL" --env SHOAL_MAX_LOCAL_SESSIONS=$((COUNT * 2)) > "$WORK/cluster.log" 2>&1 &
cluster=$!
for _ in $(seq 1 100); do [ -s "$WORK/ready.json" ] && break; sleep 0.1; done
read -r URL BASE PID REDIS PREFIX < <(python3 -c '
import json,sys; r=json.load(open(sys.argv[1])); x=r["replicas"][0]
print(x["mcp_url"], x["base_url"], x["pid"], r["redis_url"].rsplit(":",1)[1], r["prefix"])' "$WORK/ready.json")
rss() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }
metric() { curl -s "$BASE/metrics" | awk -v m="$1" '$1==m {print $2}'; }
redis_mem() { redis-cli -p "$REDIS" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r'; }
keys() { redis-cli -p "$REDIS" --scan --pattern "$PREFIX:sess:*" | wc -l; }

# Warm the replica up (allocator arenas, connection pools) before the baseline.
"$BIN/shoal-loadtest" idle-sessions --url "$URL" --count 200 > /dev/null
sleep $((TTL + 5))
base_rss=$(rss); base_redis=$(redis_mem)
"$BIN/shoal-loadtest" idle-sessions --url "$URL" --count "$COUNT" | tee "$WORK/open.txt"
open_rss=$(rss); open_redis=$(redis_mem); open_active=$(metric shoal_sessions_active); open_keys=$(keys)
echo "waiting for the sessions to expire (TTL ${TTL}s)..."
for _ in $(seq 1 $((TTL * 4))); do
  [ "$(metric shoal_sessions_active)" = "0" ] && [ "$(keys)" = "0" ] && break
  sleep 1
done
# jemalloc hands freed pages back to the system in the background (10 s dirty decay).
sleep 25
after_rss=$(rss); after_redis=$(redis_mem); after_active=$(metric shoal_sessions_active); after_keys=$(keys)
per_session=$(( (open_rss - base_rss) * 1024 / COUNT ))
cat <<TABLE

| state | replica RSS | session workers (shoal_sessions_active) | session keys in Redis | Redis used_memory |
|---|---|---|---|---|
| before (warmed up, no session) | $((base_rss / 1024)) MiB | 0 | 0 | $((base_redis / 1024)) KiB |
| $COUNT sessions open, idle | $((open_rss / 1024)) MiB | $open_active | $open_keys | $((open_redis / 1024)) KiB |
| after the idle TTL (${TTL}s) | $((after_rss / 1024)) MiB | $after_active | $after_keys | $((after_redis / 1024)) KiB |

Replica memory per open idle session: ~$per_session bytes; Redis per session: ~$(( (open_redis - base_redis) / COUNT )) bytes.
TABLE
