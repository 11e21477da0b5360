#!/usr/bin/env bash
# Runs every fuzz target for a bounded time, starting from the seed corpus in corpus/<target>.
# .ci/run calls it. A crash fails the run, and libFuzzer's output names the crashing input
# (fuzz/artifacts/<target>/crash-...); replay it with `cargo fuzz run <target> <that file>`.
#
#   FUZZ_SECONDS    time per target (default 60; 0 skips fuzzing)
#   FUZZ_SANITIZER  address (default) or none, when the address sanitizer cannot be used
#   FUZZ_TARGETS    targets to run (default: every target)
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-60}"
sanitizer="${FUZZ_SANITIZER:-address}"
targets="${FUZZ_TARGETS:-dns_request http_request http_wire}"

if [ "$seconds" = 0 ]; then
    echo "FUZZ_SECONDS=0: not fuzzing"
    exit 0
fi

# The fuzz crate builds the workspace's crates at the workspace's versions: its lock starts
# from the workspace's, and cargo adds what only fuzzing needs (libfuzzer-sys) and drops the
# rest. So a dependency change in the workspace never leaves the fuzz build behind.
cp ../Cargo.lock Cargo.lock
cargo metadata --format-version 1 >/dev/null

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz needs nightly flags: nightly when rustup has it, else the stable compiler with
# RUSTC_BOOTSTRAP=1 (a fresh machine may have only stable).
toolchain=()
if command -v rustup >/dev/null 2>&1 && rustup toolchain list | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi

# Debug assertions on, so arithmetic overflow panics instead of wrapping. One build of every
# target; each run below finds it up to date (the same flags).
flags=(--sanitizer "$sanitizer" --debug-assertions)
cargo "${toolchain[@]}" fuzz build "${flags[@]}"

# New inputs go to a scratch directory (libFuzzer writes to the first corpus directory), so
# the committed corpus stays as it is. The targets run side by side (one process each, as
# many as CI has cores: two here), each with its own log, shown when it ends.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
declare -A pids
for target in $targets; do
    mkdir -p "$scratch/$target"
    dict=()
    if [ -f "$target.dict" ]; then
        dict=(-dict="$target.dict")
    fi
    echo "fuzzing $target for ${seconds}s"
    cargo "${toolchain[@]}" fuzz run "${flags[@]}" "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len=8192 -timeout=20 -rss_limit_mb=2048 \
        -print_final_stats=1 "${dict[@]}" >"$scratch/$target.log" 2>&1 &
    pids[$target]=$!
done
failed=()
for target in $targets; do
    if ! wait "${pids[$target]}"; then
        failed+=("$target")
    fi
    echo "---- $target"
    # The whole log of a failed run (the panic, the input's path and how to replay it);
    # the totals of a passing one.
    if [[ " ${failed[*]} " == *" $target "* ]]; then
        cat "$scratch/$target.log"
    else
        grep -E '^(Done|stat::)|DONE' "$scratch/$target.log" || true
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found a crash in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
