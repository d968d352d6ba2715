"""Deliver a completed study to a FHIR server: create it once, merge every later part.

The common cases cost two requests, whatever the study's size:

- new study: ``GET ImagingStudy?identifier=…`` finds nothing, then one
  transaction Bundle (mapping.render "bundle": Patient and Endpoint as
  conditional creates, ImagingStudy with ifNoneExist);
- a further part or a resend: the search finds it, ``mapping.merge_imaging_study``
  merges (on the JSON dicts: no models), and a ``PUT`` with ``If-Match`` stores the
  result, or nothing is sent when the merge changed nothing (a resend).

What is sent is validated against R4 first (``mapping.validate_resources``; the merged
ImagingStudy); a study that does not validate is DeliveryRejected before any request
that would carry it.

Races with other nodes are settled by the server: a PUT whose version went
stale (412) is re-read, re-merged and sent again; a transaction whose
ImagingStudy ifNoneExist matched a study created meanwhile (entry status 200,
not 201) carried our part nowhere, so the part is merged into that study.

R5 ImagingSelections (a KOS, SEG or RTSTRUCT in the study) travel in the creating
transaction; a merged part sends its own as one more transaction of conditional creates
(by their identifier, so a resend creates nothing) referring to the server's study and patient.

A Patient on the server is never overwritten (conditional create only), and a
part is never merged into a study whose patient identifier differs from ours
(DeliveryRejected: mixing two patients' images is the worst outcome).

The server's FHIR release is read once from ``GET [base]/metadata``
(CapabilityStatement.fhirVersion: 4.0.x is R4, 5.0.x is R5) before the node listens
(``check_server_version``): a mismatch with fhir.version is a ConfigurationError. A server
that cannot be reached then is not fatal (the node keeps receiving): it is checked again
before the first delivery, and until it answers a delivery waits (DeliveryRetryable).

The server's answers are checked before they are used (a server may ignore a search
parameter and answer with everything it has): every ImagingStudy a search or a read
returns must carry our study's ``urn:dicom:uid`` identifier, and a Patient (or Endpoint) a
conditional create matched must carry the identifier it was matched on; otherwise the delivery is
DeliveryRejected as a server fault, with the reason and the server's resource kept
(`check_study_uid`, `check_matched`; an Endpoint's match likewise).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mapping import StudyResources, merge_imaging_study, render, validate_resources
from mapping.endpoint import address_identifier
from mapping.errors import ConfigurationError, MappingError, PatientMismatchError
from mapping.fhirjson import (canonical, identifier_pairs, model_json, primary_identifier, same_identifier, study_search,
                              validated)
from mapping.options import MappingOptions
from mapping.r5 import study_version
from mapping.selection import validate_selection
from mapping.shapes import check_study_structure, selection_bundle
from scp.config import FhirConfig
from scp.errors import DeliveryRejected, DeliveryRetryable
from scp.sinks.fhir.client import FhirClient, Reply, RequestStats

log = logging.getLogger("scp.sinks.fhir.sink")

MAX_CONFLICTS = 10  # 412s in a row before the delivery is retried later instead
MATCHED_KINDS = ("Patient", "Endpoint")  # conditional creates whose match is checked from the transaction's answer


@dataclass(frozen=True)
class ServerStudy:
    """The server's ImagingStudy for our study UID, as found."""

    id: str
    version: str | None
    resource: dict[str, Any]  # as the server sent it, meta included
    patients: tuple[dict[str, Any], ...] = ()  # the subject, when the server included it
    endpoints: tuple[dict[str, Any], ...] = ()  # the study's Endpoints, when the server included them


@dataclass(frozen=True)
class Outcome:
    action: str  # created | updated | unchanged
    reference: str  # ImagingStudy/<id>


class FhirSink:
    """The node's FHIR sink (scp.sinks.Sink): ``deliver(resources) -> str``."""

    def __init__(self, fhir: FhirConfig, options: MappingOptions | None = None, *, name: str = "fhir",
                 client: FhirClient | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name  # the destination's name: "fhir" for [fhir], NAME for [fhir.destinations.NAME]
        self.fhir = fhir  # its settings (the readiness probe builds its own client from them)
        self.options = options or MappingOptions()
        self.client = client or FhirClient(fhir, name=name)
        self._clock = clock
        # True after a start-up check that could not reach the server: checked before delivering.
        self._version_unknown = False

    def check_server_version(self) -> str | None:
        """The server's release from ``GET [base]/metadata`` ("R4", "R5", another fhirVersion as
        given, or None when it does not say). ConfigurationError naming both versions when it is
        not fhir.version; a server that cannot be reached is logged and checked again before
        the first delivery (the node keeps serving)."""
        try:
            found = server_version(self.client)
        except DeliveryRejected as exc:  # it answered, with a 4xx: it will not say; not asked again
            log.debug("GET metadata refused: %s", exc)
            found = None
        except DeliveryRetryable as exc:
            self._version_unknown = True
            log.warning("FHIR server %s: its FHIR version cannot be read now (%s); checked again before "
                        "the first delivery", self.client.shown_base, _first_line(exc),
                        extra={"destination": self.name})
            return None
        self._version_unknown = False
        if found is None:
            log.warning("FHIR server %s: GET metadata gave no CapabilityStatement.fhirVersion; assuming it "
                        "is FHIR %s (fhir.version)", self.client.shown_base, self.fhir.version,
                        extra={"destination": self.name})
        elif found != self.fhir.version:
            raise ConfigurationError(version_mismatch(self.name, self.client.shown_base, found, self.fhir.version))
        return found

    def deliver(self, resources: StudyResources) -> str:
        uid = resources.study_uid
        if self._version_unknown:
            try:
                self.check_server_version()
            except ConfigurationError as exc:  # found only now: nothing is sent until the setting is fixed
                raise DeliveryRetryable(f"study {uid}: {exc}") from None
            if self._version_unknown:
                raise DeliveryRetryable(f"study {uid}: FHIR server {self.client.shown_base}: its FHIR version "
                                        f"is not known yet (GET metadata failed); not sent")
        stats = RequestStats()
        started = self._clock()
        # Rendered only when needed: a resend or a plain merge never sends the Bundle.
        bundle = functools.cache(lambda: render(resources, "bundle"))
        try:
            outcome = self._deliver(uid, resources, bundle, stats)
        except DeliveryRejected as exc:
            exc.documents.setdefault("bundle.json", _json_bytes(bundle()))
            raise
        elapsed = self._clock() - started
        log.info("study %s: %s %s at %s (%d requests, %d bytes sent, %.2f s)", uid, outcome.action,
                 outcome.reference, self.client.shown_base, stats.requests, stats.bytes_sent, elapsed,
                 extra={"study_uid": uid, "destination": self.name})
        return f"{outcome.reference} {outcome.action} at {self.client.shown_base} ({stats.requests} requests)"

    def _deliver(self, uid: str, resources: StudyResources, bundle: Callable[[], dict[str, Any]],
                 stats: RequestStats) -> Outcome:
        context = f"study {uid}"
        existing = self._find(uid, context, stats)
        if existing is None:
            _check_valid(lambda: validate_resources(resources))
            # The answer carries the resources stored or matched: a Patient the conditional create
            # matched is checked from it, with no request more (check_matched).
            reply = self.client.request("POST", "", body=bundle(), headers={"Prefer": "return=representation"},
                                        expect=(200, 201), context=context, stats=stats)  # 201: lenient servers
            self._check_conditional_matches(bundle(), reply.body, context, stats)
            status, reference = _imaging_study_result(bundle(), reply.body, context)
            if status == 201:
                return Outcome("created", reference)
            # ifNoneExist matched a study another sender created after our search:
            # the server kept its version and dropped ours, so merge our part in.
            log.info("%s: created concurrently by another sender; merging this part into it", context,
                     extra={"study_uid": uid, "destination": self.name})
            existing = self._find(uid, context, stats)
            if existing is None:
                raise DeliveryRetryable(f"{context}: the server matched an ImagingStudy it cannot find again")
        return self._merge_into(existing, resources, bundle, context, stats)

    def _find(self, uid: str, context: str, stats: RequestStats) -> ServerStudy | None:
        reply = self.client.request(
            "GET", "ImagingStudy",
            # The Endpoints too: a reference the server holds without our identifier (one written
            # before references carried it) is then still known by its Endpoint's address.
            params={"identifier": study_search(uid), "_include": ["ImagingStudy:subject", "ImagingStudy:endpoint"]},
            expect=(200,), context=context, stats=stats)
        return _search_result(reply.body, context, uid)

    def _reread(self, study: ServerStudy, uid: str, context: str, stats: RequestStats) -> ServerStudy:
        reply = self.client.request("GET", f"ImagingStudy/{study.id}", expect=(200,), context=context, stats=stats)
        resource = _resource_of(reply, "ImagingStudy", context)
        check_study_uid(resource, uid, context)
        return ServerStudy(study.id, _version(resource, reply), resource, study.patients, study.endpoints)

    def _check_conditional_matches(self, sent: dict[str, Any], body: Any, context: str, stats: RequestStats) -> None:
        """Each Patient or Endpoint a conditional create of `sent` matched (entry status 200) carries the
        identifier it was matched on (read back when the answer is minimal); else DeliveryRejected (a
        server fault). The ImagingStudy's match is searched again and checked by `_find`."""
        entries = _check_transaction(body, context)
        for index, entry in enumerate(sent.get("entry") or []):
            request, resource = entry.get("request") or {}, entry.get("resource") or {}
            kind = resource.get("resourceType")
            if kind not in MATCHED_KINDS or not request.get("ifNoneExist") or index >= len(entries):
                continue
            answer = entries[index] if isinstance(entries[index], dict) else {}
            response = answer.get("response") or {}
            if _status_code(response.get("status")) != 200:
                continue  # created: ours
            matched = answer.get("resource")
            reference = _reference_in(response.get("location") or "", kind) or (
                f"{kind}/{matched['id']}" if isinstance(matched, dict) and matched.get("id") else None)
            if not (isinstance(matched, dict) and matched.get("resourceType") == kind):
                if reference is None:
                    raise DeliveryRetryable(f"{context}: the transaction response names no {kind} it matched")
                matched = _resource_of(self.client.request("GET", reference, expect=(200,), context=context,
                                                           stats=stats), kind, context)
            check_matched(matched, primary_identifier(resource.get("identifier")), reference, context)

    def _merge_into(self, study: ServerStudy, resources: StudyResources, bundle: Callable[[], dict[str, Any]],
                    context: str, stats: RequestStats) -> Outcome:
        outcome = self._merge_study(study, resources, bundle, context, stats)
        self._send_selections(study, resources, context, stats)
        return outcome

    def _send_selections(self, study: ServerStudy, resources: StudyResources, context: str,
                         stats: RequestStats) -> None:
        """R5: the study's ImagingSelections, conditional creates referring to the server's
        ImagingStudy and Patient (a merged part may bring a new KOS, SEG or RTSTRUCT; a resend
        creates nothing, at the cost of this one request)."""
        subject = (study.resource.get("subject") or {}).get("reference")
        request = selection_bundle(resources, subject if isinstance(subject, str) and subject.startswith(
            "Patient/") else None, f"ImagingStudy/{study.id}")
        if request is None:
            return
        _check_valid(lambda: [validate_selection(e["resource"], context) for e in request["entry"]],
                     {"selections.json": _json_bytes(request)})
        reply = self.client.request("POST", "", body=request, headers={"Prefer": "return=minimal"},
                                    expect=(200,), context=context, stats=stats)
        _check_transaction(reply.body, context)

    def _merge_study(self, study: ServerStudy, resources: StudyResources, bundle: Callable[[], dict[str, Any]],
                     context: str, stats: RequestStats) -> Outcome:
        reference = f"ImagingStudy/{study.id}"
        for _ in range(MAX_CONFLICTS):
            check_same_patient(study, resources, context)
            body = merged_body(study, resources.imaging_study, context)
            if body is None:
                return Outcome("unchanged", reference)
            request = update_request(body, study, bundle()) if _local_references(body) else None
            _check_valid(lambda: _sendable(request or {"entry": [{"resource": body}]}, context,
                                           resources.fhir_version),
                         {"imagingstudy.json": _json_bytes(body)})
            if request is None:
                reply = self.client.request("PUT", reference, body=body, headers=_if_match(study.version),
                                            expect=(200, 201, 412), context=context, stats=stats)
            else:
                reply = self.client.request("POST", "", body=request, headers={"Prefer": "return=minimal"},
                                            expect=(200, 412), context=context, stats=stats)
                if reply.status == 200:
                    _check_transaction(reply.body, context)
                    self._check_conditional_matches(request, reply.body, context, stats)
            if reply.status != 412:
                return Outcome("updated", reference)
            log.info("%s: %s changed on the server meanwhile (412); merging again", context, reference,
                     extra={"destination": self.name})
            study = self._reread(study, resources.study_uid, context, stats)
        raise DeliveryRetryable(f"{context}: {reference} kept changing on the server "
                                f"({MAX_CONFLICTS} version conflicts in a row)")


# --- pure helpers -----------------------------------------------------------------------------

# CapabilityStatement.fhirVersion (a FHIR version code, e.g. 4.0.1, 5.0.0) -> release
RELEASES = {"4.0": "R4", "5.0": "R5"}


def fhir_release(fhir_version: Any) -> str | None:
    """"R4" for 4.0.x, "R5" for 5.0.x, another version as given (e.g. 4.3.0, R4B), None for no text."""
    if not isinstance(fhir_version, str) or not fhir_version.strip():
        return None
    text = fhir_version.strip()
    return RELEASES.get(".".join(text.split(".")[:2]), text)


def server_version(client: FhirClient) -> str | None:
    """The release of the server's CapabilityStatement (``GET [base]/metadata``); None when the
    answer is no CapabilityStatement with a fhirVersion. Raises what client.request raises."""
    reply = client.request("GET", "metadata", expect=(200,), context="FHIR version check")
    body = reply.body
    if not isinstance(body, dict) or body.get("resourceType") != "CapabilityStatement":
        return None
    return fhir_release(body.get("fhirVersion"))


def version_mismatch(name: str, shown_base: str, found: str, configured: str) -> str:
    destination = "fhir.version" if name == "fhir" else f"fhir.version (destination {name})"
    return (f"FHIR server {shown_base} speaks FHIR {found} (GET metadata: CapabilityStatement.fhirVersion), but "
            f"{destination} is {configured}: set fhir.version = \"{found}\" (--fhir-version {found}) or use an "
            f"{configured} server")

def merged_body(study: ServerStudy, ours: dict[str, Any], context: str) -> dict[str, Any] | None:
    """The server's ImagingStudy with our part merged in, as it is to be sent; None when it says
    nothing the server's does not (meta, which the server owns, ignored).

    The common case is decided on the server's JSON as it came (when it has the structure a
    merge needs). Otherwise the server's resource is validated once, on purpose: an invalid
    one is DeliveryRejected (its document kept) before anything is merged into it, and the
    model writes the server's values in the form ours are in, so a server that writes the
    same values in another format (another date precision, a ``+00:00`` for ``Z``) still
    counts as unchanged. The body is then merged into that form, the one the server will
    read back.
    """
    server = {k: v for k, v in study.resource.items() if k != "meta"} | {"id": study.id}
    if _mergeable(server, context):
        body = _merged(server, ours, study, context)
        if as_compared(body) == as_compared(server):
            return None
    current = model_json(_as_model(study.resource, context, study_version(ours) or "R4")) | {"id": study.id}
    body = _merged(current, ours, study, context)
    return None if as_compared(body) == as_compared(current) else body


def _mergeable(resource: dict[str, Any], context: str) -> bool:
    try:
        check_study_structure(resource, f"{context}: the server's ImagingStudy")
    except MappingError:
        return False  # the model decides: DeliveryRejected, or values it can write in our form
    return True


def _merged(server: dict[str, Any], ours: dict[str, Any], study: ServerStudy, context: str) -> dict[str, Any]:
    try:
        merged = merge_imaging_study(server, ours)
    except PatientMismatchError as exc:
        raise _mismatch(context, str(exc), study) from None
    return keep_server_references(merged, study.resource, study.endpoints)


def as_compared(resource: dict[str, Any]) -> str:
    """The resource as compared for "unchanged": meta (version, timestamps) ignored."""
    return canonical({k: v for k, v in resource.items() if k != "meta"})


def _sendable(request: dict[str, Any], context: str, fhir_version: str = "R4") -> None:
    """MappingError naming the resource and elements when one in the request is not valid in its release."""
    for entry in request.get("entry") or []:
        validated(entry["resource"], context, fhir_version)


def _check_valid(check: Callable[[], None], documents: dict[str, bytes] | None = None) -> None:
    """The edge: nothing goes out that does not validate (a retry would not fix it)."""
    try:
        check()
    except MappingError as exc:
        raise DeliveryRejected(f"MappingError: {exc}; not sent", documents=documents or {}) from None


def _json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")


def _as_model(resource: dict[str, Any], context: str, fhir_version: str = "R4") -> Any:
    # Servers add their own meta fields (Medplum: author, project, compartment) that
    # R4's Meta does not know; meta is server-owned and never sent back anyway.
    try:
        return validated({k: v for k, v in resource.items() if k != "meta"}, context, fhir_version)
    except MappingError as exc:
        raise DeliveryRejected(f"{context}: the server's ImagingStudy/{resource.get('id')} is not a valid "
                               f"{fhir_version} "
                               f"ImagingStudy, so this part cannot be merged into it: {_first_line(exc)}",
                               documents={"server-imagingstudy.json": _json_bytes(resource)}) from None


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:400]


def _version(resource: dict[str, Any], reply: Reply | None = None) -> str | None:
    version = (resource.get("meta") or {}).get("versionId")
    if version is None and reply is not None:
        etag = reply.headers.get("ETag") or ""
        version = etag.removeprefix("W/").strip('"') or None
    return version


def _if_match(version: str | None) -> dict[str, str]:
    return {"If-Match": f'W/"{version}"'} if version else {}


def _resource_of(reply: Reply, resource_type: str, context: str) -> dict[str, Any]:
    body = reply.body
    if not isinstance(body, dict) or body.get("resourceType") != resource_type:
        raise DeliveryRetryable(f"{context}: expected a {resource_type} from the server, got "
                                f"{type(body).__name__ if not isinstance(body, dict) else body.get('resourceType')}")
    return body


def _search_result(body: Any, context: str, uid: str | None = None) -> ServerStudy | None:
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise DeliveryRetryable(f"{context}: the ImagingStudy search did not return a Bundle")
    matches, included, endpoints = [], [], []
    for entry in body.get("entry") or []:
        resource = entry.get("resource") or {}
        mode = (entry.get("search") or {}).get("mode", "match")
        if resource.get("resourceType") == "ImagingStudy" and mode == "match":
            matches.append(resource)
        elif resource.get("resourceType") == "Patient":
            included.append(resource)
        elif resource.get("resourceType") == "Endpoint":
            endpoints.append(resource)
    if not matches:
        return None
    if uid is not None:  # before anything else: a server ignoring the search answers with unrelated studies
        for match in matches:
            check_study_uid(match, uid, context)
    if len(matches) > 1:
        ids = ", ".join(f"ImagingStudy/{r.get('id')}" for r in matches)
        raise DeliveryRejected(f"{context}: the server holds {len(matches)} ImagingStudy resources with this "
                               f"study UID ({ids}); merge or delete the duplicates, then retry")
    study = matches[0]
    return ServerStudy(str(study.get("id")), _version(study), study, tuple(included), tuple(endpoints))


def check_study_uid(resource: dict[str, Any], uid: str, context: str) -> None:
    """DeliveryRejected (a server fault) when an ImagingStudy the server returned for our study does not
    carry our study's UID: the server ignored the search parameter; nothing is merged into it."""
    system, _, value = study_search(uid).partition("|")  # what the search asked for
    if (system, value) in identifier_pairs(resource.get("identifier")):
        return
    raise DeliveryRejected(
        f"{context}: FHIR server fault: asked for the ImagingStudy with identifier {study_search(uid)}, it returned ImagingStudy/{resource.get('id')}, which does not carry this "
        f"study's UID (the server ignored the search parameter); not merged into it, fix the server, then retry",
        documents={"server-imagingstudy.json": _json_bytes(resource)})


def check_matched(resource: dict[str, Any], identifier: tuple[str | None, str] | None,
                  reference: str | None, context: str) -> None:
    """DeliveryRejected (a server fault) when the Patient or Endpoint a conditional create matched does
    not carry the identifier it was matched on. The reason names no identifier value (a patient ID)."""
    if identifier is None or identifier in identifier_pairs(resource.get("identifier")):
        return
    kind = resource.get("resourceType")
    raise DeliveryRejected(
        f"{context}: FHIR server fault: the conditional create of the study's {kind} (ifNoneExist on its "
        f"identifier, system {identifier[0]}) matched {reference or 'another ' + str(kind)}, which does not "
        f"carry that identifier (the server ignored the search parameter); the study's resources on the "
        f"server may refer to the wrong {str(kind).lower()}: check them, fix the server, then retry",
        documents={f"server-{str(kind).lower()}.json": _json_bytes(resource)})


def _reference_in(location: str, resource_type: str) -> str | None:
    """``Type/id`` from a Location such as ``https://x/Patient/7/_history/1``; None without one."""
    parts = location.split("/")
    if resource_type in parts and parts.index(resource_type) + 1 < len(parts):
        return f"{resource_type}/{parts[parts.index(resource_type) + 1]}"
    return None


def _imaging_study_index(bundle: dict[str, Any]) -> int:
    for i, entry in enumerate(bundle.get("entry") or []):
        if (entry.get("resource") or {}).get("resourceType") == "ImagingStudy":
            return i
    raise ValueError("the transaction Bundle has no ImagingStudy entry")


def _status_code(text: Any) -> int | None:
    try:
        return int(str(text).split()[0])
    except (ValueError, IndexError):
        return None


def _check_transaction(body: Any, context: str) -> list[dict[str, Any]]:
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise DeliveryRetryable(f"{context}: the transaction response is not a Bundle")
    return body.get("entry") or []


def _imaging_study_result(sent: dict[str, Any], body: Any, context: str) -> tuple[int, str]:
    """(201 created | 200 matched, ImagingStudy/<id>) from a transaction-response.

    Its entries answer the request's entries in the same order (FHIR R4 3.1.0.11.5).
    """
    entries = _check_transaction(body, context)
    index = _imaging_study_index(sent)
    if index >= len(entries):
        raise DeliveryRetryable(f"{context}: the transaction response has {len(entries)} entries, "
                                f"fewer than the {index + 1} sent")
    response = entries[index].get("response") or {}
    status = _status_code(response.get("status"))
    location = response.get("location") or ""
    resource = entries[index].get("resource") or {}
    parts = location.split("/")
    if "ImagingStudy" in parts and parts.index("ImagingStudy") + 1 < len(parts):
        reference = "ImagingStudy/" + parts[parts.index("ImagingStudy") + 1]
    elif resource.get("id"):
        reference = f"ImagingStudy/{resource['id']}"
    else:
        reference = "ImagingStudy"
    if status not in (200, 201):
        raise DeliveryRetryable(f"{context}: unexpected ImagingStudy status {response.get('status')!r} "
                                f"in the transaction response")
    return status, reference


def _ours(resources: StudyResources) -> set[tuple[str | None, str]]:
    """The Patient's primary identifier (the first): what it is matched on, as in ifNoneExist."""
    primary = primary_identifier((resources.patient or {}).get("identifier"))
    return set() if primary is None else {primary}


def _subject_identifiers(study: ServerStudy) -> set[tuple[str | None, str]]:
    """What the server says about the study's patient: the subject's identifier, else the included Patient's."""
    subject = study.resource.get("subject") or {}
    pairs = identifier_pairs([subject.get("identifier")])
    if pairs:
        return pairs
    reference = subject.get("reference") or ""
    if reference.startswith("#"):
        for contained in study.resource.get("contained") or []:
            if contained.get("resourceType") == "Patient" and contained.get("id") == reference[1:]:
                return identifier_pairs(contained.get("identifier"))
        return set()
    for patient in study.patients:
        if reference.endswith(f"Patient/{patient.get('id')}"):
            return identifier_pairs(patient.get("identifier"))
    return set()


def check_same_patient(study: ServerStudy, resources: StudyResources, context: str) -> None:
    """DeliveryRejected when both sides identify the patient and no identifier agrees."""
    ours, theirs = _ours(resources), _subject_identifiers(study)
    if ours and theirs and not same_identifier(ours, theirs):
        raise _mismatch(context, "the server's ImagingStudy refers to a patient with a different identifier "
                                 "than this part's PatientID", study)


def _mismatch(context: str, detail: str, study: ServerStudy) -> DeliveryRejected:
    return DeliveryRejected(
        f"{context}: PatientMismatchError: {detail} (ImagingStudy/{study.id}); not merged, "
        f"fix the PatientID (or the server's record), then retry",
        documents={"server-imagingstudy.json": _json_bytes(study.resource)})


def _is_local(reference: str | None) -> bool:
    """A reference that only means something inside our own Bundle."""
    return bool(reference) and reference.startswith("urn:uuid:")


def keep_server_references(body: dict[str, Any], server: dict[str, Any],
                           endpoints: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """The merged ImagingStudy pointing where the server's version points.

    Our part refers to its Patient and Endpoints by Bundle-local urn:uuid: ids.
    The server's subject stays (a study never changes patient). Endpoints are a
    union: a local endpoint reference whose identifier (the Endpoint's address)
    the server's references carry, or whose address is that of an Endpoint the
    server's study refers to (``endpoints``: the server's included Endpoints), is
    the server's reference (on the study and every series); a local one the
    server has no reference for is created in the update transaction. A local
    reference without identifier (written before references carried one) gives
    way to the server's endpoints, if it has any.
    """
    body = dict(body)
    server_subject = server.get("subject") or {}
    if server_subject.get("reference") and _is_local((body.get("subject") or {}).get("reference")):
        subject = dict(body.get("subject") or {})
        subject["reference"] = server_subject["reference"]
        body["subject"] = subject
    server_refs = [e for e in server.get("endpoint") or [] if not _is_local(e.get("reference"))]
    for series in server.get("series") or []:
        server_refs += [e for e in series.get("endpoint") or [] if not _is_local(e.get("reference"))]
    by_identifier = {canonical(e["identifier"]): e for e in reversed(server_refs) if e.get("identifier")}
    for endpoint in endpoints:
        reference = f"Endpoint/{endpoint.get('id')}"
        held = [e for e in server_refs if e.get("reference") == reference
                or str(e.get("reference")).endswith("/" + reference)]
        if isinstance(endpoint.get("address"), str) and held:
            by_identifier.setdefault(canonical(address_identifier(endpoint["address"])), held[0])
    if body.get("endpoint"):
        body["endpoint"] = _server_endpoints(body["endpoint"], by_identifier, server_refs)
    if any(s.get("endpoint") for s in body.get("series") or []):
        body["series"] = [{**s, "endpoint": _server_endpoints(s["endpoint"], by_identifier, server_refs)}
                          if s.get("endpoint") else s for s in body["series"]]
    return body


def _server_endpoints(references: list[dict[str, Any]], by_identifier: dict[str, dict[str, Any]],
                      server_refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """references with local ones replaced by the server's (keep_server_references), once each."""
    result: dict[str, dict[str, Any]] = {}
    for reference in references:
        if _is_local(reference.get("reference")):
            if reference.get("identifier"):
                reference = by_identifier.get(canonical(reference["identifier"]), reference)
            elif server_refs:
                continue  # a legacy reference: the server's endpoints stand in for it
        result.setdefault(reference.get("reference") or canonical(reference), reference)
    return list(result.values()) or server_refs[:1]


def update_request(body: dict[str, Any], study: ServerStudy, bundle: dict[str, Any]) -> dict[str, Any] | None:
    """None when a plain PUT will do; else a transaction that also creates the resources
    the merged study refers to by urn:uuid (e.g. the Endpoint, configured after the
    study was first delivered), with the PUT guarded by ifMatch as the plain PUT is."""
    local = {ref for ref in _references(body) if _is_local(ref)}
    if not local:
        return None
    entries = [entry for entry in bundle.get("entry") or [] if entry.get("fullUrl") in local]
    put = {"resource": body, "request": {"method": "PUT", "url": f"ImagingStudy/{study.id}"}}
    if study.version:
        put["request"]["ifMatch"] = f'W/"{study.version}"'
    return {"resourceType": "Bundle", "type": "transaction", "entry": [*entries, put]}


def _local_references(body: dict[str, Any]) -> bool:
    return any(_is_local(reference) for reference in _references(body))


def _references(body: dict[str, Any]) -> list[str]:
    refs = [(body.get("subject") or {}).get("reference")]
    refs += [e.get("reference") for e in body.get("endpoint") or []]
    for series in body.get("series") or []:
        refs += [e.get("reference") for e in series.get("endpoint") or []]
    return [r for r in refs if r]
