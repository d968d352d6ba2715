"""FHIR server stand-ins for tests: a real HTTP server on port 0 in a thread, answering with `app(handler)`.

    server = stand_in(lambda handler: handler.send_json(200, searchset()))   # the fixture
    server.base    # http://127.0.0.1:<port>/R4
    server.seen    # [(method, path)] of every request
    server.ports() # the client ports they came from (one per TCP connection)
    server.stop    # an Event set when the test ends: waits in an app end with it
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

App = Callable[["Handler"], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        self.server.seen.append((self.command, self.path))  # type: ignore[attr-defined]
        self.server.peers.add(self.client_address[1])  # type: ignore[attr-defined]
        try:
            self.server.app(self)  # type: ignore[attr-defined]
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on us: what the tests want
            self.close_connection = True

    def send_json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:  # quiet
        pass


class StandIn:
    """A FHIR server stand-in: `app(handler)` answers each request; `stop` ends every wait in it."""

    def __init__(self, app: App) -> None:
        self.stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.app = app  # type: ignore[attr-defined]
        self.server.seen = []  # type: ignore[attr-defined]
        self.server.peers = set()  # type: ignore[attr-defined]
        self.server.stop = self.stop  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/R4"

    @property
    def seen(self) -> list[tuple[str, str]]:
        return self.server.seen  # type: ignore[attr-defined]

    def ports(self) -> set[int]:
        """The client ports requests came from: one per TCP connection."""
        return set(self.server.peers)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in() -> Iterator[Callable[[App], StandIn]]:
    started: list[StandIn] = []

    def start(app: App) -> StandIn:
        started.append(StandIn(app))
        return started[-1]

    yield start
    for server in started:
        server.close()


def searchset(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}
