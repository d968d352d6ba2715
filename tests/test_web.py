"""scp.web on its own (what any HTTP client of the node gets): deadline, size cap, redirects, limits."""

from __future__ import annotations

import time

import pytest
import requests

from scp.web import DeadlineExceeded, Limits, OffBase, TooLarge, fetch
from tests.fhir_standin import Handler, stand_in  # noqa: F401 (fixture)

LIMITS = Limits(read_timeout=10, deadline=1, max_bytes=1024)


def test_the_deadline_covers_the_whole_request_not_each_read(stand_in):
    def drip(handler: Handler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while not handler.server.stop.wait(0.1):  # type: ignore[attr-defined]
            handler.wfile.write(b"a")
            handler.wfile.flush()

    server = stand_in(drip)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="within the deadline of 1 s"):
        fetch(requests.Session(), "GET", server.base + "/x", base=server.base,
              limits=Limits(read_timeout=10, deadline=1, max_bytes=2**20))
    assert time.monotonic() - started < 1 + 5  # the deadline is the bound; 5 s of margin for a busy machine


def test_a_body_announced_over_the_cap_is_not_read(stand_in):
    server = stand_in(lambda handler: handler.send_json(200, {"padding": "x" * 5000}))
    with pytest.raises(TooLarge, match="announced a 5015-byte answer, over the cap of 1024 bytes: not read"):
        fetch(requests.Session(), "GET", server.base + "/x", base=server.base, limits=LIMITS)


def test_a_body_streamed_past_the_cap_is_not_read_on(stand_in):
    def unannounced(handler: Handler) -> None:
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(b"x" * 5000)

    server = stand_in(unannounced)
    with pytest.raises(TooLarge, match="sent more than the cap of 1024 bytes: reading stopped"):
        fetch(requests.Session(), "GET", server.base + "/x", base=server.base, limits=LIMITS)


def test_a_keep_alive_connection_is_reused_after_a_request_within_the_limits(stand_in):
    server = stand_in(lambda handler: handler.send_json(200, {"ok": True}))
    session = requests.Session()
    for _ in range(3):
        answer = fetch(session, "GET", server.base + "/x", base=server.base, limits=LIMITS)
        assert (answer.status, answer.content) == (200, b'{"ok": true}')
    assert len(server.ports()) == 1  # one TCP connection for the three requests


def test_a_redirect_outside_the_base_is_refused_naming_where_it_pointed(stand_in):
    def away(handler: Handler) -> None:
        handler.send_response(302)
        handler.send_header("Location", "http://elsewhere.example/R4/x?secret=1")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    server = stand_in(away)
    with pytest.raises(OffBase) as caught:
        fetch(requests.Session(), "GET", server.base + "/x", base=server.base, limits=LIMITS)
    assert caught.value.location == "http://elsewhere.example/R4/x"  # without its query
    assert "outside the base URL" in str(caught.value)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"read_timeout": 0, "deadline": 1, "max_bytes": 1}, ValueError, "read_timeout: expected a positive"),
    ({"read_timeout": 1, "deadline": "1", "max_bytes": 1}, TypeError, "deadline: expected seconds"),
    ({"read_timeout": 1, "deadline": 1, "max_bytes": 1.5}, TypeError, "max_bytes: expected an int"),
    ({"read_timeout": 1, "deadline": 1, "max_bytes": 0}, ValueError, "max_bytes: expected a positive size"),
])
def test_limits_are_checked_naming_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        Limits(**kwargs)
