#!/usr/bin/env bash
# muster-client's per-request costs, in one run on this machine:
#  - pick (+ outcome) over 10, 100, 1,000 endpoints for each policy, and tower's p2c balancers
#    (peak-EWMA, pending requests) over the same always-ready no-op services
#    (crates/client/benches/pick.rs; it also prints allocations per pick);
#  - the tower `Balanced` service's cost per request over a direct call of the same no-op
#    inner service (crates/client/benches/service.rs).
# Prints criterion's median per iteration for each, as Markdown rows for BENCHMARKS.md.
# The sync figures (propagation, reconnect spread, first pick from disk) are bench/client-sync.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MEASURE=${MEASURE:-5}
need_python

echo "=== muster-client: per-request costs ==="
machine_info
cd "$REPO_DIR"
rm -rf target/criterion/pick target/criterion/pick_only target/criterion/tower_p2c target/criterion/service
cargo bench --quiet -p muster-client --bench pick -- --noplot --warm-up-time 2 --measurement-time "$MEASURE" 2>&1 \
    | grep -E "allocations|^  (muster|tower)" || true
cargo bench --quiet -p muster-client --bench service -- --noplot --warm-up-time 2 --measurement-time "$MEASURE" >/dev/null 2>&1

python3 - <<'PY'
import json, pathlib
root = pathlib.Path("target/criterion")
def median(path):
    est = json.loads((path / "new" / "estimates.json").read_text())
    return est["median"]["point_estimate"]
print()
print("| group | case | endpoints | median ns |")
print("|---|---|---|---|")
for group in ["pick_only", "pick", "tower_p2c"]:
    for case in sorted((root / group).iterdir()):
        if not case.is_dir() or case.name == "report":
            continue
        for n in sorted((c for c in case.iterdir() if c.name.isdigit()), key=lambda c: int(c.name)):
            print(f"| {group} | {case.name} | {n.name} | {median(n):.0f} |")
svc = root / "service"
direct, balanced = median(svc / "inner_direct"), median(svc / "balanced")
print()
print(f"| tower service | direct call | Balanced | added |")
print("|---|---|---|---|")
print(f"| per request, ns | {direct:.0f} | {balanced:.0f} | {balanced - direct:.0f} |")
PY
