"""Output shapes of one study's resources, and the way back (parse_resources).

``bundle``: a FHIR transaction Bundle. Patient and Endpoint are conditional creates
(``ifNoneExist``: never overwrite a master record), the ImagingStudy is created unless one
with its study UID exists. A Patient without identifier cannot be matched on a server, so it
is contained in the ImagingStudy instead of being an entry of its own.

``contained``: one ImagingStudy with the Patient (and Endpoint) contained, as the
dicom-fhir-converter family produces it.
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy

from mapping.errors import MappingError
from mapping.fhirjson import OID_PREFIX, STUDY_UID_SYSTEM, study_uid_value, token_search, validated
from mapping.options import SHAPES
from mapping.r5 import study_version
from mapping.study import StudyResources, as_version, endpoint_url, imaging_study_url, patient_url

CONTAINED_PATIENT_ID = "patient"
CONTAINED_ENDPOINT_ID = "endpoint"


def _first_identifier(resource: dict[str, Any]) -> dict[str, Any] | None:
    for identifier in resource.get("identifier") or []:
        if identifier.get("value"):
            return identifier
    return None


def _endpoint_ref(resources: StudyResources) -> str | None:
    return endpoint_url(resources.endpoint["address"]) if resources.endpoint is not None else None


def _with_references(study: dict[str, Any], subject_ref: str, endpoint_from: str | None,
                     endpoint_to: str | None) -> dict[str, Any]:
    study = dict(study)
    study["subject"] = {**study.get("subject", {}), "reference": subject_ref}
    if endpoint_from is not None and endpoint_to is not None and study.get("endpoint"):
        study["endpoint"] = [{**e, "reference": endpoint_to} if e.get("reference") == endpoint_from else e
                             for e in study["endpoint"]]
    return study


def _contained(study: dict[str, Any], *resources: dict[str, Any]) -> dict[str, Any]:
    # "contained" comes right after the resource's own metadata, as the models order it.
    head = {k: study[k] for k in ("resourceType", "id", "meta", "implicitRules", "language", "text") if k in study}
    rest = {k: v for k, v in study.items() if k not in head and k != "contained"}
    return {**head, "contained": [*study.get("contained", []), *resources], **rest}


def render_bundle(resources: StudyResources) -> dict[str, Any]:
    uid = resources.study_uid
    patient = resources.patient
    study = resources.imaging_study
    entries: list[dict[str, Any]] = []
    identifier = _first_identifier(patient)
    if identifier is not None:
        entries.append({"fullUrl": patient_url(uid), "resource": patient, "request": {
            "method": "POST", "url": "Patient",
            "ifNoneExist": token_search(identifier.get("system"), identifier["value"])}})
    else:
        # No identifier: a server could only create a duplicate Patient per study; keep it inside.
        patient = {"resourceType": "Patient", "id": CONTAINED_PATIENT_ID,
                   **{k: v for k, v in patient.items() if k not in ("resourceType", "id")}}
        study = _contained(_with_references(study, "#" + CONTAINED_PATIENT_ID, None, None), patient)
    if resources.endpoint is not None:
        endpoint = resources.endpoint
        request: dict[str, Any] = {"method": "POST", "url": "Endpoint"}
        endpoint_identifier = _first_identifier(endpoint)
        if endpoint_identifier is not None:
            request["ifNoneExist"] = token_search(endpoint_identifier.get("system"), endpoint_identifier["value"])
        entries.append({"fullUrl": _endpoint_ref(resources), "resource": endpoint, "request": request})
    entries.append({"fullUrl": imaging_study_url(uid), "resource": study, "request": {
        "method": "POST", "url": "ImagingStudy",
        "ifNoneExist": token_search(STUDY_UID_SYSTEM, study_uid_value(uid))}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def render_contained(resources: StudyResources) -> dict[str, Any]:
    patient = resources.patient
    patient = {"resourceType": "Patient", "id": CONTAINED_PATIENT_ID,
               **{k: v for k, v in patient.items() if k not in ("resourceType", "id")}}
    contained = [patient]
    endpoint_to = None
    if resources.endpoint is not None:
        endpoint = resources.endpoint
        contained.append({"resourceType": "Endpoint", "id": CONTAINED_ENDPOINT_ID,
                          **{k: v for k, v in endpoint.items() if k not in ("resourceType", "id")}})
        endpoint_to = "#" + CONTAINED_ENDPOINT_ID
    study = _with_references(resources.imaging_study, "#" + CONTAINED_PATIENT_ID,
                             _endpoint_ref(resources), endpoint_to)
    return _contained(study, *contained)


def render(resources: StudyResources, shape: str = "bundle") -> dict[str, Any]:
    """The JSON-ready dict of either output shape (``bundle`` or ``contained``)."""
    if shape == "bundle":
        return render_bundle(resources)
    if shape == "contained":
        return render_contained(resources)
    raise ValueError(f"shape: expected one of {', '.join(SHAPES)}, got {shape!r}")


def to_bundle(resources: StudyResources) -> Bundle:
    """The transaction Bundle (output shape ``bundle``) as a validated model (R4B, or R5 for R5
    resources); MappingError naming the study, resource and elements when a resource is not
    valid in its release."""
    return validated(render_bundle(resources), f"study {resources.study_uid}", resources.fhir_version)


def to_contained(resources: StudyResources) -> ImagingStudy:
    """The ImagingStudy with Patient (and Endpoint) contained (output shape ``contained``), as a
    validated model (R4B, or R5 for R5 resources); MappingError as for to_bundle."""
    return validated(render_contained(resources), f"study {resources.study_uid}", resources.fhir_version)


# --- the way back ---------------------------------------------------------------------------


def _study_uid(study: dict[str, Any]) -> str:
    for identifier in _objects(study, "identifier", "the ImagingStudy"):
        value = identifier.get("value")
        if identifier.get("system") == STUDY_UID_SYSTEM and isinstance(value, str) and value.startswith(OID_PREFIX):
            return value[len(OID_PREFIX):]
    raise MappingError("the ImagingStudy has no study UID identifier (urn:dicom:uid)")


def _without_id(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "id"}


def parse_resources(document: dict[str, Any], fhir_version: str | None = None) -> StudyResources:
    """The inverse of render for either shape: ``render(parse_resources(render(r, s)), s) == render(r, s)``.

    The release (R4 or R5) is read from the document's forms (mapping.r5.study_version; R4
    when nothing tells). With fhir_version, the result is in that release: an R4 document is
    rendered as R5 for "R5" (a file written before the node was switched to R5); an R5
    document asked for as R4 is a MappingError.

    Raises MappingError for a document that is neither shape, or is not structurally a study
    this tool wrote (``_check_structure``: what merging relies on). Values are not validated
    here: the document came from the edge, and what is made of it is validated when it
    leaves again. The warnings of the original conversion are not part of the document.
    """
    if not isinstance(document, dict):
        raise MappingError(f"expected a FHIR resource (a JSON object), got {type(document).__name__}")
    kind = document.get("resourceType")
    if kind == "Bundle":
        study, resources_by_url = _bundle_parts(document)
    elif kind == "ImagingStudy":
        study, resources_by_url = document, {}
    else:
        raise MappingError(f"expected a Bundle or an ImagingStudy, got {kind!r}")
    for resource in _objects(study, "contained", "the ImagingStudy"):
        if resource.get("id"):
            resources_by_url["#" + str(resource["id"])] = resource
    uid = _study_uid(study)

    subject_ref = (_object(study, "subject", f"study {uid}: the ImagingStudy") or {}).get("reference") or ""
    patient = resources_by_url.get(subject_ref) if isinstance(subject_ref, str) else None
    if patient is None or patient.get("resourceType") != "Patient":
        raise MappingError(f"study {uid}: the ImagingStudy's subject ({subject_ref or 'none'}) is not "
                           f"a Patient in the document")
    if subject_ref.startswith("#"):
        patient = _without_id(patient)
    endpoint = None
    endpoint_from = None
    for reference in _objects(study, "endpoint", f"study {uid}: the ImagingStudy"):
        candidate = resources_by_url.get(reference.get("reference") or "") if isinstance(
            reference.get("reference"), str) else None
        if candidate is not None and candidate.get("resourceType") == "Endpoint":
            endpoint, endpoint_from = candidate, reference["reference"]
            if endpoint_from.startswith("#"):
                endpoint = _without_id(endpoint)
            break
    _check_structure(uid, study, patient, endpoint)
    canonical = {k: v for k, v in study.items() if k != "contained"}
    endpoint_to = endpoint_url(endpoint["address"]) if endpoint is not None else None
    canonical = _with_references(canonical, patient_url(uid), endpoint_from, endpoint_to)
    found = StudyResources(study_uid=uid, patient=patient, imaging_study=canonical, endpoint=endpoint,
                           fhir_version=study_version(canonical) or fhir_version or "R4")
    return as_version(found, fhir_version) if fhir_version is not None else found


def _bundle_parts(document: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The Bundle's one ImagingStudy, and its other resources by fullUrl."""
    resources_by_url: dict[str, dict[str, Any]] = {}
    studies = []
    for entry in _objects(document, "entry", "the Bundle"):
        resource = _object(entry, "resource", "a Bundle entry") or {}
        if resource.get("resourceType") == "ImagingStudy":
            studies.append(resource)
        elif isinstance(entry.get("fullUrl"), str):
            resources_by_url[entry["fullUrl"]] = resource
    if len(studies) != 1:
        raise MappingError(f"expected a Bundle with one ImagingStudy, found {len(studies)}")
    return studies[0], resources_by_url


def _check_structure(uid: str, study: dict[str, Any], patient: dict[str, Any],
                     endpoint: dict[str, Any] | None) -> None:
    """MappingError unless what merging and rendering read has the JSON types FHIR gives it
    (the values themselves are validated where the study leaves again)."""
    check_study_structure(study, f"study {uid}: the ImagingStudy")
    _strings(_objects(patient, "identifier", f"study {uid}: the Patient"), f"study {uid}: the Patient's identifier",
             "system", "value")
    if endpoint is not None:
        _typed(endpoint, f"study {uid}: the Endpoint", address=str)
        if "address" not in endpoint:
            raise MappingError(f"study {uid}: the Endpoint has no address")


def check_study_structure(study: dict[str, Any], where: str) -> None:
    """MappingError unless the ImagingStudy dict has the JSON types merge_imaging_study relies on."""
    _typed(study, where, started=str, numberOfSeries=int, numberOfInstances=int)
    _strings(_objects(study, "identifier", where), f"{where}'s identifier", "system", "value")
    _strings(_objects(study, "modality", where), f"{where}'s modality", "system", "code")
    _strings(_objects(study, "endpoint", where), f"{where}'s endpoint", "reference")
    _object(study, "subject", where)
    for i, series in enumerate(_objects(study, "series", where)):
        place = f"{where}'s series[{i}]"
        _typed(series, place, number=int, numberOfInstances=int, started=str)
        _strings(_objects(series, "endpoint", place), f"{place}.endpoint", "reference")
        if not isinstance(series.get("uid"), str):
            raise MappingError(f"{place} has no uid")
        for j, instance in enumerate(_objects(series, "instance", place)):
            # Inline rather than _typed: this runs for every instance of every merge.
            number = instance.get("number")
            if not isinstance(instance.get("uid"), str) or not (number is None or type(number) is int):
                raise MappingError(f"{place}.instance[{j}]: uid is not a JSON string or number not an integer")


def _typed(element: dict[str, Any], where: str, **kinds: type) -> None:
    for name, kind in kinds.items():
        value = element.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise MappingError(f"{where}: {name} is not a JSON {'string' if kind is str else 'integer'}")


def _strings(elements: list[dict[str, Any]], where: str, *names: str) -> None:
    for element in elements:
        _typed(element, where, **dict.fromkeys(names, str))


def _object(parent: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:
    value = parent.get(name)
    if value is not None and not isinstance(value, dict):
        raise MappingError(f"{where}: {name} is not a JSON object")
    return value


def _objects(parent: dict[str, Any], name: str, where: str) -> list[dict[str, Any]]:
    value = parent.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise MappingError(f"{where}: {name} is not a list of JSON objects")
    return value
