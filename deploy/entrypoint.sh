#!/bin/sh
# The image's entry point: seed numba's writable cache with the kernels compiled at build
# time, then replace this shell with `lossgrad` (so the server is PID 1 and gets SIGTERM).
#
# numba loads a cache only from a directory it can write to (it probes with a temporary
# file and otherwise looks elsewhere, and with no writable place at all it refuses to
# start). The baked cache sits on the image's read-only filesystem, so it is copied
# (about 2 MB) into NUMBA_CACHE_DIR, a writable emptyDir in Kubernetes.
set -eu
if [ -n "${LOSSGRAD_BAKED_CACHE:-}" ] && [ -d "$LOSSGRAD_BAKED_CACHE" ] \
        && [ -n "${NUMBA_CACHE_DIR:-}" ]; then
    mkdir -p "$NUMBA_CACHE_DIR"
    cp -R "$LOSSGRAD_BAKED_CACHE/." "$NUMBA_CACHE_DIR/"
fi
exec lossgrad "$@"
