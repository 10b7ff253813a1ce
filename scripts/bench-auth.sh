#!/usr/bin/env bash
# Issue 12, acceptance 5: what authentication costs on the trivial tool call. One replica on Redis
# (shoal-cluster, no balancer), driven by wrk (scripts/wrk/call.lua, 32 connections) with
# tools/call echo in both protocol eras, in three configurations side by side in one run:
#
#   off        SHOAL_AUTH unset (loopback: no authentication)
#   api-keys   SHOAL_AUTH=api-keys, the request's key hashed and looked up
#   oauth      SHOAL_AUTH=oauth against the test authorization server (testkit/oidc, oidc-provider):
#              one ES256 access token, verified once, then served from the verified-token memory
#   quotas     api-keys with the key's quotas on (rate and concurrent calls set too high to refuse):
#              one Redis script per request (GCRA rate + call lease), one more to release the lease
#
# The first three run without quotas (SHOAL_QUOTA_REQUESTS_PER_SEC=0, _CONCURRENT_CALLS=0), so
# they measure authentication alone; `quotas` measures what enforcing them adds.
#
# Every request of the legacy era also passes the session owner check (in memory after the first).
# CPU per call comes from the replica's own /metrics. Rounds repeat the three configurations;
# medians and ratios against `off` are printed.
#
# Usage: scripts/bench-auth.sh [--duration 10s] [--connections 32] [--rounds 3]
# Needs: cargo build --release --workspace; wrk (scripts/install-deps.sh --bench); Node.js and
# `npm ci --prefix testkit/oidc`.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -d testkit/oidc/node_modules/oidc-provider ] || npm ci --prefix testkit/oidc --no-audit --no-fund --loglevel=error
. scripts/bench-common.sh
wrk_options "$@"

# The test authorization server, for the oauth configuration.
coproc RIG { PORT=0 CLIENTS='[{"client_id":"bench","client_secret":"bench-secret","scopes":["kv"]}]' \
  exec node testkit/oidc/server.mjs 2> "$WORK/rig.log"; }
rig_pid=$RIG_PID
trap 'kill $rig_pid 2>/dev/null || true; cleanup' EXIT
read -r ready <&"${RIG[0]}"
issuer=${ready#READY }
resource="http://127.0.0.1:9/mcp" # the audience only: nothing fetches it
oauth_token=$(curl -s -u bench:bench-secret -d grant_type=client_credentials -d scope=kv \
  --data-urlencode "resource=$resource" "$issuer/token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
api_key=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
key_hash=$(printf %s "$api_key" | sha256sum | cut -d' ' -f1)
printf '[[key]]\nprincipal = "bench"\nscopes = ["kv"]\nsha256 = "%s"\n' "$key_hash" > "$WORK/keys.toml"
printf '[[key]]\nprincipal = "bench"\nscopes = ["kv"]\nsha256 = "%s"\nquota = { requests_per_sec = 1000000, burst = 1000000, concurrent_calls = 100000, share_percent = 100 }\n' \
  "$key_hash" > "$WORK/keys-quota.toml"
no_quotas=(--env SHOAL_QUOTA_REQUESTS_PER_SEC=0 --env SHOAL_QUOTA_CONCURRENT_CALLS=0 --env SHOAL_PRINCIPAL_SHARE_PERCENT=100)

run() { # $1 = label, $2 = token (may be empty), rest = extra --env
  local label=$1; export TOKEN=$2; shift 2
  start_replica --env SHOAL_TOOLSETS=kv "$@"
  wrk_measure "$label legacy" legacy "$url" cpu_of "$base"
  wrk_measure "$label 2026" modern "$url" cpu_of "$base"
  stop_replica
  unset TOKEN
}

echo "wrk -t2 -c$CONNECTIONS, $DURATION per run, $ROUNDS rounds; tools/call echo"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"
  run off ""
  run api-keys "$api_key" "${no_quotas[@]}" --env SHOAL_AUTH=api-keys \
    --env "SHOAL_API_KEYS_FILE=$WORK/keys.toml"
  run oauth "$oauth_token" "${no_quotas[@]}" --env SHOAL_AUTH=oauth \
    --env "SHOAL_OAUTH_ISSUERS=$issuer" --env "SHOAL_OAUTH_ALLOW_HTTP=true" --env "SHOAL_RESOURCE_URL=$resource"
  run quotas "$api_key" --env SHOAL_AUTH=api-keys --env "SHOAL_API_KEYS_FILE=$WORK/keys-quota.toml"
done
wrk_summary \
  "api-keys / off, legacy=api-keys legacy/off legacy" \
  "api-keys / off, 2026=api-keys 2026/off 2026" \
  "oauth / off, legacy=oauth legacy/off legacy" \
  "oauth / off, 2026=oauth 2026/off 2026" \
  "quotas / api-keys, legacy=quotas legacy/api-keys legacy" \
  "quotas / api-keys, 2026=quotas 2026/api-keys 2026"
