#!/usr/bin/env bash
# The whole test suite. Usage: bash scripts/test.sh [pytest options]
# The browser test drives the control panel in Debian's chromium: installed here when missing
# (as root, through apt-get), since a test tool's own browser download cannot be used.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "Installing Debian's chromium for the browser test..." >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >&2 \
            || echo "Could not install chromium: the browser test will fail." >&2
    else
        echo "chromium is missing (install Debian's chromium): the browser test will fail." >&2
    fi
fi
exec "$VENV/bin/python" -m pytest "$@"
