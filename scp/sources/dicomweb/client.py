"""HTTP to the DICOMweb server: every request goes through `DicomWebClient.get_json`.

Bounded like the FHIR client: a timeout per request (connect and each read), a cap on
the reply's size (read in chunks, refused beyond sync.max_response_bytes), redirects
never followed (a QIDO-RS or WADO-RS server has no reason to send one, and following it
would carry the credentials elsewhere), a rate limit shared by every thread, and a
bounded number of attempts with capped exponential backoff when the server is down or
answers 5xx / 429. `_fetch` is the one function that touches the network, so it can be
switched to the project's shared bounded-HTTP helper.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import requests

from scp.config import FhirConfig, SyncConfig
from scp.errors import DeliveryRejected, DeliveryRetryable
from scp.sinks.fhir.auth import Auth, build_auth
from scp.sinks.fhir.client import display_url, is_retryable_status
from scp.web import DeadlineExceeded, Limits, OffBase, TooLarge, WebError, fetch

log = logging.getLogger("scp.sources.dicomweb.client")

DICOM_JSON = "application/dicom+json"


class SourceUnavailable(DeliveryRetryable):
    """The DICOMweb server did not answer usefully after every attempt (down, 5xx, 429, timeout)."""


class SourceRefused(DeliveryRejected):
    """The DICOMweb server refused a request (4xx other than 404/429), or sent an unusable reply."""


@dataclass
class SourceStats:
    requests: int = 0
    bytes_received: int = 0
    retries: int = 0


class RateLimiter:
    """At most `rate` requests per second over every thread (0: unlimited); clock and sleep passed in."""

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


def auth_settings(sync: SyncConfig) -> FhirConfig:
    """The [sync] credentials in the form scp.sinks.fhir.auth takes (the same auth code as the FHIR client)."""
    return FhirConfig(url=sync.dicomweb_url, auth=sync.auth, token=sync.token, username=sync.username,
                      password=sync.password, token_url=sync.token_url, client_id=sync.client_id,
                      client_secret=sync.client_secret, scope=sync.scope, verify_tls=sync.verify_tls,
                      ca_bundle=sync.ca_bundle, timeout=sync.timeout)


class DicomWebClient:
    """GET requests to one DICOMweb (or Orthanc REST) root; thread-safe (a session per thread)."""

    def __init__(self, base: str, sync: SyncConfig, *, auth: Auth | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 session_factory: Callable[[], requests.Session] = requests.Session) -> None:
        self.base = base.rstrip("/")
        self.shown_base = display_url(self.base)
        self.sync = sync
        settings = auth_settings(sync)
        self.auth = auth if auth is not None else build_auth(settings, session=session_factory())
        self._verify = False if not sync.verify_tls else (str(sync.ca_bundle) if sync.ca_bundle else True)
        self._sleep = sleep
        self.limiter = RateLimiter(sync.rate_limit, clock=clock, sleep=sleep)
        self._session_factory = session_factory
        self._local = threading.local()
        self.stats = SourceStats()
        self._stats_lock = threading.Lock()

    def get_json(self, path: str, params: Mapping[str, str] | None = None, *, context: str = "",
                 missing_ok: bool = False) -> Any:
        """The reply's JSON; None for 204 (QIDO-RS: nothing matched) or, with missing_ok, 404.

        Retries a retryable failure sync.retries times in all, then raises SourceUnavailable;
        raises SourceRefused for a refusal or a reply that is not JSON or too large.
        """
        url = f"{self.base}/{path.lstrip('/')}"
        what = f"{context + ': ' if context else ''}GET {display_url(url)}"
        delay = 1.0
        for attempt in range(1, self.sync.retries + 1):
            try:
                status, body = self._fetch(url, params)
            except SourceUnavailable as exc:
                problem = str(exc)
            else:
                if status == 204 or (missing_ok and status == 404):
                    return None
                if status == 401 and self.auth.unauthorized() and attempt < self.sync.retries:
                    continue
                if 200 <= status < 300:
                    try:
                        return json.loads(body) if body.strip() else None
                    except ValueError as exc:
                        raise SourceRefused(f"{what}: the reply is not JSON ({exc})") from None
                if not is_retryable_status(status):
                    raise SourceRefused(f"{what}: HTTP {status} ({body[:200].decode('utf-8', 'replace')})")
                problem = f"HTTP {status}"
            if attempt < self.sync.retries:
                with self._stats_lock:
                    self.stats.retries += 1
                log.warning("%s: %s; trying again in %.0f s (attempt %d of %d)", what, problem, delay, attempt,
                            self.sync.retries)
                self._sleep(delay)
                delay = min(delay * 2, self.sync.max_backoff)
        raise SourceUnavailable(f"{what}: {problem} ({self.sync.retries} attempts)")

    def _fetch(self, url: str, params: Mapping[str, str] | None) -> tuple[int, bytes]:
        """One GET: (status, body). The only network call; SourceUnavailable for no answer.

        Through scp.web, with the FHIR client's rules: sync.timeout bounds the whole request
        (a server dripping bytes is cut off), the body is capped at sync.max_response_bytes,
        and a redirect is followed only within the DICOMweb root."""
        self.limiter.wait()
        headers = {"Accept": f"{DICOM_JSON}, application/json"}
        authorization = self.auth.header()
        if authorization:
            headers["Authorization"] = authorization
        limits = Limits(read_timeout=self.sync.timeout, deadline=self.sync.timeout,
                        max_bytes=self.sync.max_response_bytes)
        try:
            answer = fetch(self._session(), "GET", url, base=self.base, limits=limits, params=params,
                           headers=headers, verify=self._verify)
        except TooLarge as exc:
            raise SourceRefused(f"GET {display_url(url)}: reply larger than sync.max_response_bytes "
                                f"({limits.max_bytes}): {exc}") from None
        except OffBase as exc:
            raise SourceRefused(f"configuration error: the DICOMweb server's {exc}; set the URL to the "
                                f"server's real root") from None
        except DeadlineExceeded:
            raise SourceUnavailable(f"no whole answer within {self.sync.timeout:g} s (sync.timeout)") from None
        except WebError as exc:
            raise SourceRefused(f"GET {display_url(url)}: {exc}") from None
        except requests.Timeout:
            raise SourceUnavailable(f"no answer within {self.sync.timeout:g} s") from None
        except requests.RequestException as exc:
            raise SourceUnavailable(f"unreachable ({type(exc).__name__})") from None
        with self._stats_lock:
            self.stats.requests += 1
            self.stats.bytes_received += len(answer.content)
        return answer.status, answer.content

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._session_factory()
        return session
