"""Authentication to the FHIR server: none, static bearer, HTTP basic, OAuth2 client credentials.

Each mode is a small object the FHIR client asks for an ``Authorization`` header
before every request, and tells when the server answered 401 (``unauthorized``
returns True when a fresh credential is worth one more try: only a cached
OAuth2 token can go stale). Secrets live only inside these objects: their
repr, log lines and exceptions never contain them.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote_plus, urlencode

import requests

from scp.config import FhirConfig
from scp.errors import DeliveryRejected, DeliveryRetryable
from scp.web import Limits, WebError, fetch

log = logging.getLogger("scp.sinks.fhir.auth")

# A token is renewed this long before the server says it expires, so a request
# never leaves with a token that dies on the way (clock skew, slow networks).
EXPIRY_MARGIN = 30.0


class Auth(Protocol):
    def header(self) -> str | None:
        """The Authorization header value for the next request (None = send none)."""

    def unauthorized(self) -> bool:
        """The server answered 401: drop cached credentials; True = worth one retry."""


class NoAuth:
    def header(self) -> str | None:
        return None

    def unauthorized(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NoAuth()"


class BearerAuth:
    """A static token, sent as ``Authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}"

    def header(self) -> str | None:
        return self._value

    def unauthorized(self) -> bool:
        return False  # the same token again would get the same answer

    def __repr__(self) -> str:
        return "BearerAuth(token=***)"


class BasicAuth:
    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self._value = "Basic " + base64.b64encode(f"{username}:{password}".encode("utf-8")).decode("ascii")

    def header(self) -> str | None:
        return self._value

    def unauthorized(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"BasicAuth(username={self.username!r}, password=***)"


@dataclass(frozen=True)
class Token:
    value: str
    renew_at: float | None  # clock time after which it is fetched again; None = until a 401


class ClientCredentials:
    """OAuth2 client credentials grant (RFC 6749 section 4.4).

    The client authenticates with HTTP Basic (section 2.3.1, which every
    authorization server must accept), id and secret form-encoded first as the
    RFC says. The token is cached until ``expires_in`` minus a margin; a 401
    from the FHIR server drops it so the next request fetches a new one.
    Thread-safe: parallel deliveries share one token.
    """

    def __init__(self, token_url: str, client_id: str, client_secret: str, scope: str | None = None, *,
                 session: requests.Session | None = None, timeout: float = 30.0,
                 verify: bool | str = True, clock: Callable[[], float] = time.monotonic,
                 margin: float = EXPIRY_MARGIN, limits: Limits | None = None) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self._client_auth = "Basic " + base64.b64encode(
            f"{quote_plus(client_id)}:{quote_plus(client_secret)}".encode("utf-8")).decode("ascii")
        self.scope = scope
        self._session = session or requests.Session()
        self._timeout = timeout
        # The token endpoint is not trusted more than the FHIR server: the same rules (scp.web), and
        # a redirect is followed only within token_url. It matters more here: the token is fetched
        # under a lock every delivery to this destination waits on.
        self._limits = limits or Limits(read_timeout=timeout, deadline=4 * timeout, max_bytes=2**20)
        self._verify = verify
        self._clock = clock
        self._margin = margin
        self._token: Token | None = None
        self._lock = threading.Lock()
        self.tokens_fetched = 0

    def header(self) -> str | None:
        with self._lock:
            token = self._token
            if token is None or (token.renew_at is not None and self._clock() >= token.renew_at):
                token = self._token = self._fetch()
            return f"Bearer {token.value}"

    def unauthorized(self) -> bool:
        with self._lock:
            self._token = None
        return True

    def _fetch(self) -> Token:
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        started = self._clock()
        try:
            response = fetch(self._session, "POST", self.token_url, base=self.token_url, limits=self._limits,
                             data=urlencode(form).encode("ascii"), verify=self._verify,
                             headers={"Authorization": self._client_auth, "Accept": "application/json",
                                      "Content-Type": "application/x-www-form-urlencoded"})
        except WebError as exc:
            raise DeliveryRetryable(f"OAuth2 token endpoint {self.token_url}: {exc}"[:500]) from None
        except requests.RequestException as exc:
            raise DeliveryRetryable(f"OAuth2 token endpoint {self.token_url} unreachable: "
                                    f"{type(exc).__name__}: {exc}"[:500]) from None
        self.tokens_fetched += 1
        if response.status in (408, 429) or response.status >= 500:
            raise DeliveryRetryable(f"OAuth2 token endpoint {self.token_url} answered HTTP {response.status}")
        if response.status != 200:
            raise DeliveryRejected(
                f"OAuth2 token endpoint {self.token_url} refused client {self.client_id!r}: HTTP "
                f"{response.status} {_oauth_error(response.content)}; check fhir.client_id/client_secret/scope")
        try:
            body = json.loads(response.content)
            value = body["access_token"]
            if not isinstance(value, str) or not value:
                raise ValueError("access_token is not a non-empty string")
            lifetime = body.get("expires_in")
            lifetime = None if lifetime is None else float(lifetime)
        except (ValueError, KeyError, TypeError) as exc:
            raise DeliveryRejected(f"OAuth2 token endpoint {self.token_url}: unusable token response "
                                   f"({type(exc).__name__})") from None
        log.debug("OAuth2 token for client %r fetched (expires_in=%s)", self.client_id, lifetime)
        return Token(value, None if lifetime is None else started + renewal_delay(lifetime, self._margin))

    def __repr__(self) -> str:
        return (f"ClientCredentials(token_url={self.token_url!r}, client_id={self.client_id!r}, "
                f"client_secret=***, scope={self.scope!r})")


def renewal_delay(expires_in: float, margin: float = EXPIRY_MARGIN) -> float:
    """Seconds a token is used: its lifetime less the margin, but at least half of it
    (a 40 s token is not refetched on every request because of a 30 s margin)."""
    return max(expires_in - margin, expires_in / 2, 0.0)


def _oauth_error(content: bytes) -> str:
    """The RFC 6749 error code (never the whole body, which could echo a secret)."""
    try:
        body = json.loads(content)
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    error = body.get("error")
    return f"({error})" if isinstance(error, str) and error.isascii() and len(error) < 64 else ""


def tls_verify(fhir: FhirConfig) -> bool | str:
    """The value of requests' ``verify``: a CA bundle path, or on/off."""
    if not fhir.verify_tls:
        return False
    return str(fhir.ca_bundle) if fhir.ca_bundle is not None else True


def build_auth(fhir: FhirConfig, *, session: requests.Session | None = None,
               clock: Callable[[], float] = time.monotonic) -> Auth:
    if fhir.auth == "bearer":
        return BearerAuth(fhir.token or "")
    if fhir.auth == "basic":
        return BasicAuth(fhir.username or "", fhir.password or "")
    if fhir.auth == "oauth2":
        return ClientCredentials(fhir.token_url or "", fhir.client_id or "", fhir.client_secret or "", fhir.scope,
                                 session=session, timeout=fhir.timeout, verify=tls_verify(fhir), clock=clock,
                                 limits=Limits(read_timeout=fhir.timeout, deadline=fhir.request_deadline,
                                               max_bytes=min(fhir.max_response_bytes, 2**20)))
    return NoAuth()
