#!/usr/bin/env bash
# Runs each cargo-fuzz target of verger for a bounded time.
#
#   fuzz/run.sh [seconds-per-target]     (default 60; from the project root or anywhere)
#
# Needs a nightly toolchain (`cargo +nightly`). Installs cargo-fuzz if missing, seeds
# fuzz/corpus/<target>/ (git-ignored), runs every target, and exits non-zero if any of them
# found a crash, timeout or OOM; the offending inputs are left in fuzz/artifacts/<target>/ and
# the libFuzzer output in fuzz/logs/<target>.log.
set -euo pipefail

SECS="${1:-60}"
if ! [[ "$SECS" =~ ^[0-9]+$ ]] || [ "$SECS" -eq 0 ]; then
    echo "usage: $0 [seconds-per-target]" >&2
    exit 2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"
TARGETS=(decode hostfile)
FRUITS="$HERE/../../shared/data/fruits-360-sample/Training"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked || cargo install cargo-fuzz
fi

# ---- seed corpora (existing corpus entries, e.g. from earlier runs, are kept)
mkdir -p corpus/decode corpus/hostfile artifacts logs

if [ -d "$FRUITS" ]; then
    # The first two pictures (by name) of each of the first few classes, five in all.
    n=0
    for class in "$FRUITS"/*/; do
        for jpg in $(ls "$class" | grep -iE '\.jpe?g$' | sort | head -n 2); do
            [ "$n" -lt 5 ] || break 2
            cp -n "$class$jpg" "corpus/decode/seed-$(basename "$class")-$jpg"
            n=$((n + 1))
        done
    done
else
    echo "note: $FRUITS not found, decode corpus gets the PNG seeds only" >&2
fi
# A 2x2 RGB PNG and a 3x1 grey+alpha PNG.
base64 -d > corpus/decode/seed-rgb-2x2.png <<'B64'
iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAEklEQVR4nGP4z8DAAMIM/4EAAB/uBfsL2WiLAAAAAElFTkSuQmCC
B64
base64 -d > corpus/decode/seed-ga-3x1.png <<'B64'
iVBORw0KGgoAAAANSUhEUgAAAAMAAAABCAQAAACx6dw/AAAAD0lEQVR4nGPg+t/Q8IsBAAqyAwQp01pqAAAAAElFTkSuQmCC
B64

printf 'localhost:2101\n# c\n[::1]:2200\n' > corpus/hostfile/seed-basic
printf 'h1.example.com:2101  # first\r\n\n10.0.0.2:65535\n' > corpus/hostfile/seed-crlf

# ---- build once (all targets), then run each
echo "== building fuzz targets"
start=$(date +%s)
cargo +nightly fuzz build --fuzz-dir "$HERE"
echo "== build took $(( $(date +%s) - start )) s"

declare -A SUMMARY
failed=0
for t in "${TARGETS[@]}"; do
    echo "== fuzzing $t for $SECS s"
    log="logs/$t.log"
    if cargo +nightly fuzz run --fuzz-dir "$HERE" "$t" "corpus/$t" -- \
        -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 2>&1 | tee "$log"; then
        done_line="$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1 || true)"
        SUMMARY[$t]="ok: ${done_line:-no 'Done' line in $log}"
    else
        failed=1
        what="$(grep -oE 'ERROR: libFuzzer: [a-z-]+|panicked at [^ ]+' "$log" | head -n 1 || true)"
        artifact="$(grep -oE 'Test unit written to [^ ]+' "$log" | tail -n 1 | sed 's/Test unit written to //' || true)"
        SUMMARY[$t]="FAILED: ${what:-see $log}${artifact:+, input: $artifact}"
    fi
done

echo
echo "== summary ($SECS s per target)"
for t in "${TARGETS[@]}"; do
    printf '%-9s %s\n' "$t" "${SUMMARY[$t]}"
done
exit "$failed"
