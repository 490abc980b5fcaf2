#!/usr/bin/env bash
# Debian's redis-server for the shared semantic-cache tests (tests/cache/test_redis_store.py,
# tests/serve/test_replicas.py start their own on 127.0.0.1 and skip only when the binary is absent), and the
# redis client (part of the serve extra; installed here too for a venv made before it was). Idempotent: a second
# run is a no-op taking well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_redis: no apt-get here: install redis-server (>= 6.2) yourself; the Redis tests skip without it"
  else
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
      if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "setup_redis: not root and no sudo: install redis-server yourself; the Redis tests skip without it"
        SUDO="skip"
      fi
    fi
    if [ "$SUDO" != "skip" ]; then
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    fi
  fi
fi
if command -v redis-server >/dev/null 2>&1; then echo "redis: $(redis-server --version | cut -d' ' -f1-3)"; fi
[ -x .venv/bin/python ] && { .venv/bin/python -c "import redis" 2>/dev/null || .venv/bin/pip install -q "redis>=5"; }
exit 0
