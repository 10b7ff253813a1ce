#!/usr/bin/env bash
# Lists the Debian packages installed on this machine since it booted (from /var/log/dpkg.log) that
# scripts/install-deps.sh neither names nor pulls in as a hard dependency (Depends/PreDepends,
# recursively). Each one is a dependency a fresh machine lacks: something a contributor installed by
# hand, or that arrived as a Recommends, and that the project's tests may now rely on without saying
# so. CI runs on the developer's own machine, so it cannot see these; this script can.
#
# Usage: scripts/fresh-check.sh [--since "YYYY-MM-DD HH:MM:SS"]   (default: the machine's boot time)
# Exit status: 0 when nothing is listed, 1 when packages are listed, 2 when it cannot tell.
set -euo pipefail
cd "$(dirname "$0")/.."

since=$(uptime -s)
if [ "${1:-}" = "--since" ]; then since=$2; fi
log=/var/log/dpkg.log
[ -r "$log" ] || { echo "fresh-check: $log is not readable; cannot tell what was installed" >&2; exit 2; }

# Packages dpkg installed since then (an "install" line per package) and still installed now.
recent=$(awk -v since="$since" '($1" "$2) >= since && $3 == "install" { sub(/:.*/, "", $4); print $4 }' "$log" | sort -u)
still=$(comm -12 <(echo "$recent") <(dpkg-query -W -f '${db:Status-Status} ${Package}\n' | awk '$1 == "installed" {print $2}' | sort -u))
if [ -z "$still" ]; then
  echo "fresh-check: no package installed since $since is missing from scripts/install-deps.sh"
  exit 0
fi

named=$(scripts/install-deps.sh --list | sort -u)
# The hard-dependency closure of what install-deps.sh names, as apt resolves it on this machine
# (virtual packages resolve to the providers apt lists; those installed count as covered).
closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances $named 2>/dev/null | grep -v '^ ' | sed 's/[<>]//g; s/:.*//' | sort -u)
hidden=$(comm -23 <(echo "$still") <(sort -u <(echo "$named") <(echo "$closure")))
if [ -z "$hidden" ]; then
  echo "fresh-check: every package installed since $since is named by scripts/install-deps.sh or a hard dependency of one"
  exit 0
fi
echo "fresh-check: installed since $since, but neither named by scripts/install-deps.sh nor a hard dependency of a package it names:"
echo "$hidden" | sed 's/^/  /'
echo "a fresh machine will lack these: name them in scripts/install-deps.sh (or remove them and check the tests still pass)"
exit 1
