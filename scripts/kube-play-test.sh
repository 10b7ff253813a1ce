#!/usr/bin/env bash
# Runs the rendered Kubernetes pod for real: the standalone-redis overlay of deploy/kubernetes,
# rendered by scripts/check-kubernetes.sh, played by `podman kube play` with the locally built image
# (localhost/shoal:latest, as the compose test builds it) against a Redis container. Passes when the
# replica, as the manifests run it (non-root, read-only root filesystem, settings from the
# ConfigMap, credentials from Secrets, the API keys file from a Secret volume), becomes ready and
# serves an MCP `initialize` through the Host name the manifests allow.
#
# podman 4.3 (Debian 12) plays the Deployment's pod, ConfigMap and Secret references, with quirks
# this script works around and docs/operations.md ("Kubernetes") records: it ignores Secret objects
# in the file and reads podman secrets instead (for an env `secretKeyRef`, a JSON map of base64
# values; for a secret volume, a Secret whose `data` holds the files as plain text); it maps every
# containerPort onto the host (so one replica, and 8080 and 9464 free); probes, NetworkPolicy,
# autoscaler and disruption budget are Kubernetes' business and ignored.
#
# Usage: scripts/kube-play-test.sh   (run by scripts/compose-test.sh after its cluster is down)
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "kube play test FAILED: $*" >&2; exit 1; }
command -v podman >/dev/null || die "podman not found (scripts/install-deps.sh --containers)"
podman image exists localhost/shoal:latest || die "localhost/shoal:latest is missing (scripts/compose-test.sh builds it)"
podman image exists localhost/redis:7.4 || die "localhost/redis:7.4 is missing (scripts/compose-test.sh builds it)"
for port in 8080 9464; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "127.0.0.1:$port is in use; podman kube play publishes the pod's ports there"
  fi
done

work=$(mktemp -d /tmp/shoal-kube.XXXXXX)
redis=shoal-kube-play-redis
key=shoal-kube-play-key-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
cleanup() {
  local status=$?
  set +e
  if [ $status -ne 0 ] && [ -f "$work/play.yaml" ]; then
    podman logs --tail 30 shoal-pod-0-shoal 2>&1
  fi
  [ -f "$work/play.yaml" ] && podman kube down "$work/play.yaml" >/dev/null 2>&1
  podman rm -f -v "$redis" >/dev/null 2>&1
  podman secret rm shoal-secrets shoal-api-keys >/dev/null 2>&1
  podman volume rm -f shoal-api-keys >/dev/null 2>&1
  rm -rf "$work"
  exit $status
}
trap cleanup EXIT
trap 'exit 143' TERM INT
# What an earlier run may have left.
podman secret rm shoal-secrets shoal-api-keys >/dev/null 2>&1 || true
podman volume rm -f shoal-api-keys >/dev/null 2>&1 || true
podman rm -f -v "$redis" >/dev/null 2>&1 || true

scripts/check-kubernetes.sh --out "$work/rendered" >/dev/null || die "the manifests do not check"
sed -e 's|image: registry.example.com/shoal:latest|image: localhost/shoal:latest|' \
    -e 's|^  replicas: 3$|  replicas: 1|' "$work/rendered/standalone-redis.yaml" >"$work/play.yaml"
grep -q 'image: localhost/shoal:latest' "$work/play.yaml" || die "the rendered Deployment names another image"

podman run -d --name "$redis" localhost/redis:7.4 redis-server --save "" --appendonly no >/dev/null
redis_ip=$(podman inspect "$redis" --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}')
[ -n "$redis_ip" ] || die "the Redis container has no address"

python3 - "$work" "$redis_ip" "$key" <<'EOF'
import base64, hashlib, json, sys
work, redis_ip, key = sys.argv[1:]
b64 = lambda s: base64.b64encode(s.encode()).decode()
# Env secretKeyRef: a JSON map of base64 values. No PostgreSQL here: the database tools fail
# cleanly, readiness does not depend on it.
json.dump({"redis-url": b64(f"redis://{redis_ip}:6379"),
           "database-url": b64("postgres://nobody:nothing@127.0.0.1:1/none")},
          open(f"{work}/shoal-secrets.json", "w"))
digest = hashlib.sha256(key.encode()).hexdigest()
keys = f'[[key]]\nprincipal = "kube-play"\nscopes = ["*"]\nsha256 = "{digest}"\n'
json.dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shoal-api-keys"},
           "data": {"api-keys.toml": keys}},
          open(f"{work}/shoal-api-keys.json", "w"))
EOF
podman secret create shoal-secrets "$work/shoal-secrets.json" >/dev/null
podman secret create shoal-api-keys "$work/shoal-api-keys.json" >/dev/null

podman kube play "$work/play.yaml" >"$work/play.log" 2>&1 || { cat "$work/play.log"; die "podman kube play failed"; }
ready=""
for _ in $(seq 60); do
  ready=$(curl -s -m 2 http://127.0.0.1:9464/readyz || true)
  [ "$ready" = ready ] && break
  sleep 0.5
done
[ "$ready" = ready ] || die "the replica did not become ready within 30 s (/readyz: ${ready:-no answer})"
echo "the replica is ready (on Redis at $redis_ip)"

[ "$(podman inspect shoal-pod-0-shoal --format '{{.HostConfig.ReadonlyRootfs}}')" = true ] \
  || die "the root filesystem is writable"
[ "$(podman inspect shoal-pod-0-shoal --format '{{.Config.User}}')" = 10001:10001 ] \
  || die "the replica does not run as 10001:10001"

initialize='{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"kube-play","version":"1"}}}'
mcp() {
  curl -s -m 5 -o "$work/mcp.out" -w '%{http_code}' -X POST http://127.0.0.1:8080/mcp \
    -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' "$@" \
    -d "$initialize"
}
code=$(mcp -H 'host: mcp.example.com')
[ "$code" = 401 ] || die "/mcp without a key answered $code, expected 401"
code=$(mcp -H 'host: mcp.example.com' -H "authorization: Bearer $key")
[ "$code" = 200 ] || { cat "$work/mcp.out"; die "initialize answered $code"; }
grep -q '"serverInfo"' "$work/mcp.out" || { cat "$work/mcp.out"; die "initialize did not answer with serverInfo"; }
code=$(mcp -H 'host: somewhere.else' -H "authorization: Bearer $key")
[ "$code" = 403 ] || die "a Host outside SHOAL_ALLOWED_HOSTS answered $code, expected 403"
echo "kube play test passed: ready, non-root, read-only root, initialize answered with the API key from the Secret"
