#!/usr/bin/env bash
# The demo: a synthetic practice uploaded to the local Spine simulator, ending with the completion
# statistics and a report under reports/demo/. Usage: bash scripts/demo.sh [PATIENTS]
# The fleet variant: many small practices at once on a local Dask cluster under one rate limit,
# checked against the Spine's own record, under reports/demo-fleet/.
# Usage: bash scripts/demo.sh --fleet [PRACTICES] [--store postgresql://...]
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
if [ "${1:-}" = "--fleet" ]; then
    shift
    count=12
    if [ -n "${1:-}" ] && [ "${1#-}" = "$1" ]; then count="$1"; shift; fi
    exec "$VENV/bin/python" -m scr_nb.sim.demo_fleet --practices "$count" \
        --out "$ROOT/reports/demo-fleet" "$@"
fi
exec "$VENV/bin/python" -m scr_nb.sim.demo --patients "${1:-2000}" --out "$ROOT/reports/demo"
