#!/usr/bin/env bash
# The whole test suite. Usage: bash scripts/test.sh [pytest options]
# Two Debian packages are installed here when missing (as root, through apt-get, one apt-get update
# for both): chromium, since the browser test cannot use a test tool's own browser download, and
# postgresql, whose server binaries (/usr/lib/postgresql/<version>/bin) the tests use to run a
# throwaway server of their own (tests/pgserver.py); the package's own default cluster plays no part.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
have_postgres() {
    local bindir
    for bindir in /usr/lib/postgresql/*/bin; do
        [ -x "$bindir/initdb" ] && [ -x "$bindir/pg_ctl" ] && return 0
    done
    return 1
}
MISSING=()
command -v chromium >/dev/null 2>&1 || MISSING+=(chromium)
have_postgres || MISSING+=(postgresql)
if [ "${#MISSING[@]}" -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "Installing Debian's ${MISSING[*]} for the tests..." >&2
        (apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${MISSING[@]}") >&2 \
            || echo "Could not install ${MISSING[*]}: the tests that need it will fail." >&2
    else
        echo "Missing: ${MISSING[*]} (install Debian's packages of that name, or run this as root):" \
             "the tests that need it will fail." >&2
    fi
fi
exec "$VENV/bin/python" -m pytest "$@"
