# Node for the FHIR engine (tests/fhir_server, started by tests/fhir_engine.py).
# Medplum's packages need Node >= 22, or 20.10+ with --experimental-websocket (fhir_engine.py adds
# the flag). When the system's Node is older (Debian 12's is 18), Node 22 comes from npm instead.
if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a >= 21 || (a === 20 && b >= 10) ? 0 : 1)' 2>/dev/null; then
    (cd tests/fhir_server/node22 && npm ci --no-audit --no-fund --loglevel=error)
fi
