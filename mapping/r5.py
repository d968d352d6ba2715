"""R4 → R5: the mapping's R4 resources rendered as FHIR R5 (5.0.0), element by element.

One mapping produces both releases: convert_study builds R4, and for ``fhir_version = "R5"``
each resource passes through the tables below. Pure and table-driven: a rule names an R4
element and what it becomes in R5; elements without a rule are the same in both releases.
The tables follow the R5 ImagingStudy and Endpoint definitions and HL7's R4 → R5 conversion
maps (ImagingStudy4to5, Endpoint4to5); mapping/README.md, section "R5", is the table in prose.

A resource that is already R5 passes unchanged (every rule reads an R4-only form), so the
rendering can be applied to a document of either release (``as_r5``), e.g. an R4 file a node
now configured for R5 merges into.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from mapping.fhirjson import R5_ENDPOINT_ORDER, R5_IMAGING_STUDY_ORDER, R5_SERIES_ORDER, in_order
from mapping.imaging_study import IDENTIFIER_TYPE_SYSTEM

JSON = dict[str, Any]
# A rule: (the R4 value) -> {R5 element: value} (empty: dropped), merged into the R5 resource.
Rule = Callable[[Any], JSON]


def concept(coding: Any) -> JSON:
    """An R4 Coding as an R5 CodeableConcept; a Coding with a display only (an unknown
    BodyPartExamined term) becomes the concept's text. Already a CodeableConcept: unchanged."""
    if not isinstance(coding, dict) or "coding" in coding or "text" in coding:
        return coding
    if set(coding) == {"display"}:
        return {"text": coding["display"]}
    return {"coding": [coding]}


def _is_concept(value: Any) -> bool:
    return isinstance(value, dict) and ("coding" in value or "text" in value)


def _concepts(name: str) -> Rule:
    return lambda codings: {name: [concept(c) for c in codings]}


def _one_concept(name: str) -> Rule:
    return lambda coding: {name: concept(coding)}


def _referenced_concept(coding: Any) -> JSON:
    """An R4 Coding as an R5 CodeableReference (series.bodySite: CodeableReference(BodyStructure))."""
    if isinstance(coding, dict) and ("concept" in coding or "reference" in coding):
        return coding
    return {"concept": concept(coding)}


def _by_concept(name: str) -> Rule:
    # procedureCode / reasonCode (CodeableConcept 0..*) -> procedure / reason (CodeableReference 0..*)
    return lambda concepts: {name: [{"concept": c} for c in concepts]}


def _by_reference(name: str) -> Rule:
    # procedureReference (Reference 0..1) / reasonReference (Reference 0..*) -> CodeableReference
    return lambda refs: {name: [{"reference": r} for r in (refs if isinstance(refs, list) else [refs])]}


def _dropped(_value: Any) -> JSON:
    return {}


STUDY_RULES: Mapping[str, Rule] = MappingProxyType({
    "modality": lambda codings: {"modality": [concept(c) for c in codings]},
    "procedureReference": _by_reference("procedure"),
    "procedureCode": _by_concept("procedure"),
    "reasonCode": _by_concept("reason"),
    "reasonReference": _by_reference("reason"),
    # R5 removed ImagingStudy.interpreter (who read the study belongs to the report:
    # DiagnosticReport.resultsInterpreter); mapping/README.md, section R5.
    "interpreter": _dropped,
})

SERIES_RULES: Mapping[str, Rule] = MappingProxyType({
    "modality": _one_concept("modality"),
    "bodySite": lambda coding: {"bodySite": _referenced_concept(coding)},
    "laterality": _one_concept("laterality"),
})

ENDPOINT_RULES: Mapping[str, Rule] = MappingProxyType({
    "connectionType": lambda value: {"connectionType": [concept(c) for c in
                                                        (value if isinstance(value, list) else [value])]},
    # R5 groups what the endpoint carries in Endpoint.payload (type 0..*, mimeType 0..*).
    "payloadType": lambda types: {"payload": [{"type": types}]},
    "payloadMimeType": lambda mime_types: {"payload": [{"mimeType": mime_types}]},
})


def _is_accession(identifier: Any) -> bool:
    coding = ((identifier or {}).get("type") or {}).get("coding") or []
    return any(c.get("system") == IDENTIFIER_TYPE_SYSTEM and c.get("code") == "ACSN" for c in coding)


def _system_value(identifier: Any) -> tuple[Any, Any]:
    return (identifier.get("system"), identifier.get("value")) if isinstance(identifier, dict) else (None, None)


def accession_request(identifier: JSON) -> JSON:
    """The accession number as R5 carries it: a reference by identifier to the ServiceRequest
    it was assigned to (ImagingStudy.basedOn; the R5 definition maps Accession Number and its
    issuer there, and ImagingStudy.identifier to the Study Instance UID)."""
    return {"type": "ServiceRequest", "identifier": identifier}


def _apply(resource: JSON, rules: Mapping[str, Rule], is_r4: Callable[[str, Any], bool]) -> JSON:
    out: JSON = {}
    for name, value in resource.items():
        rule = rules.get(name)
        converted = rule(value) if rule is not None and is_r4(name, value) else {name: value}
        for target, item in converted.items():
            out[target] = _joined(target, out[target], item) if target in out else item
    return out


def _joined(target: str, existing: Any, new: Any) -> Any:
    # Two R4 elements that meet in one R5 element: procedureReference + procedureCode ->
    # procedure, reasonReference + reasonCode -> reason, payloadType + payloadMimeType ->
    # the one Endpoint.payload.
    if target == "payload" and existing and new:
        return [{**existing[0], **new[0]}]
    if isinstance(existing, list) and isinstance(new, list):
        return [*existing, *[n for n in new if n not in existing]]
    return new


def _study_is_r4(name: str, value: Any) -> bool:
    if name == "modality":
        return isinstance(value, list) and any(isinstance(c, dict) and not _is_concept(c) for c in value)
    return True  # every other rule names an element R5 does not have


def _series_is_r4(name: str, value: Any) -> bool:
    if name == "bodySite":
        return isinstance(value, dict) and not ("concept" in value or "reference" in value)
    return isinstance(value, dict) and not _is_concept(value)


def _endpoint_is_r4(name: str, value: Any) -> bool:
    if name == "connectionType":
        return isinstance(value, dict)
    return True


def imaging_study_r5(study: JSON) -> JSON:
    """An R4 ImagingStudy dict as R5 (module rules), in R5's element order."""
    converted = _apply(study, STUDY_RULES, _study_is_r4)
    identifiers = converted.get("identifier") or []
    accessions = [i for i in identifiers if _is_accession(i)]
    if accessions:
        rest = [i for i in identifiers if not _is_accession(i)]
        if rest:
            converted["identifier"] = rest
        else:
            converted.pop("identifier")
        based_on = list(converted.get("basedOn") or [])
        # An accession already referenced (by system and value, e.g. from RequestAttributesSequence)
        # is not referenced twice.
        known = {_system_value(b.get("identifier")) for b in based_on if isinstance(b, dict)}
        based_on += [accession_request(a) for a in accessions if _system_value(a) not in known]
        converted["basedOn"] = based_on
    if isinstance(converted.get("series"), list):
        converted["series"] = [series_r5(s) for s in converted["series"]]
    return in_order(converted, R5_IMAGING_STUDY_ORDER)


def series_r5(series: JSON) -> JSON:
    # Instances are left as they are (shared, not copied): their elements and element order are
    # the same in R4 and R5 (tests/test_mapping_r5.py checks it), and a study has many of them.
    return in_order(_apply(series, SERIES_RULES, _series_is_r4), R5_SERIES_ORDER)


def endpoint_r5(endpoint: JSON) -> JSON:
    """An R4 Endpoint dict as R5: connectionType a list of CodeableConcepts, payloadType and
    payloadMimeType in one Endpoint.payload."""
    return in_order(_apply(endpoint, ENDPOINT_RULES, _endpoint_is_r4), R5_ENDPOINT_ORDER)


def patient_r5(patient: JSON) -> JSON:
    """The Patient elements the mapping writes (identifier, name, gender, birthDate) are the
    same in R5."""
    return patient


RESOURCE_RULES: Mapping[str, Callable[[JSON], JSON]] = MappingProxyType({
    "ImagingStudy": imaging_study_r5, "Endpoint": endpoint_r5, "Patient": patient_r5})


def resource_r5(resource: JSON) -> JSON:
    """Any resource the mapping writes, as R5 (other resource types unchanged)."""
    rule = RESOURCE_RULES.get(str(resource.get("resourceType")))
    return rule(resource) if rule is not None else resource


# --- which release a document is -----------------------------------------------------------

_R4_ONLY = ("procedureCode", "procedureReference", "reasonCode", "reasonReference", "interpreter")
_R5_ONLY = ("procedure", "reason", "partOf")


def study_version(study: JSON) -> str | None:
    """"R4" or "R5" by the forms of an ImagingStudy dict's elements (a modality Coding or a
    CodeableConcept, procedureCode or procedure, ...); None when nothing tells (no modality,
    no series, none of the elements that differ)."""
    if any(name in study for name in _R5_ONLY):
        return "R5"
    if any(name in study for name in _R4_ONLY):
        return "R4"
    modalities = [m for m in study.get("modality") or [] if isinstance(m, dict)]
    modalities += [s["modality"] for s in study.get("series") or []
                   if isinstance(s, dict) and isinstance(s.get("modality"), dict)]
    for modality in modalities:
        return "R5" if _is_concept(modality) else "R4"
    return None
