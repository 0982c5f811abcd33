#!/usr/bin/env bash
# The demo: a synthetic practice uploaded to the local Spine simulator, ending with the completion
# statistics and a report under reports/demo/. Usage: bash scripts/demo.sh [PATIENTS]
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m scr_nb.sim.demo --patients "${1:-2000}" --out "$ROOT/reports/demo"
