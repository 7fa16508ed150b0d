#!/bin/sh
# Container entrypoint (runs under tini). Starts `python -m service` with the arguments given to
# `docker run IMAGE [ARGS...]`; a first argument that is not an option runs that command instead
# (e.g. `docker run IMAGE python -m trainer ...`).
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

# A key from a file (Docker/Kubernetes secrets) wins over nothing, never over an explicit key.
if [ -n "${LORASERVE_API_KEY_FILE:-}" ] && [ -z "${LORASERVE_API_KEY:-}" ]; then
    if [ ! -r "$LORASERVE_API_KEY_FILE" ]; then
        echo "loraserve: LORASERVE_API_KEY_FILE=$LORASERVE_API_KEY_FILE is not readable" >&2
        exit 64
    fi
    LORASERVE_API_KEY="$(cat "$LORASERVE_API_KEY_FILE")"
    export LORASERVE_API_KEY
fi

# An empty variable (compose's ${LORASERVE_API_KEY:-}) means no key, not the empty key.
if [ -z "${LORASERVE_API_KEY:-}" ]; then
    unset LORASERVE_API_KEY
fi

# The container listens on all interfaces, so mutations (uploads, deletes, training) need a key
# unless the operator opts out explicitly.
key_in_args=0
for arg in "$@"; do
    case "$arg" in
        --api-key | --api-key=*) key_in_args=1 ;;
    esac
done
if [ -z "${LORASERVE_API_KEY:-}" ] && [ "$key_in_args" = 0 ]; then
    if [ "${LORASERVE_INSECURE_NO_AUTH:-0}" != "1" ]; then
        echo "loraserve: refusing to start without an API key: set LORASERVE_API_KEY (or" \
            "LORASERVE_API_KEY_FILE), or LORASERVE_INSECURE_NO_AUTH=1 to serve without one" >&2
        exit 64
    fi
    echo "loraserve: WARNING: LORASERVE_INSECURE_NO_AUTH=1, anyone who can reach the port can" \
        "upload, delete and train adapters" >&2
fi

# Multiprocess metrics go to PROMETHEUS_MULTIPROC_DIR (the image sets local scratch, /tmp); the
# server's main process empties that folder at start, before any of its processes writes there.

exec python -m service "$@"
