"""FHIR JSON, the mapping's currency: the helpers every side that reads or writes it shares.

Resources travel as plain JSON-ready dicts; fhir.resources models appear only at the edge
(``validated``), where a document is about to leave the process (a file, a server), so a
study is never turned into models and back on its way through the mapping or a sink.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

from fhir.resources import get_fhir_model_class as r5_model_class
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.imagingstudy import ImagingStudy, ImagingStudySeries, ImagingStudySeriesInstance
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.reference import Reference
from fhir.resources.endpoint import Endpoint as EndpointR5
from fhir.resources.imagingstudy import ImagingStudy as ImagingStudyR5
from fhir.resources.imagingstudy import ImagingStudySeries as ImagingStudySeriesR5
from fhir.resources.imagingstudy import ImagingStudySeriesInstance as ImagingStudySeriesInstanceR5
from pydantic import ValidationError

from mapping.errors import MappingError

STUDY_UID_SYSTEM = "urn:dicom:uid"
OID_PREFIX = "urn:oid:"

Identifier = tuple[str | None, str]  # (system, value)

_FULL_DATETIME = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:(\d{2}))(?:\.(\d{1,6}))?(Z|[+-]\d{2}:\d{2})")


def study_uid_value(study_uid: str) -> str:
    """The value of a study's identifier (system STUDY_UID_SYSTEM)."""
    return OID_PREFIX + study_uid


def model_json(model: Any) -> dict[str, Any]:
    """A fhir.resources model as its FHIR JSON dict (what a server receives)."""
    return json.loads(model.model_dump_json(exclude_none=True))


Order = Mapping[str, int]  # element name -> position in the JSON fhir.resources writes


def _order(model: Any) -> Order:
    return MappingProxyType({name: i for i, name in enumerate(["resourceType", *model.elements_sequence()])})


# The element orders of what a merge can add elements to (read once from the R4B definitions).
IMAGING_STUDY_ORDER = _order(ImagingStudy)
SERIES_ORDER = _order(ImagingStudySeries)
INSTANCE_ORDER = _order(ImagingStudySeriesInstance)
PATIENT_ORDER = _order(Patient)
REFERENCE_ORDER = _order(Reference)
# The same for R5 (fhir.resources' top-level models are R5 5.0.0); Patient and Reference keep
# their R4 order in R5.
R5_IMAGING_STUDY_ORDER = _order(ImagingStudyR5)
R5_SERIES_ORDER = _order(ImagingStudySeriesR5)
R5_INSTANCE_ORDER = _order(ImagingStudySeriesInstanceR5)
R5_ENDPOINT_ORDER = _order(EndpointR5)


def study_orders(fhir_version: str) -> tuple[Order, Order, Order]:
    """The (ImagingStudy, series, instance) element orders of a FHIR version ("R4" or "R5")."""
    if fhir_version == "R5":
        return R5_IMAGING_STUDY_ORDER, R5_SERIES_ORDER, R5_INSTANCE_ORDER
    return IMAGING_STUDY_ORDER, SERIES_ORDER, INSTANCE_ORDER


def in_order(element: dict[str, Any], order: Order) -> dict[str, Any]:
    """element with its keys in FHIR's element order, as the models wrote it (unknown ones last)."""
    return dict(sorted(element.items(), key=lambda item: order.get(item[0], len(order))))


def as_written(datetime_text: str) -> str:
    """A FHIR dateTime in the form our outputs use: the fraction of a second as DICOM gave it
    (``.123`` stays ``.123``: the contract keeps the precision, never pads it to six digits),
    UTC as ``Z`` (as fhir.resources writes it, which earlier outputs went through).
    """
    match = _FULL_DATETIME.fullmatch(datetime_text)
    if match is None:
        return datetime_text
    head, _, fraction, zone = match.groups()
    return (head + (f".{fraction}" if fraction else "")
            + ("Z" if zone in ("Z", "+00:00", "-00:00") else zone))


def canonical(value: Any) -> str:
    """value as compared for equality: key order and whitespace do not count."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def validated(resource: dict[str, Any], context: str, fhir_version: str = "R4") -> Any:
    """resource (FHIR JSON) as its R4B model (fhir_version "R4") or R5 model ("R5");
    MappingError naming the places that fail.

    The message names elements and rules, never the values (they may be a patient's).
    """
    kind = resource.get("resourceType")
    try:
        model = (r5_model_class if fhir_version == "R5" else get_fhir_model_class)(str(kind))
    except (KeyError, ValueError):
        raise MappingError(f"{context}: {kind!r} is not an {fhir_version} resource type") from None
    try:
        return model.model_validate(resource)
    except ValidationError as exc:
        places = "; ".join(f"{'.'.join(map(str, e['loc'])) or kind}: {e['msg']}"
                           for e in exc.errors(include_input=False, include_url=False)[:5])
        raise MappingError(f"{context}: the {kind} does not validate as {fhir_version}: {places}") from None


# --- identifiers ------------------------------------------------------------------------------

def identifier_pairs(identifiers: Any) -> set[Identifier]:
    """The (system, value) pairs of a list of Identifier dicts; items without a value are no identity."""
    return {(i.get("system"), i["value"]) for i in identifiers or [] if isinstance(i, dict) and i.get("value")}


def primary_identifier(identifiers: Any) -> Identifier | None:
    """The (system, value) of the first identifier with a value: what a Patient is matched on."""
    for i in identifiers or []:
        if isinstance(i, dict) and i.get("value"):
            return i.get("system"), i["value"]
    return None


def same_identifier(ours: set[Identifier], theirs: set[Identifier]) -> bool:
    """True when one of our identifiers is one of theirs: equal values under equal systems.

    An identifier without a system matches only one without a system: a bare value cannot
    prove identity once a system is known (the same MRN under another issuer is another patient).
    """
    return not ours.isdisjoint(theirs)


def same_patient(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> bool:
    """False only when both sides carry identifiers and our primary one (the first) is none of
    theirs (same_identifier: system and value equal)."""
    primary, b = primary_identifier(ours), identifier_pairs(theirs)
    return primary is None or not b or same_identifier({primary}, b)


# --- search -----------------------------------------------------------------------------------

def escaped(text: str) -> str:
    """A search parameter value with FHIR's escapes (``\\``, ``|``, ``,``, ``$``), not URL-encoded."""
    for char in ("\\", "|", ",", "$"):
        text = text.replace(char, "\\" + char)
    return text


def token(system: str | None, value: str) -> str:
    """``<system>|<value>``, or ``|<value>`` without a system, for a client that URL-encodes it.

    A bare ``<value>`` would match the value under ANY system (FHIR token search), so a study
    could be attached to another issuer's patient who has the same MRN; ``|<value>`` matches
    only identifiers that have no system, as ours has.
    """
    return f"{escaped(system) if system else ''}|{escaped(value)}"


def search_value(text: str) -> str:
    """A value for a search parameter in a URL: FHIR escapes then URL encoding."""
    return quote(escaped(text), safe=":/.-_~@!*'()")


def token_search(system: str | None, value: str) -> str:
    """``identifier=<system>|<value>`` (``token``), URL-encoded, e.g. for ``ifNoneExist``."""
    return f"identifier={search_value(system) if system else ''}|{search_value(value)}"


def study_search(study_uid: str) -> str:
    """The identifier token that finds a study's ImagingStudy (``token``, not URL-encoded)."""
    return token(STUDY_UID_SYSTEM, study_uid_value(study_uid))
