#!/bin/sh
# Entrypoint of the docker-compose balancer. nginx resolves the `shoal` service name once, when it
# loads its configuration; replicas that are added (`--scale`), removed, or restarted with a new
# address would go unseen. This runs nginx and re-resolves the name every RESOLVE_INTERVAL_SECS,
# reloading nginx gracefully (running streams stay on the old workers) when the set of addresses
# changes. Works with any nginx version and any DNS the container runtime provides.
set -eu

host=${UPSTREAM_HOST:-shoal}
interval=${RESOLVE_INTERVAL_SECS:-2}

addresses() {
  getent ahosts "$host" 2>/dev/null | awk '{print $1}' | sort -u | tr '\n' ' '
}

# nginx refuses to start while the name does not resolve.
until [ -n "$(addresses)" ]; do
  echo "balancer: waiting for $host to resolve" >&2
  sleep 1
done

nginx -g 'daemon off;' &
nginx_pid=$!
# docker stop sends SIGTERM (stop_signal below); nginx drains on SIGQUIT.
trap 'kill -QUIT "$nginx_pid" 2>/dev/null' TERM INT QUIT

current=$(addresses)
echo "balancer: $host is $current" >&2
while kill -0 "$nginx_pid" 2>/dev/null; do
  sleep "$interval" &
  wait $! || true
  next=$(addresses)
  if [ -n "$next" ] && [ "$next" != "$current" ]; then
    echo "balancer: $host changed from $current to $next; reloading" >&2
    current=$next
    nginx -s reload || echo "balancer: reload failed; keeping the running configuration" >&2
  fi
done
wait "$nginx_pid"
