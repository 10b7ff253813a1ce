#!/bin/sh
# Like the official image: redis-server without a config file serves other containers, so
# protected mode (loopback only when no password is set) is turned off.
set -eu
if [ "${1:-}" = redis-server ]; then
  shift
  set -- redis-server --protected-mode no "$@"
fi
exec "$@"
