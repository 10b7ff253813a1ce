#!/usr/bin/env bash
# Where the CPU of a tools/call goes, shoal next to stock rmcp: each server under the same wrk load
# as scripts/bench-wrk.sh (tools/call echo, 32 connections), sampled with `perf record` (DWARF call
# graphs), then one table of the share of samples in the same groups of symbols for both, so the
# difference shows where shoal spends more.
#
# Usage: scripts/profile-wrk.sh [--era modern|legacy] [--seconds 8]
# Needs: cargo build --release --workspace; wrk and perf (scripts/install-deps.sh --bench) and
# permission to profile (root, or kernel.perf_event_paranoid <= 1).
# Leaves the raw profiles in target/profile/{shoal,rmcp}.perf.data for `perf report -i`.
set -euo pipefail
cd "$(dirname "$0")/.."

ERA=modern
SECONDS_SAMPLED=8
while [ $# -gt 0 ]; do
  case $1 in
    --era) ERA=$2; shift 2 ;;
    --seconds) SECONDS_SAMPLED=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v perf > /dev/null || { echo "perf is not installed (scripts/install-deps.sh --bench)" >&2; exit 1; }
. scripts/bench-common.sh
OUT=target/profile
mkdir -p "$OUT"

# profile NAME PID URL: warm-up, then perf on PID while wrk loads URL.
profile() {
  local name=$1 pid=$2 url=$3 session="" load
  [ "$ERA" = legacy ] && session=$(open_session "$url")
  ERA=$ERA SESSION=$session wrk -t2 -c32 -d2s -s scripts/wrk/call.lua "$url" > /dev/null
  ERA=$ERA SESSION=$session wrk -t2 -c32 -d"$((SECONDS_SAMPLED + 3))s" -s scripts/wrk/call.lua "$url" \
    > "$WORK/$name.wrk" &
  load=$!
  sleep 1
  perf record -q -F 499 --call-graph dwarf,32768 -p "$pid" -o "$OUT/$name.perf.data" -- sleep "$SECONDS_SAMPLED" \
    2> "$WORK/$name.perf.log"
  wait "$load"
  echo "$name: $(awk '/Requests\/sec/{print $2}' "$WORK/$name.wrk") calls/s while sampled"
  # One pass (DWARF unwinding is the slow part): both the inclusive and the self share per symbol.
  perf report -i "$OUT/$name.perf.data" --children --sort symbol --stdio -g none 2> /dev/null \
    | grep -v '^#' > "$WORK/$name.children"
  # Samples taken (at 499 Hz per busy thread), for µs per call.
  perf report -i "$OUT/$name.perf.data" --stats 2> /dev/null \
    | awk '$1 == "SAMPLE" && $2 == "events:" {print $3; exit}' > "$WORK/$name.samples"
  awk '/Requests\/sec/{print $2}' "$WORK/$name.wrk" > "$WORK/$name.rate"
}

start_replica --env SHOAL_TOOLSETS=kv
shoal_pid=$(json "$WORK/ready.json" 'd["replicas"][0]["pid"]')
profile shoal "$shoal_pid" "$url"
stop_replica

start_stock --json-response
profile rmcp "$stock" "$stock_url"
stop_stock

python3 - "$WORK" "$SECONDS_SAMPLED" <<'PY'
import re, sys
work, sampled = sys.argv[1], float(sys.argv[2])

def shares(path, column):
    """Share of samples per symbol: column 1 inclusive (children), 2 self."""
    out = {}
    for line in open(path):
        m = re.match(r"\s*([\d.]+)%\s+([\d.]+)%\s+\[[.k]\]\s+(.*)", line)
        if not m:
            continue
        share = float(m.group(column))
        symbol = re.sub(r"(\s+-)+\s*$", "", m.group(3)).strip()
        out[symbol] = max(out.get(symbol, 0.0), share)
    return out

# Inclusive groups (a symbol's own samples and those of what it calls), largest match per group.
GROUPS = [
    ("kernel: every system call", r"^do_syscall_64$"),
    ("hyper: write the response (flush)", r"^hyper::proto::h1::io::Buffered<T,B>::poll_flush$"),
    ("hyper: read the request head", r"poll_read_head"),
    ("rmcp: handle_post", r"StreamableHttpService<S,M>::handle_post::\{\{closure\}\}$"),
    ("rmcp: parse the JSON-RPC message", r"^serde_json::de::from_slice$"),
    ("rmcp: validate_standard_headers", r"validate_standard_headers"),
    ("rmcp: per-request serve_inner", r"^rmcp::service::serve_inner::\{\{closure\}\}$"),
    ("tokio: spawn", r"^tokio::task::spawn::spawn$"),
    ("shoal: HttpService::handle", r"^shoal_server::http::HttpService::handle::\{\{closure\}\}$"),
    ("shoal: call pipeline (tool included)", r"ShoalHandler::call_with_policy::\{\{closure\}\}$"),
    ("shoal: spans (Traced futures)", r"^<shoal_shared::telemetry::Traced<F>"),
    ("prometheus: histogram observe", r"prometheus_client::metrics::histogram::Histogram::observe$"),
]
# Self time only. shoal links jemalloc (`_rjem_*`), stock rmcp the system allocator (glibc).
SELF = [
    ("memmove (self)", r"^__memmove"),
    ("allocator (self)", r"^(_rjem_|je_|imalloc|isfree|ifree|arena_|free_fastpath|tcache_|cache_bin_|_int_malloc|_int_free|malloc|cfree|__GI___libc_(malloc|free)|__libc_(malloc|free)|malloc_consolidate|unlink_chunk)"),
]

rows = []
per_call = []
for name in ("shoal", "rmcp"):
    samples = float(open(f"{work}/{name}.samples").read().strip() or 0)
    rate = float(open(f"{work}/{name}.rate").read().strip() or 0)
    # CPU µs per call while sampled: samples / 499 Hz over the calls served in the sampled seconds.
    per_call.append(samples / 499 / (rate * sampled) * 1e6 if rate else 0.0)
    inc, own = shares(f"{work}/{name}.children", 1), shares(f"{work}/{name}.children", 2)
    col = {}
    for label, pattern in GROUPS:
        col[label] = max((v for k, v in inc.items() if re.search(pattern, k)), default=0.0)
    for label, pattern in SELF:
        col[label] = sum(v for k, v in own.items() if re.search(pattern, k))
    rows.append(col)
print(f"\nCPU per call while sampled: shoal {per_call[0]:.1f} us, rmcp {per_call[1]:.1f} us")
print(f"\n{'share of samples (and us per call)':<42} {'shoal':>16} {'rmcp':>16}")
for label, _ in GROUPS + SELF:
    cells = [f"{rows[i][label]:5.1f}% {rows[i][label] / 100 * per_call[i]:6.1f}us" for i in (0, 1)]
    print(f"  {label:<40} {cells[0]:>16} {cells[1]:>16}")
PY
