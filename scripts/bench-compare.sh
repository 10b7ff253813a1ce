#!/usr/bin/env bash
# The comparison benchmark of docs/benchmarks.md, every figure in one run on one machine:
#
#   1. a trivial tool call (echo), legacy era, closed loop: shoal with Redis (1 and 3 replicas
#      behind nginx, and 1 replica direct), shoal embedded, and a stock rmcp server
#      (LocalSessionManager);
#   2. the same tool on the official TypeScript SDK and on FastMCP (installed from npm and PyPI
#      into target/peers);
#   3. a PostgreSQL read through the result cache vs uncached, 150 sessions, and how many times
#      PostgreSQL ran the query (its own statistics) per key per TTL window;
#   4. cross-replica notification latency (writes sent to one replica, the subscribers' streams
#      held by another), Redis commands per tool call (INFO commandstats), replica RSS with
#      10,000 idle sessions;
#   5. a bare hyper server answering a fixed body (the HTTP ceiling of the machine), driven by wrk.
#
# Also the baseline scenario through 3 replicas with its plot (docs/img/baseline-3-replicas.svg).
# Results: JSON reports in target/bench-compare/, a summary on standard output.
#
# Usage: scripts/bench-compare.sh [--duration 20s] [--sessions 32] [--skip-peers] [--skip-idle]
# Needs: cargo build --release --workspace; node/npm; python3; wrk (scripts/install-deps.sh --bench, run here).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=20s
SESSIONS=32
SKIP_PEERS=false
SKIP_IDLE=false
while [ $# -gt 0 ]; do
  case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --sessions) SESSIONS=$2; shift 2 ;;
    --skip-peers) SKIP_PEERS=true; shift ;;
    --skip-idle) SKIP_IDLE=true; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

BIN=target/release
OUT=target/bench-compare
PEERS=target/peers
mkdir -p "$OUT" docs/img
for bin in shoal-server shoal-cluster shoal-loadtest bench-rmcp-stock bench-hello; do
  [ -x "$BIN/$bin" ] || { echo "$BIN/$bin is missing: cargo build --release --workspace" >&2; exit 1; }
done
scripts/install-deps.sh --bench

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}

wait_port() {
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# `field FILE EXPR`: EXPR evaluated over the JSON document in FILE, bound to `r`.
field() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {"r": r}))' "$@"; }

# Starts shoal-cluster with the given options; sets URL, REDIS_URL_, READY.
cluster() {
  READY="$WORK/ready-$RANDOM.json"
  "$BIN/shoal-cluster" --ready-file "$READY" "$@" >"$WORK/cluster.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 600); do [ -s "$READY" ] && break; sleep 0.1; done
  [ -s "$READY" ] || { cat "$WORK/cluster.log" >&2; exit 1; }
  URL=$(field "$READY" 'r["mcp_url"]')
  REDIS_URL_=$(field "$READY" 'r["redis_admin_url"] or ""')
}


# The trivial-tool measurement: legacy era, closed loop, echo only.
echo_run() {
  local name=$1 url=$2
  "$BIN/shoal-loadtest" run --url "$url" --scenario max --era legacy --mix echo=1 \
    --sessions "$SESSIONS" --warmup 3s --duration "$DURATION" --quiet --json "$OUT/$name.json" >"$OUT/$name.txt"
  printf '%-34s %10.0f %8.2f %8.2f %8s\n' "$name" "$(field "$OUT/$name.json" 'r["throughput_per_sec"]')" \
    "$(field "$OUT/$name.json" 'r["overall"]["p50_ms"]')" "$(field "$OUT/$name.json" 'r["overall"]["p99_ms"]')" \
    "$(field "$OUT/$name.json" 'r["errors"]')"
}

commandstats() {
  redis-cli -u "$1" INFO commandstats | tr -d '\r' | awk -F'[:=,]' '/^cmdstat_/ {sub("cmdstat_", "", $1); print $1, $3}'
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); $(date -u +%Y-%m-%dT%H:%MZ)"
echo "load generator: $SESSIONS sessions, closed loop, $DURATION measured after 3 s warm-up"
echo
echo "== 1, 2, 5: trivial tool call (echo), legacy era"
printf '%-34s %10s %8s %8s %8s\n' server "calls/s" "p50 ms" "p99 ms" errors

"$BIN/bench-hello" 127.0.0.1:18091 2>/dev/null &
PIDS+=($!)
wait_port 18091
cat >"$WORK/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello"}}}'
EOF
wrk -t1 -c"$SESSIONS" -d"$DURATION" --latency -s "$WORK/post.lua" http://127.0.0.1:18091/mcp >"$OUT/hyper-hello.txt"
python3 - "$OUT/hyper-hello.txt" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
def ms(label):
    value, unit = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)\b", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
print(f"{'bare hyper (wrk, fixed body)':<34} {rps:>10.0f} {ms(50):>8.2f} {ms(99):>8.2f} {'-':>8}")
EOF
stop_all

"$BIN/bench-rmcp-stock" 127.0.0.1:18090 2>/dev/null &
PIDS+=($!)
wait_port 18090
echo_run "rmcp-stock" http://127.0.0.1:18090/mcp
stop_all

cluster --embedded
echo_run "shoal-embedded" "$URL"
stop_all

cluster --replicas 1 --no-balancer
before=$(commandstats "$REDIS_URL_")
echo_run "shoal-redis-1-direct" "$URL"
after=$(commandstats "$REDIS_URL_")
stop_all

cluster --replicas 1
echo_run "shoal-redis-1-balancer" "$URL"
stop_all

cluster --replicas 3
echo_run "shoal-redis-3-balancer" "$URL"
stop_all

if ! $SKIP_PEERS; then
  mkdir -p "$PEERS/ts"
  cp loadtest/peers/ts/package.json loadtest/peers/ts/server.mjs "$PEERS/ts/"
  (cd "$PEERS/ts" && npm install --no-audit --no-fund --silent >/dev/null 2>&1)
  [ -x "$PEERS/py/bin/python" ] || python3 -m venv "$PEERS/py"
  "$PEERS/py/bin/pip" install -q -r loadtest/peers/python/requirements.txt
  node "$PEERS/ts/server.mjs" 18092 2>/dev/null &
  PIDS+=($!)
  wait_port 18092
  echo_run "typescript-sdk-$(node -p 'require("./'"$PEERS"'/ts/node_modules/@modelcontextprotocol/sdk/package.json").version')" \
    http://127.0.0.1:18092/mcp
  stop_all
  "$PEERS/py/bin/python" loadtest/peers/python/server.py 18093 >/dev/null 2>&1 &
  PIDS+=($!)
  wait_port 18093
  echo_run "fastmcp-$("$PEERS/py/bin/python" -c 'import fastmcp; print(fastmcp.__version__)')" \
    http://127.0.0.1:18093/mcp
  stop_all
fi

echo
echo "== 4: Redis commands per echo call (1 replica, direct; the deltas include opening $SESSIONS sessions)"
calls=$(field "$OUT/shoal-redis-1-direct.json" 'r["requests"]')
python3 - "$calls" <<EOF
import sys
calls = int(sys.argv[1])
before = dict(line.split() for line in """$before""".strip().splitlines())
after = dict(line.split() for line in """$after""".strip().splitlines())
delta = {k: int(v) - int(before.get(k, 0)) for k, v in after.items()}
delta = {k: v for k, v in delta.items() if v > 0 and k not in ("info", "ping")}
total = sum(delta.values())
print(f"{total} commands for {calls} measured calls (warm-up calls add about 15%): {total / calls:.4f} per call")
for name, count in sorted(delta.items(), key=lambda kv: -kv[1])[:8]:
    print(f"  {name:<12} {count:>9} ({count / calls:.4f} per call)")
EOF

echo
echo "== 3: PostgreSQL read (pg_query), 150 sessions, cached (TTL 10 s) vs uncached"
SQL="SELECT name, tier FROM services ORDER BY name"
printf '%-14s %10s %8s %8s %8s %22s\n' mode "calls/s" "p50 ms" "p99 ms" errors "PostgreSQL executions"
for mode in cached uncached; do
  extra=()
  [ "$mode" = uncached ] && extra=(--env SHOAL_CACHE_TTLS=pg_query=0)
  cluster --replicas 3 --postgres "${extra[@]}"
  DB_URL=$(field "$READY" 'r["database_url"]')
  scans() { psql "$DB_URL" -Atc "SELECT seq_scan + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'services'"; }
  s0=$(scans)
  "$BIN/shoal-loadtest" run --url "$URL" --scenario baseline --mix pg_query=1 --subscribe false \
    --pg-sql "$SQL" --sessions 150 --warmup 0s --duration "$DURATION" --quiet --json "$OUT/pg-$mode.json" >"$OUT/pg-$mode.txt"
  sleep 1.5 # PostgreSQL flushes table statistics at most once a second
  s1=$(scans)
  printf '%-14s %10.0f %8.2f %8.2f %8s %22s\n' "$mode" "$(field "$OUT/pg-$mode.json" 'r["throughput_per_sec"]')" \
    "$(field "$OUT/pg-$mode.json" 'r["operations"]["pg_query"]["p50_ms"]')" \
    "$(field "$OUT/pg-$mode.json" 'r["operations"]["pg_query"]["p99_ms"]')" \
    "$(field "$OUT/pg-$mode.json" 'r["errors"]')" "$((s1 - s0))"
  stop_all
done
echo "(one key: every session runs the same statement; $(field "$OUT/pg-cached.json" 'round(r["duration_secs"] / 10, 1)') TTL windows of 10 s)"

echo
echo "== 4: cross-replica notification latency (writes to replica 1, subscribers' GET streams on replica 2)"
cluster --replicas 3 --no-balancer
R1=$(field "$READY" 'r["replicas"][0]["mcp_url"]')
R2=$(field "$READY" 'r["replicas"][1]["mcp_url"]')
"$BIN/shoal-loadtest" run --url "$R1" --notify-url "$R2" --scenario baseline --mix kv_set=1 --sessions 150 \
  --warmup 2s --duration "$DURATION" --quiet --json "$OUT/notify-cross.json" >"$OUT/notify-cross.txt"
python3 - "$OUT/notify-cross.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
n = r["notifications"]
l = n["latency"]
w = r["operations"]["kv_set"]
print(f"{n['delivered']} of {n['expected']} delivered ({n['lost']} lost); write sent → notification received: "
      f"p50 {l['p50_ms']:.2f} ms, p99 {l['p99_ms']:.2f} ms, p99.9 {l['p999_ms']:.2f} ms "
      f"(the kv_set call itself: p50 {w['p50_ms']:.2f} ms, p99 {w['p99_ms']:.2f} ms)")
EOF
stop_all

echo
echo "== the article's baseline (150 sessions, mixed tools, subscriptions) through 3 replicas"
cluster --replicas 3
"$BIN/shoal-loadtest" run --url "$URL" --scenario baseline --sessions 150 --warmup 3s --duration "$DURATION" \
  --quiet --json "$OUT/baseline-3.json" --plot docs/img/baseline-3-replicas.svg | tee "$OUT/baseline-3.txt"
stop_all

if ! $SKIP_IDLE; then
  echo
  echo "== 4: replica RSS with 10,000 idle sessions"
  scripts/bench-idle-sessions.sh 2>&1 | tail -n 12
fi
