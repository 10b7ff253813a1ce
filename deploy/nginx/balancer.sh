#!/bin/sh
# Entrypoint of the docker-compose balancer. nginx resolves the `shoal` service name once, when it
# loads its configuration; replicas that are added (`--scale`), removed, or restarted with a new
# address would go unseen. This runs nginx and re-resolves the name every RESOLVE_INTERVAL_SECS,
# reloading nginx gracefully (running streams stay on the old workers) when the set of addresses
# changes. Works with any nginx version and any DNS the container runtime provides.
set -eu

host=${UPSTREAM_HOST:-shoal}
interval=${RESOLVE_INTERVAL_SECS:-2}

# Bounded: once no replica exists the name may be forwarded to an upstream DNS that never
# answers, and the shell runs no trap (docker stop) until a foreground command returns.
addresses() {
  timeout 2 getent ahosts "$host" 2>/dev/null | awk '{print $1}' | sort -u | tr '\n' ' '
}

# nginx refuses to start while the name does not resolve.
until [ -n "$(addresses)" ]; do
  echo "balancer: waiting for $host to resolve" >&2
  sleep 1
done

nginx -g 'daemon off;' &
nginx_pid=$!
# docker stop sends SIGTERM: nginx drains on SIGQUIT (no new connections, requests finish), but
# it would wait for every open event stream; after SHUTDOWN_GRACE_SECS it is told to stop now
# (clients reconnect elsewhere and resume their streams).
stop() {
  kill -QUIT "$nginx_pid" 2>/dev/null || true
  ( sleep "${SHUTDOWN_GRACE_SECS:-10}"; kill -TERM "$nginx_pid" 2>/dev/null ) &
}
trap stop TERM INT QUIT

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
