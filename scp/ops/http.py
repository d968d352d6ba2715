"""Operations HTTP endpoint: /healthz, /readyz and Prometheus /metrics (off by default).

Plain stdlib http.server in a daemon thread, so it never holds the process up
at shutdown. It only reads: the node's Metrics registry (scp.ops.metrics) and its
readiness checks (scp.ops.readiness). Bind it to localhost (the default) or put it
behind something that authenticates; it has no access control of its own.

    handle = start_ops_server(config.operations, metrics, node.readiness)
    ...
    handle.stop()

- /healthz: 200 "ok" while the process serves HTTP (liveness: restart me if not);
- /readyz: 200 when every readiness check passes, else 503; the JSON body names each
  check and the failed ones (readiness: send me studies / page someone if not);
- /metrics: prometheus_client's text format of the node's registry; 500 when a gauge
  cannot be read (a failed scrape, not a zero).

When ``operations.http_enabled`` is false, start_ops_server starts nothing and
returns a handle whose ``port`` is None and whose ``stop()`` does nothing, so
the caller needs no branch of its own.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import generate_latest

from mapping.errors import ConfigurationError
from scp.config import OperationsConfig
from scp.ops.metrics import Metrics
from scp.ops.readiness import Readiness

log = logging.getLogger("scp.ops.http")

# generate_latest writes the text format 0.0.4 (prometheus_client's CONTENT_TYPE_LATEST
# may name a newer version than what generate_latest produces).
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
NO_CHECKS = Readiness({})


class _OpsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: Metrics, readiness: Readiness) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.metrics = metrics
        self.readiness = readiness
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        """One log line, never socketserver's traceback on stderr: load balancers' health checks
        (HAProxy's httpchk) reset the connection as soon as they have the status line."""
        exc = sys.exc_info()[1]
        host = client_address[0] if client_address else "?"
        if isinstance(exc, ConnectionError):
            log.debug("%s closed the connection early (%s)", host, type(exc).__name__)
            return
        log.warning("request from %s failed: %s: %s", host, type(exc).__name__, exc,
                    exc_info=log.isEnabledFor(logging.DEBUG))


class _Handler(BaseHTTPRequestHandler):
    server: _OpsHTTPServer
    server_version = "dicom-fhir-scp"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(HTTPStatus.OK, TEXT, "ok\n", send_body)
        elif path == "/readyz":
            report = self.server.readiness.report()
            status = HTTPStatus.OK if report["ready"] else HTTPStatus.SERVICE_UNAVAILABLE
            if not report["ready"]:
                log.debug("/readyz: not ready: %s", ", ".join(report["failed"]))
            self._send(status, JSON, json.dumps(report, indent=1) + "\n", send_body)
        elif path == "/metrics":
            try:
                body = generate_latest(self.server.metrics.registry).decode("utf-8")
            except Exception as exc:  # a broken gauge must show as a failed scrape, not a zero
                log.warning("/metrics: %s", exc)
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, TEXT, f"{exc}\n", send_body)
                return
            self._send(HTTPStatus.OK, PROMETHEUS_CONTENT_TYPE, body, send_body)
        else:
            self._send(HTTPStatus.NOT_FOUND, TEXT, "not found; try /healthz, /readyz or /metrics\n", send_body)

    def _send(self, status: HTTPStatus, content_type: str, text: str, send_body: bool) -> None:
        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        # Prometheus scrapes every few seconds: access lines only at DEBUG.
        log.debug("%s %s", self.address_string(), format % args)


class OpsServer:
    """A running endpoint: ``port`` is the bound port (useful with port 0)."""

    def __init__(self, server: _OpsHTTPServer) -> None:
        self._server = server
        self.host = server.server_address[0]
        self.port: int | None = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="ops-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()


class _Disabled:
    """What start_ops_server returns when the endpoint is off."""

    host = None
    port = None

    def stop(self) -> None:
        pass


def start_ops_server(ops: OperationsConfig, metrics: Metrics,
                     readiness: Readiness = NO_CHECKS) -> OpsServer | _Disabled:
    """Serve /healthz, /readyz and /metrics on ops.http_bind:ops.http_port when ops.http_enabled."""
    if not ops.http_enabled:
        return _Disabled()
    try:
        server = _OpsHTTPServer((ops.http_bind, ops.http_port), metrics, readiness)
    except OSError as exc:
        raise ConfigurationError(
            f"operations.http_port: cannot listen on {ops.http_bind}:{ops.http_port}: {exc.strerror or exc}") from exc
    handle = OpsServer(server)
    log.info("operations endpoint on http://%s:%d (/healthz, /readyz, /metrics)", _host_for_url(handle.host), handle.port)
    return handle


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host
