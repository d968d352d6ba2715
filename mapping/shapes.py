"""Output shapes of one study's resources, and the way back (parse_resources).

``bundle``: a FHIR transaction Bundle. Patient and Endpoint are conditional creates
(``ifNoneExist``: never overwrite a master record), the ImagingStudy is created unless one
with its study UID exists. A Patient without identifier cannot be matched on a server, so it
is contained in the ImagingStudy instead of being an entry of its own.

``contained``: one ImagingStudy with the Patient (and Endpoint) contained, as the
dicom-fhir-converter family produces it.

ImagingSelections (R5, ``StudyResources.selections``): in ``bundle`` each is a conditional
create by its per-selection identifier (``urn:ietf:rfc:3986|urn:uuid:...``), so resending
creates nothing twice. In ``contained`` they are contained in the ImagingStudy (ids
``selection-1``...) with ``derivedFrom`` ``#``: a contained resource may refer to its
container instead of being referred to (FHIR R5 dom-3), and the shape stays one resource.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy

from mapping.errors import MappingError
from mapping.fhirjson import OID_PREFIX, STUDY_UID_SYSTEM, study_uid_value, token_search, validated
from mapping.options import SHAPES
from mapping.r5 import study_version
from mapping.selection import URI_SYSTEM, selection_identifier
from mapping.study import StudyResources, as_version, endpoint_url, imaging_study_url, patient_url

CONTAINED_PATIENT_ID = "patient"
CONTAINED_ENDPOINT_ID = "endpoint"
CONTAINED_SELECTION_ID = "selection-{}"  # numbered from 1 in the study's selection order


def _first_identifier(resource: dict[str, Any]) -> dict[str, Any] | None:
    for identifier in resource.get("identifier") or []:
        if identifier.get("value"):
            return identifier
    return None


def _endpoint_ids(resources: StudyResources) -> list[str]:
    """The contained ids of the study's Endpoints: ``endpoint``, then ``endpoint-2``, ..."""
    return [CONTAINED_ENDPOINT_ID if i == 0 else f"{CONTAINED_ENDPOINT_ID}-{i + 1}"
            for i in range(len(resources.endpoints))]


def _with_references(study: dict[str, Any], subject_ref: str, endpoints: dict[str, str]) -> dict[str, Any]:
    """study with its subject referring to subject_ref and the endpoint references of the study
    and its series renamed (endpoints: old reference -> new)."""
    study = dict(study)
    study["subject"] = {**study.get("subject", {}), "reference": subject_ref}

    def renamed(references: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**e, "reference": endpoints[e["reference"]]} if e.get("reference") in endpoints else e
                for e in references]

    if endpoints and study.get("endpoint"):
        study["endpoint"] = renamed(study["endpoint"])
    if endpoints and any(s.get("endpoint") for s in study.get("series") or []):
        study["series"] = [{**s, "endpoint": renamed(s["endpoint"])} if s.get("endpoint") else s
                           for s in study["series"]]
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
        study = _contained(_with_references(study, "#" + CONTAINED_PATIENT_ID, {}), patient)
    for endpoint in resources.endpoints:  # each a conditional create: one Endpoint per address on a server
        request: dict[str, Any] = {"method": "POST", "url": "Endpoint"}
        endpoint_identifier = _first_identifier(endpoint)
        if endpoint_identifier is not None:
            request["ifNoneExist"] = token_search(endpoint_identifier.get("system"), endpoint_identifier["value"])
        entries.append({"fullUrl": endpoint_url(endpoint["address"]), "resource": endpoint, "request": request})
    entries.append({"fullUrl": imaging_study_url(uid), "resource": study, "request": {
        "method": "POST", "url": "ImagingStudy",
        "ifNoneExist": token_search(STUDY_UID_SYSTEM, study_uid_value(uid))}})
    entries += selection_entries(resources, patient_entry=identifier is not None)
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def selection_entries(resources: StudyResources, *, patient_entry: bool = True) -> list[dict[str, Any]]:
    """The ImagingSelections as transaction entries: conditional creates by their identifier.
    Without a Patient entry (a Patient without identifier is contained in the ImagingStudy)
    nothing outside the ImagingStudy can refer to it, so the selections go without subject."""
    entries = []
    for selection in resources.selections:
        identifier = selection_identifier(selection)
        if identifier is None:
            raise MappingError(f"study {resources.study_uid}: an ImagingSelection has no {URI_SYSTEM} identifier")
        if not patient_entry:
            selection = {k: v for k, v in selection.items() if k != "subject"}
        entries.append({"fullUrl": identifier["value"], "resource": selection, "request": {
            "method": "POST", "url": "ImagingSelection",
            "ifNoneExist": token_search(identifier["system"], identifier["value"])}})
    return entries


def render_contained(resources: StudyResources) -> dict[str, Any]:
    patient = resources.patient
    patient = {"resourceType": "Patient", "id": CONTAINED_PATIENT_ID,
               **{k: v for k, v in patient.items() if k not in ("resourceType", "id")}}
    contained = [patient]
    renamed: dict[str, str] = {}
    for endpoint, contained_id in zip(resources.endpoints, _endpoint_ids(resources)):
        contained.append({"resourceType": "Endpoint", "id": contained_id,
                          **{k: v for k, v in endpoint.items() if k not in ("resourceType", "id")}})
        renamed[endpoint_url(endpoint["address"])] = "#" + contained_id
    study_url = imaging_study_url(resources.study_uid)
    for n, selection in enumerate(resources.selections, start=1):
        contained.append({"resourceType": "ImagingSelection", "id": CONTAINED_SELECTION_ID.format(n),
                          **_relinked(selection, {patient_url(resources.study_uid): "#" + CONTAINED_PATIENT_ID,
                                                  study_url: "#"})})
    study = _with_references(resources.imaging_study, "#" + CONTAINED_PATIENT_ID, renamed)
    return _contained(study, *contained)


def selection_bundle(resources: StudyResources, subject_reference: str | None,
                     study_reference: str) -> dict[str, Any] | None:
    """A transaction Bundle of the study's ImagingSelections alone (conditional creates, so a
    resend creates nothing), referring to a Patient and an ImagingStudy already on a server
    (``Patient/<id>``, ``ImagingStudy/<id>``); None when the study has no selections. Without a
    subject reference the selections keep only the subject's identifier."""
    if not resources.selections:
        return None
    uid = resources.study_uid
    links = {imaging_study_url(uid): study_reference}
    if subject_reference is not None:
        links[patient_url(uid)] = subject_reference
    selections = []
    for selection in resources.selections:
        relinked = {"resourceType": "ImagingSelection", **_relinked(selection, links)}
        subject = relinked.get("subject")
        if subject_reference is None and isinstance(subject, dict):
            subject = {k: v for k, v in subject.items() if k != "reference"}
            relinked = {k: v for k, v in relinked.items() if k != "subject"} | (
                {"subject": subject} if subject else {})
        selections.append(relinked)
    entries = selection_entries(dataclasses.replace(resources, selections=tuple(selections)))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _relinked(selection: dict[str, Any], links: dict[str, str]) -> dict[str, Any]:
    """selection (without resourceType and id) with its subject and derivedFrom references
    mapped through links (the others kept)."""
    result = {k: v for k, v in selection.items() if k not in ("resourceType", "id")}
    subject = result.get("subject")
    if isinstance(subject, dict) and subject.get("reference") in links:
        result["subject"] = {**subject, "reference": links[subject["reference"]]}
    if isinstance(result.get("derivedFrom"), list):
        result["derivedFrom"] = [{**d, "reference": links[d["reference"]]}
                                 if isinstance(d, dict) and d.get("reference") in links else d
                                 for d in result["derivedFrom"]]
    return result


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
        selections = [r for r in resources_by_url.values() if r.get("resourceType") == "ImagingSelection"]
    elif kind == "ImagingStudy":
        study, resources_by_url = document, {}
        selections = [r for r in _objects(study, "contained", "the ImagingStudy")
                      if r.get("resourceType") == "ImagingSelection"]
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
    # The Endpoints the study or its series refer to, in the order first referred to.
    endpoints: dict[str, dict[str, Any]] = {}
    references = list(_objects(study, "endpoint", f"study {uid}: the ImagingStudy"))
    for i, series in enumerate(_objects(study, "series", f"study {uid}: the ImagingStudy")):
        references += _objects(series, "endpoint", f"study {uid}: the ImagingStudy's series[{i}]")
    for reference in references:
        ref = reference.get("reference")
        candidate = resources_by_url.get(ref) if isinstance(ref, str) else None
        if ref not in endpoints and candidate is not None and candidate.get("resourceType") == "Endpoint":
            endpoints[ref] = _without_id(candidate) if ref.startswith("#") else candidate
    _check_structure(uid, study, patient, tuple(endpoints.values()))
    canonical = {k: v for k, v in study.items() if k != "contained"}
    canonical = _with_references(canonical, patient_url(uid),
                                 {ref: endpoint_url(e["address"]) for ref, e in endpoints.items()})
    by_address: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints.values():
        by_address.setdefault(endpoint["address"], endpoint)  # one per address, the first
    links = {"#" + CONTAINED_PATIENT_ID: patient_url(uid), "#": imaging_study_url(uid)}
    for selection in selections:
        if selection_identifier(selection) is None:
            raise MappingError(f"study {uid}: an ImagingSelection has no {URI_SYSTEM} identifier")
    found = StudyResources(study_uid=uid, patient=patient, imaging_study=canonical,
                           endpoints=tuple(by_address.values()),
                           selections=tuple({"resourceType": "ImagingSelection", **_relinked(s, links)}
                                            for s in selections),
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
                     endpoints: tuple[dict[str, Any], ...]) -> None:
    """MappingError unless what merging and rendering read has the JSON types FHIR gives it
    (the values themselves are validated where the study leaves again)."""
    check_study_structure(study, f"study {uid}: the ImagingStudy")
    _strings(_objects(patient, "identifier", f"study {uid}: the Patient"), f"study {uid}: the Patient's identifier",
             "system", "value")
    for endpoint in endpoints:
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
