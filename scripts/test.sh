#!/usr/bin/env bash
# The whole test suite. Usage: bash scripts/test.sh [pytest options]
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
