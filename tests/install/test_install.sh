#!/usr/bin/env bash
# Installs the build into a temporary prefix, then builds the quickstart
# example against the installed package twice: with find_package(libbus)
# and with pkg-config; runs both. Usage: test_install.sh BUILD_DIR SRC_DIR
set -euo pipefail
build=$1
src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
test -f "$tmp/prefix/include/bus/bus.h"
libdir=$(find "$tmp/prefix" -name 'libbus.so' -printf '%h\n' | head -n1)
test -n "$libdir"

# find_package(libbus)
cmake -S "$src/examples/quickstart" -B "$tmp/qs" \
    -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/qs" >/dev/null
LD_LIBRARY_PATH="$libdir" "$tmp/qs/quickstart" | grep -q "payment"

# pkg-config --cflags --libs libbus
export PKG_CONFIG_PATH="$libdir/pkgconfig"
# shellcheck disable=SC2046
cc -std=c11 -o "$tmp/qs-pc" "$src/examples/quickstart/main.c" \
    $(pkg-config --cflags --libs libbus)
LD_LIBRARY_PATH="$libdir" "$tmp/qs-pc" | grep -q "payment"
echo "install test: find_package and pkg-config builds ran"
