#!/usr/bin/env bash
# Builds the agent (and the lookup micro-benchmark) once, then runs every benchmark script,
# writing each one's output to bench/out/NAME.txt. A failing script is reported and the
# others still run; the exit status is non-zero if any failed.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
OUT="$BENCH_DIR/out"
mkdir -p "$OUT"

read -r -a SCRIPTS <<<"${BENCH_SCRIPTS:-discovery registrations watchers scale dns checks consul eureka acl https client client-sync cluster gateway}"
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_DIR/target}
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR=$REPO_DIR/$TARGET_DIR

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), nproc $(nproc)"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "kernel: $(uname -r)"
    echo "os: $(. /etc/os-release && echo "$PRETTY_NAME")"
} | tee "$OUT/machine.txt"

echo "building: cargo build --release -p muster" >&2
(cd "$REPO_DIR" && cargo build --release -p muster --quiet) 2>&1 | tail -20 >&2
# Every script runs this copy, whatever happens to target/ meanwhile.
BIN_DIR=$(mktemp -d /tmp/muster-bench-bin.XXXXXX)
trap 'rm -rf "$BIN_DIR"' EXIT
cp "$TARGET_DIR/release/muster" "$BIN_DIR/muster"
export MUSTER_BIN="$BIN_DIR/muster"
# The target of bench/checks.sh: answers HTTP, TCP and gRPC health checks.
echo "building: cargo build --release -p muster-server --example check_target" >&2
(cd "$REPO_DIR" && cargo build --release -p muster-server --example check_target --quiet) 2>&1 | tail -20 >&2
cp "$TARGET_DIR/release/examples/check_target" "$BIN_DIR/check_target"
export CHECK_TARGET_BIN="$BIN_DIR/check_target"
{
    echo "commit at build: $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO_DIR" diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null || echo ' (with uncommitted changes under crates/)')"
    echo "agent binary sha256: $(sha256sum "$MUSTER_BIN" | cut -c1-16)"
} | tee -a "$OUT/machine.txt"
if grep -q 'criterion_group\|criterion_main' "$REPO_DIR/crates/core/benches/lookup.rs" 2>/dev/null; then
    echo "building: cargo bench -p muster-core --bench lookup --no-run" >&2
    (cd "$REPO_DIR" && cargo bench -p muster-core --bench lookup --no-run --quiet) 2>&1 | tail -20 >&2
fi
echo "building: cargo bench -p muster-client --no-run" >&2
(cd "$REPO_DIR" && cargo bench -p muster-client --no-run --quiet) 2>&1 | tail -20 >&2
export BENCH_NO_BUILD=1

failed=()
for s in "${SCRIPTS[@]}"; do
    echo "=== running bench/$s.sh ===" >&2
    started=$SECONDS
    # The cluster bench starts three etcd members and three agents several times and loads
    # 100,000 instances through them.
    limit=300
    [[ "$s" != cluster ]] || limit=900
    # The gateway bench runs five targets three times for 20 s, then four 30 s latency runs.
    [[ "$s" != gateway ]] || limit=900
    if timeout "$limit" bash "$BENCH_DIR/$s.sh" >"$OUT/$s.txt" 2>"$OUT/$s.log"; then
        echo "bench/$s.sh: ok in $((SECONDS - started)) s" >&2
    else
        echo "bench/$s.sh: FAILED (exit $?) after $((SECONDS - started)) s; see $OUT/$s.log" >&2
        failed+=("$s")
    fi
    cat "$OUT/$s.txt"
done

if ((${#failed[@]})); then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
