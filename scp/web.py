"""Bounded HTTP: one request to a server the node does not trust, with its three rules.

Every HTTP client of the node (the FHIR sink, a DICOMweb client) sends through `fetch`,
so each gets the same rules:

- an overall deadline (`Limits.deadline`), not only a timeout per read: a server that
  drips one byte every few seconds is cut off when the deadline passes, whether it drips
  the headers or the body (a watchdog shuts the socket down; `DeadlineExceeded`);
- a size cap on the response body (`Limits.max_bytes`): the body is read in pieces and
  reading stops past the cap, so memory stays bounded whatever the server sends
  (`TooLarge`; a Content-Length over the cap is refused before reading);
- redirects followed only within the base URL (same scheme, host, port, and a path under
  the base's path), at most `MAX_REDIRECTS`; anything else is `OffBase`, which is a
  configuration error (the base URL is wrong) rather than a fault of one request.

Errors of the network itself (refused, reset, DNS, TLS, a read timeout) are left to the
caller as requests raises them. API::

    limits = Limits(read_timeout=30, deadline=120, max_bytes=64 * 2**20)
    answer = fetch(session, "GET", url, base=base_url, limits=limits)  # -> Answer
    answer.status, answer.headers, answer.content, answer.url
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from scp.errors import DicomFhirError

log = logging.getLogger("scp.web")

MAX_REDIRECTS = 5
CHUNK = 64 * 1024  # bytes read at a time from a response body
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class WebError(DicomFhirError):
    """A server broke one of the rules; the message names the URL (never credentials) and the rule."""


class DeadlineExceeded(WebError):
    """The whole request (connect, send, headers, body) took longer than the deadline."""


class TooLarge(WebError):
    """The response body is larger than the cap."""


class OffBase(WebError):
    """A redirect to a URL outside the base URL (a configuration error: not followed)."""

    def __init__(self, message: str, *, location: str) -> None:
        super().__init__(message)
        self.location = location


@dataclass(frozen=True)
class Limits:
    """The bounds of one request: seconds per read, seconds overall, bytes of body."""

    read_timeout: float
    deadline: float
    max_bytes: int

    def __post_init__(self) -> None:
        for name in ("read_timeout", "deadline"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected seconds as a number, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name}: expected a positive number of seconds, got {value}")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int):
            raise TypeError(f"max_bytes: expected an int, got {type(self.max_bytes).__name__}")
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes: expected a positive size, got {self.max_bytes}")


@dataclass(frozen=True)
class Answer:
    """A response read whole (within the limits)."""

    status: int
    headers: Mapping[str, str]
    content: bytes
    url: str  # where it came from, after any redirect within the base


def within_base(url: str, base: str) -> bool:
    """True when url is the base URL or under it: same scheme, host and port, path below the base's."""
    target, root = urlsplit(url), urlsplit(base)
    if (target.scheme.lower(), _host_port(target)) != (root.scheme.lower(), _host_port(root)):
        return False
    segments = target.path.lower().replace("%2e", ".").split("/")
    if "." in segments or ".." in segments:  # /R4/../admin is not under /R4, whatever its prefix
        return False
    prefix = root.path.rstrip("/")
    return target.path == prefix or target.path.startswith(prefix + "/") or not prefix


def fetch(session: requests.Session, method: str, url: str, *, base: str, limits: Limits,
          data: bytes | None = None, params: Mapping[str, str] | None = None,
          headers: Mapping[str, str] | None = None, verify: bool | str = True,
          clock: Callable[[], float] = time.monotonic) -> Answer:
    """Send one request under `limits`, following redirects within `base`; the answer read whole.

    DeadlineExceeded, TooLarge, OffBase as the module docstring says; requests' own
    exceptions (ConnectionError, Timeout...) for the network's faults.
    """
    watch = _Watch(limits.deadline, clock)
    guard = _guard(session)
    guard.current.watch = watch
    try:
        for _ in range(MAX_REDIRECTS + 1):
            response = _send(session, method, url, data, params, headers, limits, verify, watch)
            try:
                if response.status_code not in REDIRECTS or "Location" not in response.headers:
                    content = _read(response, url, limits, watch)
                    return Answer(response.status_code, response.headers, content, url)
                location = urljoin(response.url or url, response.headers["Location"])
            finally:
                if response.raw is not None:  # a stand-in session's answer has its content already
                    response.close()
            if not within_base(location, base):
                raise OffBase(f"{_shown(url)} redirected ({response.status_code}) to {_shown(location)}, "
                              f"outside the base URL {_shown(base)}: not followed", location=_shown(location))
            if response.status_code == 303:
                method, data = "GET", None
            url, params = location, None  # the Location carries the query it wants
        raise WebError(f"{_shown(url)}: more than {MAX_REDIRECTS} redirects")
    finally:
        watch.cancel()
        guard.current.watch = None


# --- the watchdog -------------------------------------------------------------------------------

class _Watch:
    """The deadline of one request: when it passes, the socket in use is shut down, so a read
    blocked on a dripping server returns at once (a timeout per read cannot see a drip)."""

    def __init__(self, deadline: float, clock: Callable[[], float]) -> None:
        self.deadline = deadline
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._done = False
        self.fired = False
        self._timer = threading.Timer(deadline, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def expired(self) -> bool:
        return self.fired or self._clock() - self._started >= self.deadline

    def using(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.fired and sock is not None:
                _shut(sock)

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            if self._sock is not None:
                _shut(self._sock)

    def cancel(self) -> None:
        """The request is over: its (keep-alive) connection goes back to the pool, never to be shut."""
        self._timer.cancel()
        with self._lock:
            self._sock = None
            self._done = True


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _Current(threading.local):
    watch: _Watch | None = None


class _Guard:
    def __init__(self) -> None:
        self.current = _Current()


def _watched(connection: type[HTTPConnection], guard: _Guard) -> type[HTTPConnection]:
    """A connection class that tells the thread's watch which socket each request uses (a reused
    keep-alive connection included: the socket is named at every request, not at connect)."""

    class Watched(connection):  # type: ignore[misc, valid-type]
        def request(self, *args: Any, **kwargs: Any) -> None:
            watch = guard.current.watch
            if watch is not None:
                if self.sock is None:
                    self.connect()
                watch.using(self.sock)
            super().request(*args, **kwargs)

    return Watched


class _WatchedAdapter(HTTPAdapter):
    def __init__(self, guard: _Guard) -> None:
        self.guard = guard
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        guard = self.guard

        class Pool(HTTPConnectionPool):
            ConnectionCls = _watched(HTTPConnection, guard)

        class SecurePool(HTTPSConnectionPool):
            ConnectionCls = _watched(HTTPSConnection, guard)

        self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": SecurePool}


def _guard(session: requests.Session) -> _Guard:
    """The session's guard, its adapters installed on first use (a stand-in session without
    mount() still gets the deadline checked between reads)."""
    guard = getattr(session, "_scp_web_guard", None)
    if guard is None:
        guard = _Guard()
        if isinstance(session, requests.Session):
            for prefix in ("http://", "https://"):
                session.mount(prefix, _WatchedAdapter(guard))
        try:
            session._scp_web_guard = guard  # type: ignore[attr-defined]
        except AttributeError:
            pass
    return guard


# --- one exchange ------------------------------------------------------------------------------

def _send(session: requests.Session, method: str, url: str, data: bytes | None, params: Mapping[str, str] | None,
          headers: Mapping[str, str] | None, limits: Limits, verify: bool | str, watch: _Watch) -> requests.Response:
    try:
        return session.request(method, url, data=data, params=params, headers=dict(headers or {}),
                               timeout=(min(limits.read_timeout, limits.deadline), limits.read_timeout),
                               verify=verify, allow_redirects=False, stream=True)
    except requests.RequestException:
        if watch.expired():
            raise _late(method, url, limits) from None
        raise


def _read(response: requests.Response, url: str, limits: Limits, watch: _Watch) -> bytes:
    announced = response.headers.get("Content-Length", "")
    if announced.isdigit() and int(announced) > limits.max_bytes:
        raise TooLarge(f"{_shown(url)} announced a {int(announced)}-byte answer, over the cap of "
                       f"{limits.max_bytes} bytes: not read")
    body = bytearray()
    if response.raw is None:  # a stand-in session's answer, its content already there
        pieces: Any = [response.content or b""]
    else:
        pieces = response.iter_content(CHUNK)
    try:
        for piece in pieces:
            body += piece
            if len(body) > limits.max_bytes:
                raise TooLarge(f"{_shown(url)} sent more than the cap of {limits.max_bytes} bytes: "
                               f"reading stopped")
            if watch.expired():
                raise _late(response.request.method or "", url, limits)
    except requests.RequestException:
        if watch.expired():
            raise _late(response.request.method or "", url, limits) from None
        raise
    if watch.expired():
        raise _late(response.request.method or "", url, limits)
    return bytes(body)


def _late(method: str, url: str, limits: Limits) -> DeadlineExceeded:
    return DeadlineExceeded(f"{method} {_shown(url)} did not complete within the deadline of "
                            f"{limits.deadline:g} s (a slow or dripping server)")


def _host_port(parts: Any) -> tuple[str, int | None]:
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    try:
        port = parts.port
    except ValueError:
        port = None
    return (parts.hostname or "").lower(), port if port is not None else default


def _shown(url: str) -> str:
    """The URL without any user:password@ part and without its query (which may carry identifiers)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{netloc}{parts.path}"
