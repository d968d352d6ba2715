#!/usr/bin/env bash
# Install everything the tests need, then run them: bash tests/run.sh [pytest args]
#
# - a virtual environment in .venv with the project and its test extras
# - dcmtk (storescu, dcmsend, storescp) from Debian's packages when missing
# - the FHIR engine's npm packages (tests/fhir_server) when that folder exists
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k mapping -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'

apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        if [ -z "${_APT_UPDATED:-}" ]; then apt-get update -qq >/dev/null; _APT_UPDATED=1; fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "tests/run.sh: please install $* (need root for apt-get)" >&2
    fi
}

command -v storescu >/dev/null || apt_install dcmtk

if [ -f tests/fhir_server/package.json ]; then
    command -v npm >/dev/null || apt_install nodejs npm
    (cd tests/fhir_server && npm ci --no-audit --no-fund --loglevel=error)
fi

for hook in tests/run.d/*.sh; do
    [ -e "$hook" ] && source "$hook"
done

exec "$VENV/bin/python" -m pytest "$@"
