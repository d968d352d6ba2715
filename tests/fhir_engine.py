"""The validating FHIR engine (tests/fhir_server/server.mjs) as a subprocess, for tests and benchmarks.

    with FhirEngine.start() as engine:          # port 0: the engine picks a free one
        engine.base_url                         # http://127.0.0.1:<port>
        engine.stats()["requests"]              # FHIR requests received since the last reset
        engine.fault(count=2, status=503, retry_after=1)
        engine.set_auth("oauth2", clientId="c", clientSecret="s")
        engine.resources("ImagingStudy")        # everything stored, bypassing auth

Fixtures: ``fhir_engine_process`` (one engine per test session) and ``fhir_engine``
(the same engine, reset to an empty store, no faults, no auth, before each test).

The engine needs Medplum's packages (``npm ci`` in tests/fhir_server, done by
tests/run.sh) and a Node that can run them: Node >= 22, or Node 20.10+ with
``--experimental-websocket``, or the Node 22 that tests/run.sh installs from npm
into tests/fhir_server/node22 when the system's Node is older. Without them a
test is skipped locally and FAILS under CI=true (conftest.require_tool's rule).
"""

from __future__ import annotations

import functools
import os
import re
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import IN_CI, REPO

SERVER_DIR = REPO / "tests" / "fhir_server"
SERVER = SERVER_DIR / "server.mjs"
NODE22 = SERVER_DIR / "node22" / "node_modules" / ".bin" / "node"
READY = re.compile(r"FHIR engine ready on (https?://\S+)")
START_TIMEOUT = 60.0


class EngineUnavailable(RuntimeError):
    """The engine cannot run on this machine (no usable Node, packages not installed)."""


def _unavailable(message: str) -> None:
    message += " (bash tests/run.sh installs it)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@functools.lru_cache(maxsize=None)
def node_command() -> tuple[str, ...]:
    """The command that runs Medplum's packages: a Node binary and the flags it needs."""
    explicit = os.environ.get("FHIR_ENGINE_NODE")
    candidates = [explicit] if explicit else [str(NODE22) if NODE22.exists() else None, shutil.which("node")]
    seen = []
    for node in filter(None, candidates):
        version = _node_version(node)
        seen.append(f"{node} {'.'.join(map(str, version)) if version else '(unknown version)'}")
        if version is None:
            continue
        if version >= (22, 0):
            return (node,)
        if version >= (20, 10):
            return (node, "--experimental-websocket")  # Medplum needs a global WebSocket
    raise EngineUnavailable("no Node able to run the FHIR engine (needs Node >= 22, or 20.10+); found: "
                            + ("; ".join(seen) or "no node on PATH"))


def _node_version(node: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.match(r"v(\d+)\.(\d+)", out.strip())
    return (int(match[1]), int(match[2])) if match else None


def engine_command(port: int = 0, auth: dict[str, Any] | None = None, tls: "TlsFiles | None" = None) -> list[str]:
    if not (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        raise EngineUnavailable("the FHIR engine's npm packages are not installed (npm ci in tests/fhir_server)")
    command = [*node_command(), str(SERVER), "--port", str(port)]
    flags = {"mode": "--auth", "token": "--token", "username": "--username", "password": "--password",
             "clientId": "--client-id", "clientSecret": "--client-secret", "tokenLifetime": "--token-lifetime"}
    for key, value in (auth or {}).items():
        command += [flags[key], str(value)]
    if tls is not None:
        command += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
    return command


@dataclass(frozen=True)
class TlsFiles:
    """A private CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(folder: Path, openssl: str = "openssl") -> TlsFiles:
    """Create a CA and a certificate for IP 127.0.0.1 with the openssl command."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = folder / "server.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n")
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for args in (
        ["req", "-x509", *new_key, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=dicom-fhir-scp test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", *new_key, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "2", "-extfile", ext],
    ):
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True, timeout=60)
    return TlsFiles(ca, cert, key)


@dataclass
class FhirEngine:
    """A running engine. Stop it with stop() (or use it as a context manager)."""

    process: subprocess.Popen
    base_url: str
    stderr_path: Path
    verify: bool | str = True  # for the admin calls: the CA of an HTTPS engine

    # --- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def start(cls, port: int = 0, *, timeout: float = START_TIMEOUT, tls: TlsFiles | None = None,
              **auth: Any) -> "FhirEngine":
        """Start an engine (``auth``: mode=..., token=..., clientId=..., as POST /_admin/auth takes;
        ``tls``: serve HTTPS with that certificate)."""
        command = engine_command(port, auth, tls)
        stderr = tempfile.NamedTemporaryFile(prefix="fhir-engine-", suffix=".log", delete=False)
        process = subprocess.Popen(command, cwd=SERVER_DIR, stdout=subprocess.PIPE, stderr=stderr,
                                   stdin=subprocess.DEVNULL)
        stderr.close()
        try:
            base_url = _wait_ready(process, timeout)
        except BaseException:
            process.kill()
            process.wait()
            log = Path(stderr.name).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"FHIR engine did not start ({' '.join(command)}):\n{log}") from None
        return cls(process, base_url, Path(stderr.name), str(tls.ca) if tls else True)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()
        self.stderr_path.unlink(missing_ok=True)

    def __enter__(self) -> "FhirEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/oauth2/token"

    def log(self) -> str:
        """What the engine wrote on stderr (its own errors), until stop()."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- test controls (/_admin/) --------------------------------------------------------------

    def _admin(self, method: str, action: str, body: Any = None) -> Any:
        response = requests.request(method, f"{self.base_url}/_admin/{action}", json=body, timeout=30,
                                    verify=self.verify)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        """Empty store, counters zero, no faults, no authentication."""
        self._admin("POST", "reset")
        self._admin("POST", "auth", {"mode": "none"})

    def reset_stats(self) -> None:
        self._admin("POST", "reset-stats")

    def stats(self) -> dict[str, Any]:
        """{requests, tokenRequests, bytesReceived, log: [{method, path, bytes, status}]}."""
        return self._admin("GET", "stats")

    def request_log(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every FHIR request since the last reset."""
        return [(e["method"], e["path"], e["status"]) for e in self.stats()["log"]]

    def fault(self, count: int = 1, status: int = 503, *, retry_after: str | int | None = None,
              mode: str = "status", method: str | None = None, path: str | None = None) -> None:
        """The next ``count`` FHIR requests (with ``method``, whose path contains ``path``) fail:
        mode "status" answers ``status`` (with Retry-After when given), "hang" never answers,
        "close" drops the connection, "lose-reply" lets the engine process the request and then
        drops the connection unanswered (a reply lost on the way)."""
        body: dict[str, Any] = {"count": count, "status": status, "mode": mode}
        if method is not None:
            body["method"] = method
        if retry_after is not None:
            body["retryAfter"] = str(retry_after)
        if path is not None:
            body["path"] = path
        self._admin("POST", "faults", body)

    def set_auth(self, mode: str, **settings: Any) -> None:
        """mode none | bearer (token) | basic (username, password) | oauth2 (clientId, clientSecret,
        tokenLifetime seconds). Tokens issued before are revoked."""
        self._admin("POST", "auth", {"mode": mode, **settings})

    def revoke_tokens(self) -> None:
        self._admin("POST", "revoke-tokens")

    def resources(self, resource_type: str) -> list[dict[str, Any]]:
        return self._admin("GET", f"resources/{resource_type}")


def _wait_ready(process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    buffer = b""
    try:
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the engine exited with status {process.wait()}")
            buffer += chunk
            match = READY.search(buffer.decode(errors="replace"))
            if match:
                return match[1]
    finally:
        selector.close()
    raise TimeoutError(f"no ready line within {timeout:g} s")


def start_or_skip(**kwargs: Any) -> FhirEngine:
    """FhirEngine.start(), skipped locally / failed in CI when this machine cannot run it."""
    try:
        return FhirEngine.start(**kwargs)
    except EngineUnavailable as exc:
        _unavailable(str(exc))
        raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def fhir_engine_process() -> Iterator[FhirEngine]:
    engine = start_or_skip()
    yield engine
    engine.stop()


@pytest.fixture
def fhir_engine(fhir_engine_process: FhirEngine) -> FhirEngine:
    if fhir_engine_process.process.poll() is not None:
        pytest.fail(f"the FHIR engine died:\n{fhir_engine_process.log()[-3000:]}")
    fhir_engine_process.reset()
    return fhir_engine_process
