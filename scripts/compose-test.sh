#!/usr/bin/env bash
# The docker-compose test: brings up the real docker-compose.yml (Docker Compose v2 driving podman
# through its Docker-compatible API), sends MCP traffic through the balancer's published port, kills
# one replica container mid-run and checks that the clients carry on with nothing lost, checks that
# spans reached the trace backend and that Prometheus scrapes every replica and loaded the alert
# rules, stops the replicas gracefully and tears everything down; then plays the replica pod
# rendered from deploy/kubernetes with `podman kube play` on the same image
# (scripts/kube-play-test.sh).
#
# The images the compose file names are stood in for by local builds (scripts/compose/README.md).
# The shoal image is built from the Dockerfile exactly as users build it (target `runtime`: the
# workspace compiled inside the build stage, on a stand-in for the rust image), or, with
# --prebuilt, from its `prebuilt` target over the release binaries in target/release (quicker).
#
# Usage: scripts/compose-test.sh [--prebuilt] [--sentinel]   (after `cargo build --release
#        --workspace`: the load generator runs on the host). --sentinel runs the cluster on a Redis
#        Sentinel set (deploy/compose/sentinel.yml) and adds a failover under load.
# Needs: podman, runc, debootstrap and Docker Compose v2 (scripts/install-deps.sh --containers).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "--- $* ($(date +%H:%M:%S))"; }
# The demo API key of deploy/api-keys.toml (the compose cluster authenticates every /mcp request).
demo_key=shoal-demo-key-change-me
die() { echo "compose test FAILED: $*" >&2; exit 1; }

prebuilt=false
sentinel=false
for option in "$@"; do
  case "$option" in
    --prebuilt) prebuilt=true ;;
    --sentinel) sentinel=true ;;
    *) echo "unknown option $option" >&2; exit 2 ;;
  esac
done

DC=${DOCKER_COMPOSE:-$(ls /opt/compose/lib/python3*/site-packages/compose/docker-compose 2>/dev/null | head -1)}
[ -x "${DC:-}" ] || die "Docker Compose v2 not found (run scripts/install-deps.sh --containers, or set DOCKER_COMPOSE)"
command -v podman >/dev/null || die "podman not found (run scripts/install-deps.sh --containers)"
for bin in shoal-server shoal-loadtest shoal-otlp-sink; do
  [ -x "target/release/$bin" ] || die "target/release/$bin is missing: cargo build --release --workspace first"
done
for port in 8080 4318 9090; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "127.0.0.1:$port is in use; the compose file publishes it"
  fi
done

work=$(mktemp -d /tmp/shoal-compose.XXXXXX)
service_pid=""
health_pid=""
compose_files=(-f docker-compose.yml -f scripts/compose/override.yml)
# --sentinel: the cluster on a Redis Sentinel set (deploy/compose/sentinel.yml), and a failover.
$sentinel && compose_files+=(-f deploy/compose/sentinel.yml)
compose() { "$DC" "${compose_files[@]}" "$@"; }

cleanup() {
  local status=$?
  set +e
  if [ $status -ne 0 ] && [ -S "$work/podman.sock" ]; then
    echo "--- diagnostics"
    compose ps -a
    compose logs --no-color --tail 40
    for network in $(podman network ls --filter label=com.docker.compose.project=shoal --format '{{.Name}}'); do
      echo "network $network: dns_enabled=$(podman network inspect "$network" --format '{{.DNSEnabled}}')"
    done
    for container in $(podman ps --filter label=com.docker.compose.service=shoal --format '{{.Names}}'); do
      echo "$container: /readyz: $(podman exec "$container" shoal-server healthcheck 2>&1 && echo 200 OK)"
      echo "$container: redis resolves to: $(podman exec "$container" getent hosts redis 2>&1 || echo nothing)"
    done
  fi
  if [ -S "$work/podman.sock" ]; then
    step "teardown"
    compose down -v --remove-orphans -t 30 >"$work/down.log" 2>&1 || cat "$work/down.log"
  fi
  [ -n "$health_pid" ] && kill "$health_pid" 2>/dev/null
  [ -n "$service_pid" ] && kill "$service_pid" 2>/dev/null
  wait 2>/dev/null
  # What this run's builds superseded (the previous shoal image, the previous build stage, a build
  # that failed half-way): shoal's images carry the label io.shoal.image, so nobody else's are
  # touched. The build cache (the cargo registry and target/ cache mounts) stays, for the next build.
  prune_superseded
  rm -rf "$work"
  exit $status
}
prune_superseded() {
  podman image prune -f --filter label=io.shoal.image >/dev/null 2>&1 || true
}
trap cleanup EXIT
# scripts/test.sh bounds this script with `timeout`, which sends SIGTERM: clean up then too.
trap 'exit 143' TERM INT

# podman's Docker-compatible API, for Compose.
podman system service --time=0 "unix://$work/podman.sock" >"$work/podman-service.log" 2>&1 &
service_pid=$!
export DOCKER_HOST="unix://$work/podman.sock"
for _ in $(seq 100); do [ -S "$work/podman.sock" ] && break; sleep 0.1; done
[ -S "$work/podman.sock" ] || die "the podman API socket did not appear"

# Tags an image under the short name and under the fully qualified name the Docker API resolves.
qualified() { case $1 in */*) echo "docker.io/$1" ;; *) echo "docker.io/library/$1" ;; esac; }

step "images"
if ! podman image exists localhost/debian:bookworm-slim; then
  echo "making the Debian base image (debootstrap)"
  rootfs="$work/rootfs"
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  debootstrap --variant=minbase bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; die "debootstrap failed"; }
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/"
    rm -f "$rootfs/etc/apt/sources.list"
  fi
  tar -C "$rootfs" -c . | podman import - localhost/debian:bookworm-slim >/dev/null
  rm -rf "$rootfs"
fi
# Docker image format, so HEALTHCHECK and STOPSIGNAL are kept (OCI has no field for them).
# --force-rm: no build container is left behind when a build fails.
build() { podman build --format docker --pull=never --force-rm "$@" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; die "podman build $*"; }; }
# Stand-ins for the public images (cached layers make this quick after the first time).
for entry in redis:7.4=redis postgres:16=postgres nginx:1.27=nginx prom/prometheus:v3.5.0=prometheus; do
  name=${entry%=*}
  build --network=host -t "localhost/$name" -t "$(qualified "$name")" \
    -f "scripts/compose/standins/${entry#*=}.Containerfile" scripts/compose/standins
done
if $prebuilt; then
  echo "shoal image: Dockerfile target prebuilt (host binaries)"
  build --target prebuilt -t localhost/shoal:latest -t "$(qualified shoal:latest)" .
else
  # A stand-in for rust:1.95-slim-bookworm carrying the host's toolchain (no Rust image or rustup
  # download is reachable here), then the Dockerfile's default target, compiled in the image.
  # Tagged as the Dockerfile names it (the host toolchain is the one the workspace builds with).
  rust_image=rust:$(sed -n 's/^ARG RUST_VERSION=//p' Dockerfile)-slim-$(sed -n 's/^ARG DEBIAN_RELEASE=//p' Dockerfile)
  ctx="$work/rust-context"
  toolchain=$(rustc --print sysroot)
  mkdir -p "$ctx/toolchain"
  cp -al "$toolchain/bin" "$toolchain/lib" "$ctx/toolchain/" 2>/dev/null \
    || cp -a "$toolchain/bin" "$toolchain/lib" "$ctx/toolchain/"
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/host-ca-certificates.crt"
  build --network=host -t "localhost/$rust_image" -t "$(qualified "$rust_image")" \
    -f scripts/compose/standins/rust.Containerfile "$ctx"
  rm -rf "$ctx"
  echo "shoal image: Dockerfile target runtime (compiled in the build stage: about 9 minutes the first time, then only what changed)"
  # The toolchain stage (no sources: cached after the first time), tagged so that pruning what
  # the build superseded keeps it; the build itself compiles only what changed, in its cache
  # mounts (/var/tmp/buildah-cache), which pruning images does not touch.
  build --network=host --target toolchain -t localhost/shoal-toolchain:latest .
  started=$(date +%s)
  build --network=host --target runtime \
    -t localhost/shoal:latest -t "$(qualified shoal:latest)" .
  echo "shoal image built in $(( $(date +%s) - started )) s"
fi
prune_superseded
[ "$(podman image inspect localhost/shoal:latest --format '{{.Config.Healthcheck.Test}}')" = "[CMD shoal-server healthcheck]" ] \
  || die "the shoal image lost its HEALTHCHECK"
podman run --rm --entrypoint id localhost/shoal:latest 2>/dev/null | grep -q 'uid=10001(shoal)' \
  || die "the shoal image does not run as the unprivileged user"

# Podman runs healthchecks from systemd timers, which this machine lacks: do what the Docker daemon
# would, for every container of the project.
(
  while true; do
    for container in $(podman ps --filter label=com.docker.compose.project=shoal --format '{{.Names}}'); do
      podman healthcheck run "$container" >/dev/null 2>&1 || true
    done
    sleep 1
  done
) &
health_pid=$!

step "container DNS: service names resolve inside the compose network"
# Replicas find Redis and PostgreSQL by service name. Without the network's DNS (podman's CNI
# dnsname plugin, a Recommends that a fresh machine lacks) every replica stays unready and `up`
# only fails minutes later on health: check it first and say what is wrong.
timeout 120 "$DC" "${compose_files[@]}" up -d --no-build --pull never redis >"$work/up-redis.log" 2>&1 \
  || { cat "$work/up-redis.log"; die "the redis service did not start"; }
network=$(podman network ls --filter label=com.docker.compose.project=shoal --format '{{.Name}}' | head -1)
[ -n "$network" ] || die "compose created no network for the project"
dns=$(podman network inspect "$network" --format '{{.DNSEnabled}}')
[ "$dns" = true ] || die "the compose network $network has DNS disabled (dns_enabled=$dns): containers cannot resolve \
service names; install podman's DNS plugin (scripts/install-deps.sh --containers installs \
golang-github-containernetworking-plugin-dnsname) and remove the network (podman network rm $network)"
compose run --rm --no-deps -T --entrypoint getent shoal hosts redis >"$work/getent.log" 2>&1 \
  || { cat "$work/getent.log"; die "the service name 'redis' does not resolve inside $network (network DNS: $dns)"; }
echo "network $network: DNS enabled, redis resolves to $(awk 'END {print $1}' "$work/getent.log")"

step "compose up"
# `up` itself waits for the service_healthy dependencies (Redis, PostgreSQL, then the replicas).
timeout 300 "$DC" "${compose_files[@]}" up -d --no-build --pull never \
  || die "the cluster did not come up"
compose ps
replicas=$(podman ps --filter label=com.docker.compose.service=shoal --filter health=healthy --format '{{.Names}}' | sort)
[ "$(echo "$replicas" | wc -l)" -eq 3 ] || die "expected 3 healthy replicas, got: $replicas"
curl -fsS http://127.0.0.1:8080/balancer/healthz >/dev/null || die "the balancer does not answer"
# Only /mcp (and the OAuth metadata) is reachable through the balancer, never a replica's admin paths.
for path in /metrics /readyz /healthz /; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:8080$path")
  [ "$code" = 404 ] || die "the balancer exposes $path (HTTP $code)"
done
list_tools() {
  curl -s -o /dev/null -w '%{http_code}' -X POST -H 'content-type: application/json' \
    -H 'accept: application/json, text/event-stream' -H 'mcp-protocol-version: 2026-07-28' \
    -H 'mcp-method: tools/list' \
    --data '{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"compose-test","version":"1"},"io.modelcontextprotocol/clientCapabilities":{}}}}' \
    "$@" http://127.0.0.1:8080/mcp
}
# Authentication is on (API keys, deploy/api-keys.toml): no key is 401, the demo key is served.
code=$(list_tools)
[ "$code" = 401 ] || die "/mcp without an API key answered HTTP $code, expected 401"
code=$(list_tools -H "authorization: Bearer $demo_key")
[ "$code" = 200 ] || die "the balancer does not reach the replicas' /mcp with the demo key (HTTP $code)"

step "prometheus scrapes every replica"
up=0
for _ in $(seq 60); do
  up=$(curl -fsS 'http://127.0.0.1:9090/api/v1/targets?state=active' 2>/dev/null \
    | python3 -c 'import json,sys; t=json.load(sys.stdin)["data"]["activeTargets"]; print(sum(1 for x in t if x["labels"].get("job")=="shoal" and x["health"]=="up"))' \
    2>/dev/null || echo 0)
  [ "$up" -ge 3 ] && break
  sleep 1
done
[ "$up" -ge 3 ] || die "Prometheus has $up healthy shoal targets, expected 3"
echo "Prometheus: $up shoal targets up"
rules=$(curl -fsS 'http://127.0.0.1:9090/api/v1/rules?type=alert' \
  | python3 -c 'import json,sys; g=json.load(sys.stdin)["data"]["groups"]; print(sum(len(x["rules"]) for x in g if x["name"].startswith("shoal.")))' \
  2>/dev/null || echo 0)
expected=$(grep -c '^      - alert: ' deploy/prometheus/alerts.yml)
[ "$rules" = "$expected" ] || die "Prometheus loaded $rules shoal alert rules, expected $expected (deploy/prometheus/alerts.yml)"
echo "Prometheus: $rules alert rules loaded"

step "legacy-era baseline through the balancer; replica shoal-shoal-2 killed after 8 s, started again 6 s later"
# Clients retry a request whose replica died under it (at most 3 times) and resume their GET
# streams with Last-Event-ID; the run fails on any request that still fails and on any lost
# notification.
target/release/shoal-loadtest --token "$demo_key" run --url http://127.0.0.1:8080/mcp --scenario baseline --era legacy \
  --sessions 30 --warmup 2s --duration 25s --retries 3 \
  --chaos-cmd "podman kill shoal-shoal-2" --chaos-at 8s \
  --restart-cmd "podman start shoal-shoal-2" --restart-after 6s \
  --quiet --json "$work/legacy.json" || die "the clients saw errors or lost notifications"
python3 - "$work/legacy.json" <<'EOF' || die "the report does not show clients carrying on after the kill"
import json, sys
report = json.load(open(sys.argv[1]))
ok_after = sum(p["ok"] for p in report["timeline"] if p["second"] >= 12)
print(f"after the kill: {ok_after} successful calls; recovered: {report['recovered_by_kind']}")
assert report["errors"] == 0 and report["notifications"]["lost"] == 0
assert ok_after > 0
EOF

step "2026-07-28 era (stateless, subscriptions/listen) through the balancer"
target/release/shoal-loadtest --token "$demo_key" run --url http://127.0.0.1:8080/mcp --scenario baseline --era modern \
  --sessions 20 --warmup 1s --duration 8s --retries 3 --quiet \
  || die "modern-era clients saw errors or lost notifications"

step "the load generator's compose service (profile loadtest) inside the compose network"
compose --profile loadtest run --rm --no-deps loadtest run --url http://balancer:8080/mcp \
  --scenario baseline --sessions 10 --warmup 1s --duration 3s --retries 3 --quiet \
  || die "the loadtest service failed"

step "traces reached the trace backend; the restarted replica serves again"
curl -fsS http://127.0.0.1:4318/api/spans -o "$work/spans.json" || die "the trace backend does not answer"
restarted_host=$(podman inspect shoal-shoal-2 --format '{{.Config.Hostname}}')
restarted_at=$(date -d "$(podman inspect shoal-shoal-2 --format '{{.State.StartedAt}}' | sed 's/ +0000 UTC//')" +%s)
python3 - "$work/spans.json" "$restarted_host" "$restarted_at" <<'EOF' || die "the expected spans are missing"
import json, sys
spans = json.load(open(sys.argv[1]))
host, since = sys.argv[2], int(sys.argv[3]) * 10**9
served = [s for s in spans if s["resource"].get("shoal.replica.name") == host
          and s["name"] == "POST /mcp" and s["start_unix_nanos"] > since]
print(f"shoal-shoal-2 ({host}) served {len(served)} requests after its restart")
assert served, "the restarted replica got no traffic"
shoal = [s for s in spans if s["resource"].get("service.name") == "shoal"]
names = {s["name"] for s in shoal}
replicas = {s["resource"].get("service.instance.id") for s in shoal}
print(f"{len(spans)} spans, {len(shoal)} from service shoal, from {len(replicas)} replicas")
for wanted in ("POST /mcp", "tools/call kv_set", "tools/call kv_get"):
    assert wanted in names, f"no {wanted!r} span among {sorted(names)[:20]}"
assert len(replicas) >= 3, replicas
EOF

if $sentinel; then
  step "Sentinel: the primary (shoal-redis-1) stopped at once under the baseline; the sentinels promote the replica"
  # (stopped, not killed: a killed container would be restarted by its restart policy before the
  # sentinels see it down, and no failover would happen)
  # Sentinel declares the primary down after 5 s (down-after-milliseconds), then elects and
  # promotes: the replicas fail closed meanwhile (503 + Retry-After, retried by the clients), and
  # follow the new primary by themselves.
  target/release/shoal-loadtest --token "$demo_key" run --url http://127.0.0.1:8080/mcp --scenario baseline --era both \
    --sessions 30 --warmup 2s --duration 30s --retries 30 \
    --chaos-cmd "podman stop -t 0 shoal-redis-1" --chaos-at 5s \
    --quiet --json "$work/sentinel.json" || true
  python3 - "$work/sentinel.json" <<'EOF' || die "the cluster did not come through the failover"
import json, sys
report = json.load(open(sys.argv[1]))
n = report["notifications"]
ok_after = sum(p["ok"] for p in report["timeline"] if p["second"] >= 20)
kinds = set(report["errors_by_kind"])
print(f"after the failover: {ok_after} successful calls; errors {report['errors_by_kind']}; "
      f"recovered: {report['recovered_by_kind']}; notifications {n}")
assert ok_after > 0, "nothing served after the failover"
assert n["lost"] == 0 and n["duplicated"] == 0
assert kinds <= {"tool_error_kv_get", "tool_error_kv_set"}, kinds
EOF
  primary=$(compose exec -T sentinel-1 redis-cli -p 26379 SENTINEL get-master-addr-by-name shoal | head -1)
  replica_ip=$(podman inspect shoal-redis-replica-1 --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}')
  [ "$primary" = "$replica_ip" ] || die "the sentinels name $primary as the primary, not the replica ($replica_ip)"
  echo "the sentinels promoted shoal-redis-replica-1 ($primary)"
fi

step "graceful stop of the replicas"
compose stop -t 30 shoal >/dev/null 2>&1
for name in $replicas; do
  code=$(podman inspect "$name" --format '{{.State.ExitCode}}')
  if [ "$code" != 0 ]; then
    podman logs --tail 20 "$name"
    die "$name exited with $code after SIGTERM"
  fi
  podman logs --since "$restarted_at" "$name" 2>&1 | grep -q '"stopped"' \
    || die "$name did not log its drained stop"
done

step "compose down"
compose down -v --remove-orphans -t 30 2>&1 | while read -r line; do echo "$(date +%T) $line"; done
left=$(podman ps -a --filter label=com.docker.compose.project=shoal -q | wc -l)
volumes=$(podman volume ls --filter label=com.docker.compose.project=shoal -q | wc -l)
[ "$left" -eq 0 ] && [ "$volumes" -eq 0 ] || die "$left containers and $volumes volumes left after down"

step "kubernetes: the rendered replica pod on podman kube play"
scripts/kube-play-test.sh || die "the replica pod rendered from deploy/kubernetes did not serve"
echo "compose test passed"
