"""HTTP to a FHIR server: one thin wrapper around requests, and the failure rules.

What a failure means for the study is decided here, once:

- no answer (refused, reset, DNS, TLS handshake, timeout), 408, 429, 5xx:
  `DeliveryRetryable` (Retry-After honoured, capped at ``fhir.max_backoff``);
- 401: the auth drops its cached token and the request is sent once more;
- any other status the caller did not expect: `DeliveryRejected`, carrying
  what was sent (``bundle.json`` for a Bundle, ``imagingstudy.json`` for a PUT of
  one) and the server's answer (``outcome.json``). The reason (logged, first line of
  reason.txt, deliveries.jsonl) names the HTTP status and a neutral summary of the
  OperationOutcome (issue count, severity, codes); its diagnostics go to the details
  only (reason.txt after the first line, DEBUG): servers fill them with what they
  matched on, e.g. HAPI with a match URL quoting the PatientID.

Every request goes through scp.web.fetch, under the limits of its destination: a timeout per
read (``fhir.timeout``), an overall deadline (``fhir.request_deadline``) and a cap on the
answer's size (``fhir.max_response_bytes``), each past its bound a `DeliveryRetryable`
naming it; a redirect is followed only within ``fhir.url``, else it is a configuration error
(logged once per destination at ERROR, the study retried: never dropped).
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from scp.sinks.fhir.auth import Auth, build_auth, tls_verify
from scp.config import FhirConfig
from scp.errors import DeliveryRejected, DeliveryRetryable
from scp.web import Answer, DeadlineExceeded, Limits, OffBase, TooLarge, WebError, fetch

log = logging.getLogger("scp.sinks.fhir.client")

FHIR_JSON = "application/fhir+json"
RETRYABLE_STATUSES = frozenset({408, 429})
MAX_DIAGNOSTICS = 600  # characters of the server's explanation kept in a reason's details
SEVERITIES = ("fatal", "error", "warning", "information")  # worst first (R4 IssueSeverity)
CODE = re.compile(r"[a-z][a-z-]{0,39}")  # the shape of an R4 IssueType / IssueSeverity code


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: Any  # parsed JSON, or None when the server sent no body


@dataclass
class RequestStats:
    """What one delivery cost on the wire (requests to the FHIR server; token requests not counted)."""

    requests: int = 0
    bytes_sent: int = 0


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES or status >= 500


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110 10.2.3).

    None when absent or unreadable; a date in the past gives 0.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT by definition
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - now).total_seconds())


def outcome_diagnostics(body: Any) -> str:
    """A one-line summary of an OperationOutcome (or of whatever the server sent)."""
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        parts = []
        for issue in body.get("issue") or []:
            if not isinstance(issue, dict):
                continue
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
            where = ", ".join(str(x) for x in (issue.get("expression") or issue.get("location") or []))
            parts.append(" ".join(p for p in (f"{issue.get('severity', '')}/{issue.get('code', '')}:", text,
                                              f"at {where}" if where else "") if p))
        summary = "; ".join(parts) or "OperationOutcome without issues"
    elif body is None:
        summary = "no body"
    else:
        summary = "not an OperationOutcome: " + (body if isinstance(body, str) else json.dumps(body))
    summary = " ".join(summary.split())
    return summary if len(summary) <= MAX_DIAGNOSTICS else summary[:MAX_DIAGNOSTICS - 3] + "..."


def outcome_summary(body: Any) -> str:
    """What an answer is, without its text: "OperationOutcome: 2 issue(s), severity error, codes: processing".

    Only values from FHIR's closed code lists are kept (a word of letters and hyphens):
    anything else a server puts there could carry what its diagnostics do.
    """
    if body is None:
        return "no body"
    if not (isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"):
        return "not an OperationOutcome"
    issues = [i for i in body.get("issue") or [] if isinstance(i, dict)]
    severities = _codes(i.get("severity") for i in issues)
    worst = next((s for s in SEVERITIES if s in severities), None)
    codes = _codes(i.get("code") for i in issues)
    return (f"OperationOutcome: {len(issues)} issue(s)" + (f", severity {worst}" if worst else "")
            + (f", codes: {', '.join(codes)}" if codes else ""))


def _codes(values: Iterable[Any]) -> list[str]:
    """The distinct FHIR codes among values, in order; anything not shaped like a code is left out."""
    found: list[str] = []
    for value in values:
        if isinstance(value, str) and CODE.fullmatch(value) and value not in found:
            found.append(value)
    return found


def display_url(url: str) -> str:
    """The URL without any user:password@ part, for messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


class FhirClient:
    """Requests to one FHIR server base URL, with auth, timeouts and the failure rules.

    Thread-safe: each thread gets its own requests.Session (connection reuse
    within a thread); the auth (and its token cache) is shared.
    """

    def __init__(self, fhir: FhirConfig, *, auth: Auth | None = None,
                 session_factory: Callable[[], requests.Session] = requests.Session,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc), name: str = "fhir") -> None:
        if not fhir.url:
            raise ValueError("fhir.url: required for the FHIR client")
        self.base = fhir.url.rstrip("/")
        self.shown_base = display_url(self.base)
        self.name = name  # the destination it serves, for the log lines
        self._timeout = fhir.timeout
        self._limits = Limits(read_timeout=fhir.timeout, deadline=fhir.request_deadline,
                              max_bytes=fhir.max_response_bytes)
        self._off_base_logged = False  # a redirect off fhir.url is logged at ERROR once per destination
        self._max_backoff = fhir.max_backoff
        self._verify = tls_verify(fhir)
        self._session_factory = session_factory
        self._local = threading.local()
        self._now = now
        self.auth = auth if auth is not None else build_auth(fhir, session=session_factory())

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}" if path else self.base

    def request(self, method: str, path: str, *, body: Any = None, params: Mapping[str, str | list[str]] | None = None,
                headers: Mapping[str, str] | None = None, expect: Iterable[int] = (200, 201),
                context: str = "", stats: RequestStats | None = None) -> Reply:
        """Send one request; return the reply when its status is in ``expect``, else raise.

        ``context`` (e.g. ``study 1.2.3``) starts every error message.
        """
        data = None if body is None else json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        response = self._send(method, path, data, params, headers, context, stats)
        if response.status == 401 and self.auth.unauthorized():
            log.info("%s: HTTP 401 from %s; fetching new credentials and trying once more",
                     context or "FHIR", self.shown_base, extra={"destination": self.name})
            response = self._send(method, path, data, params, headers, context, stats)
        reply = Reply(response.status, response.headers, _json_or_text(response.content))
        if response.status in set(expect):
            return reply
        self._raise_for(method, path, data, _document_name(body), response, reply, context)
        raise AssertionError("unreachable")

    def _send(self, method: str, path: str, data: bytes | None, params: Mapping[str, str | list[str]] | None,
              headers: Mapping[str, str] | None, context: str, stats: RequestStats | None) -> Answer:
        sent_headers = {"Accept": FHIR_JSON}
        if data is not None:
            sent_headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
        sent_headers.update(headers or {})
        authorization = self.auth.header()  # may fetch a token (raises Delivery* itself)
        if authorization:
            sent_headers["Authorization"] = authorization
        if stats is not None:
            stats.requests += 1
            stats.bytes_sent += len(data or b"")
        try:
            return fetch(self._session(), method, self.url(path), base=self.base, limits=self._limits, data=data,
                         params=params, headers=sent_headers, verify=self._verify)
        except WebError as exc:
            raise self._broke_rule(exc, context) from None
        except requests.Timeout:
            raise DeliveryRetryable(f"{_prefix(context)}FHIR server {self.shown_base} did not answer {method} "
                                    f"within {self._timeout:g} s") from None
        except requests.RequestException as exc:
            # str(exc) names host and path only; headers (credentials) are never in it.
            raise DeliveryRetryable(f"{_prefix(context)}FHIR server {self.shown_base} unreachable "
                                    f"({type(exc).__name__}: {_short(str(exc))})") from None

    def _broke_rule(self, exc: WebError, context: str) -> DeliveryRetryable:
        """What a server breaking a rule of scp.web means for the study: retried, never dropped."""
        if isinstance(exc, OffBase):
            message = (f"{_prefix(context)}configuration error: the FHIR server's {exc}; set fhir.url of "
                       f"destination {self.name} to the server's real base URL (the study stays in the spool)")
            if not self._off_base_logged:  # once per destination: every retry would say the same
                self._off_base_logged = True
                log.error("destination %s: %s", self.name, message, extra={"destination": self.name})
            return DeliveryRetryable(message)
        if isinstance(exc, TooLarge):
            return DeliveryRetryable(f"{_prefix(context)}FHIR server {self.shown_base}: answer too large "
                                     f"(fhir.max_response_bytes): {exc}")
        if isinstance(exc, DeadlineExceeded):
            return DeliveryRetryable(f"{_prefix(context)}FHIR server {self.shown_base}: "
                                     f"request deadline passed (fhir.request_deadline): {exc}")
        return DeliveryRetryable(f"{_prefix(context)}FHIR server {self.shown_base}: {exc}")

    def _raise_for(self, method: str, path: str, data: bytes | None, sent_name: str, response: Answer,
                   reply: Reply, context: str) -> None:
        status = response.status
        what = f"{_prefix(context)}FHIR server answered HTTP {status} to {method} {display_url(self.url(path))}"
        if is_retryable_status(status):
            delay = parse_retry_after(response.headers.get("Retry-After"), self._now())
            if delay is not None:
                delay = min(delay, self._max_backoff)
            raise DeliveryRetryable(what + (f" (retry after {delay:g} s)" if delay is not None else ""),
                                    retry_after=delay)
        documents = {"outcome.json": response.content}
        if data is not None:
            documents[sent_name] = data
        raise DeliveryRejected(f"{what} ({outcome_summary(reply.body)}; details in outcome.json)",
                               documents=documents,
                               details=f"server diagnostics: {outcome_diagnostics(reply.body)}")

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._session_factory()
        return session

    def __repr__(self) -> str:
        return f"FhirClient({self.shown_base!r}, auth={self.auth!r})"


def _document_name(body: Any) -> str:
    """What the sent body is kept as beside a refused study: bundle.json, imagingstudy.json..."""
    kind = body.get("resourceType") if isinstance(body, dict) else None
    return f"{kind.lower()}.json" if isinstance(kind, str) and kind.isalpha() else "request.json"


def _json_or_text(content: bytes) -> Any:
    if not content:
        return None
    try:
        return json.loads(content)
    except ValueError:  # UnicodeDecodeError included
        return content.decode("utf-8", "replace")


def _prefix(context: str) -> str:
    return f"{context}: " if context else ""


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
