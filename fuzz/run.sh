#!/usr/bin/env bash
# Builds and runs every fuzz target, one after the other, on one core.
#
#   fuzz/run.sh                 # CI: 15 s per target
#   fuzz/run.sh 60              # N seconds per target
#   fuzz/run.sh --long          # at least 1,000,000 executions per target (the figures in fuzz/README.md)
#   fuzz/run.sh 30 ca_answer    # only the named targets
#
# Harness: libFuzzer (the `libfuzzer-sys` crate builds it from source) with SanitizerCoverage passes enabled
# through stable rustc flags: inline 8-bit edge counters, PC table, comparison tracing. No nightly, no
# cargo-fuzz, no sanitizer runtime: overflow checks and debug assertions are on, so arithmetic overflow and
# out-of-bounds indexing panic, and any panic aborts the run.
#
# Install steps (done below, idempotently, so a fresh CI machine works):
#   - a stable Rust toolchain with cargo (already there for the main build);
#   - a C++ compiler for libFuzzer's sources: Debian's `g++` (`apt-get install g++`).
#
# Per target it prints executions, exec/s, coverage (libFuzzer's `cov:` edges and `ft:` features) and the
# crash count; it exits 1 if any target crashed, timed out or ran out of memory. Reproducers are kept in
# fuzz/artifacts/<target>/; rerun one with `fuzz/target/<triple>/release/<target> <file>`. New inputs found
# go to a scratch directory: the committed corpus (fuzz/corpus/<target>/) changes only by hand.
set -euo pipefail
cd "$(dirname "$0")"

TARGETS=(cni_stdin cni_env cni_agent_answer plugin_request zds_client xds_address xds_authorization
    ca_answer ca_request hbone_connect local_config agent_enrollment mesh_config admin_http
    zds_server plugin_hint check_connect dns_query)

mode=time
seconds=15
if [ $# -gt 0 ]; then
    case "$1" in
        --long) mode=long; shift ;;
        ''|*[!0-9]*) ;;
        *) seconds=$1; shift ;;
    esac
fi
if [ $# -gt 0 ]; then TARGETS=("$@"); fi

if ! command -v c++ >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends g++ >/dev/null
fi

TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
# --target keeps the instrumentation off build scripts and proc macros (as cargo-fuzz does).
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
bins=()
for t in "${TARGETS[@]}"; do bins+=(--bin "$t"); done
cargo build --release --locked --target "$TRIPLE" "${bins[@]}"

mkdir -p logs
printf '%-18s %12s %10s %8s %8s %8s %s\n' target executions exec/s cov ft crashes time
failed=0
for t in "${TARGETS[@]}"; do
    mkdir -p "artifacts/$t" "corpus/$t"
    scratch=$(mktemp -d)
    if [ "$mode" = long ]; then limit=(-runs=1000000); else limit=(-max_total_time="$seconds"); fi
    start=$(date +%s)
    rc=0
    "$CARGO_TARGET_DIR/$TRIPLE/release/$t" "${limit[@]}" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" "$scratch" "corpus/$t" >"logs/$t.log" 2>&1 || rc=$?
    took=$(($(date +%s) - start))
    rm -rf "$scratch"
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$t.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "logs/$t.log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "logs/$t.log" | tail -1 | cut -d' ' -f2)
    ft=$(grep -o 'ft: [0-9]*' "logs/$t.log" | tail -1 | cut -d' ' -f2)
    crashes=$(find "artifacts/$t" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
    printf '%-18s %12s %10s %8s %8s %8s %ss\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$crashes" "$took"
    if [ "$rc" != 0 ] || [ "$crashes" != 0 ]; then
        failed=1
        echo "--- $t failed (exit $rc); last lines of fuzz/logs/$t.log:"
        tail -n 30 "logs/$t.log"
    fi
done
exit $failed
