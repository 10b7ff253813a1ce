#!/usr/bin/env bash
# Installs the OS packages the cluster, the tests and the benchmarks need (Debian/Ubuntu), when
# they are missing. Rust (with cargo-nextest) and Node.js/npm are expected to be present already.
set -euo pipefail

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v nginx >/dev/null || need+=(nginx-light)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)  # load-test plots
command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)

if [ ${#need[@]} -eq 0 ]; then
  echo "OS packages: all present"
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
