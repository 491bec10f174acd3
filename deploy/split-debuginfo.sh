#!/bin/sh
# Splits the debug info out of a release binary: BINARY stays as built, STRIPPED gets the
# binary without it (a tenth of the size: what the image ships), DEBUG the debug info alone,
# which STRIPPED names in its .gnu_debuglink section so that gdb, perf and addr2line find it
# (`gdb -s DEBUG STRIPPED core`, or DEBUG beside STRIPPED). The release profile keeps debug
# info for profiling; the Dockerfile runs this, and tests/deploy.rs checks it.
#
#   deploy/split-debuginfo.sh target/release/verger /usr/local/bin/verger /usr/local/lib/debug/verger.debug
set -eu
if [ "$#" -ne 3 ]; then
  echo "usage: $0 BINARY STRIPPED DEBUG" >&2
  exit 2
fi
binary=$1 stripped=$2 debug=$3
mkdir -p "$(dirname "$stripped")" "$(dirname "$debug")"
objcopy --only-keep-debug "$binary" "$debug"
chmod 0644 "$debug"
# --add-gnu-debuglink records the debug file's name and CRC; it must be run where the file is.
tmp="$(cd "$(dirname "$stripped")" && pwd)/.$(basename "$stripped").tmp.$$"
objcopy --strip-debug --strip-unneeded "$binary" "$tmp"
(cd "$(dirname "$debug")" && objcopy --add-gnu-debuglink="$(basename "$debug")" "$tmp")
chmod 0755 "$tmp"
mv "$tmp" "$stripped"
