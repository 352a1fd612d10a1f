#!/usr/bin/env bash
# Install NVIDIA's perf_analyzer (PyPI package perf-analyzer) into bench/.perf_analyzer/
# for the kserve section of bench/run.py, and write bench/.perf_analyzer/perf_analyzer,
# the command that runs it.
#
# The wheel is built for manylinux_2_38: it needs glibc >= 2.38 and the libstdc++ of
# GCC 13 (GLIBCXX_3.4.32). On an older system (Debian 12 has glibc 2.36 and GCC 12), pip
# refuses the wheel and its binary does not start; then, where apt-get is available, this
# script downloads the C and C++ runtime of Debian 13 (libc6, libstdc++6, libgcc-s1,
# libssl3t64, zlib1g) from the Debian archive the system already uses, unpacks it beside
# the binary, and runs the binary with that runtime's loader. Nothing is installed
# system-wide; remove bench/.perf_analyzer to undo.
set -euo pipefail
cd "$(dirname "$0")"

VERSION=2.60.0
PYTHON=${PYTHON:-python3}
DEST=$PWD/.perf_analyzer
RUNTIME_SUITE=trixie
RUNTIME_PACKAGES=(libc6 libstdc++6 libgcc-s1 libssl3t64 zlib1g)

rm -rf "$DEST"
mkdir -p "$DEST/wheel"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_38_x86_64 --python-version 3 \
    "perf-analyzer==$VERSION" -d "$DEST/wheel"
"$PYTHON" -m zipfile -e "$DEST"/wheel/perf_analyzer-*.whl "$DEST/wheel"
BINARY=$DEST/wheel/perf_analyzer/bin/perf_analyzer
chmod +x "$BINARY"

write_command() {  # $@: the words that run the binary
    printf '#!/bin/sh\nexec %s "$@"\n' "$*" > "$DEST/perf_analyzer"
    chmod +x "$DEST/perf_analyzer"
}

if "$BINARY" --version >/dev/null 2>&1; then
    write_command "'$BINARY'"
    echo "perf_analyzer $VERSION runs on this system: $DEST/perf_analyzer"
    exit 0
fi
echo "perf_analyzer's binary does not start here:" >&2
"$BINARY" --version 2>&1 | head -3 >&2 || true

if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "no apt-get/dpkg-deb to fetch a newer C/C++ runtime: perf_analyzer is unavailable" >&2
    exit 1
fi
# The Debian archive this system already uses (deb822 .sources or one-line .list files).
ARCHIVE=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
          | awk '/^URIs:/ {print $2}' | grep -m1 '/debian$' || true)
if [ -z "$ARCHIVE" ]; then
    ARCHIVE=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
              | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /\/debian$/) {print $i; exit}}')
fi
if [ -z "$ARCHIVE" ]; then
    echo "no Debian archive in the apt sources: perf_analyzer is unavailable" >&2
    exit 1
fi
APT=$DEST/apt
mkdir -p "$APT/sources.list.d" "$APT/state/lists/partial" "$APT/cache/archives/partial" \
    "$DEST/runtime" "$DEST/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $ARCHIVE $RUNTIME_SUITE main" \
    > "$APT/sources.list"
OPTIONS=(-o "Dir::Etc::sourcelist=$APT/sources.list" -o "Dir::Etc::sourceparts=$APT/sources.list.d"
         -o "Dir::State=$APT/state" -o "Dir::State::status=/var/lib/dpkg/status"
         -o "Dir::Cache=$APT/cache" -o "APT::Sandbox::User=root")
apt-get "${OPTIONS[@]}" -qq update
(cd "$DEST/debs" && apt-get "${OPTIONS[@]}" -qq download "${RUNTIME_PACKAGES[@]}")
for deb in "$DEST"/debs/*.deb; do
    dpkg-deb -x "$deb" "$DEST/runtime"
done
LIBS=$DEST/runtime/usr/lib/x86_64-linux-gnu
write_command "'$LIBS/ld-linux-x86-64.so.2' --library-path '$LIBS' '$BINARY'"
"$DEST/perf_analyzer" --version
echo "perf_analyzer $VERSION runs with Debian $RUNTIME_SUITE's runtime: $DEST/perf_analyzer"
