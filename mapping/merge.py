"""Merging a study that arrives in several parts, or again.

Series and instances are keyed by UID (a resent instance replaces its earlier version);
a value missing from the new part never erases one already present; identifiers,
modalities and endpoints are unions without duplicates; counts are recomputed; merging
the same part twice gives the same resource. Two patients are never merged into one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from mapping.errors import MappingError, PatientMismatchError
from mapping.fhirjson import (INSTANCE_ORDER, PATIENT_ORDER, REFERENCE_ORDER, Order, canonical, in_order,
                              same_patient, study_orders)
from mapping.r5 import imaging_study_r5, study_version
from mapping.selection import selection_identifier
from mapping.study import StudyResources, as_version, endpoint_url, sort_key

Key = Callable[[dict[str, Any]], Any]

# Elements the server (or the first writer) owns: kept from the existing resource.
_KEPT = ("id", "meta", "implicitRules", "language", "text", "contained")


def _identifier_key(identifier: dict[str, Any]) -> Any:
    return identifier.get("system"), identifier.get("value")


def _coding_key(coding: dict[str, Any]) -> Any:
    # An R5 modality is a CodeableConcept: keyed by its (first) Coding, as the R4 Coding is.
    if isinstance(coding.get("coding"), list) and coding["coding"] and isinstance(coding["coding"][0], dict):
        coding = coding["coding"][0]
    return coding.get("system"), coding.get("code")


def _reference_key(reference: dict[str, Any]) -> Any:
    return reference.get("reference") or canonical(reference)


LIST_KEYS: Mapping[str, Key] = MappingProxyType(
    {"identifier": _identifier_key, "modality": _coding_key, "endpoint": _reference_key})


def union(existing: list[Any], new: list[Any], key: Key | None = None) -> list[Any]:
    """existing, then the items of new not already in it (a newer equal-keyed item replaces the older)."""
    key = key or canonical
    merged: dict[Any, Any] = {key(item): item for item in existing}
    for item in new:
        merged[key(item)] = item
    return list(merged.values())


def _more_precise(existing: str, new: str) -> str:
    """A dateTime: the new value, unless it is the existing one with less precision."""
    return existing if existing.startswith(new) else new


def merge_elements(existing: dict[str, Any], new: dict[str, Any], *, order: Order,
                   special: dict[str, Callable[[Any, Any], Any]] | None = None) -> dict[str, Any]:
    """Element by element: new wins where present, existing stays where new has nothing;
    lists are unions (by LIST_KEYS, else by value); special handles named elements.
    An element only new has goes where ``order`` puts it, as in a converted resource."""
    special = special or {}
    merged: dict[str, Any] = {}
    names = dict.fromkeys([*existing, *new])
    for name in names:
        if name not in new:
            merged[name] = existing[name]
        elif name not in existing:
            merged[name] = new[name]
        elif name in special:
            merged[name] = special[name](existing[name], new[name])
        elif isinstance(existing[name], list) and isinstance(new[name], list):
            merged[name] = union(existing[name], new[name], LIST_KEYS.get(name))
        else:
            merged[name] = new[name]
    return in_order(merged, order) if len(names) > len(existing) else merged


def _keep(existing: Any, new: Any) -> Any:
    return existing


def _merge_instances(existing: list[dict[str, Any]], new: list[dict[str, Any]],
                     order: Order = INSTANCE_ORDER) -> list[dict[str, Any]]:
    by_uid = {i.get("uid"): i for i in existing}
    for instance in new:
        uid = instance.get("uid")
        if uid not in by_uid:
            by_uid[uid] = instance
        elif by_uid[uid] != instance:  # an instance merged with an equal one is that instance: skip the work
            by_uid[uid] = merge_elements(by_uid[uid], instance, order=order)
    return sorted(by_uid.values(), key=lambda i: sort_key(i.get("number"), i.get("uid") or ""))


def _without_moved(series: dict[str, Any], moved: set[Any]) -> dict[str, Any] | None:
    """series less the instances the new part puts elsewhere; None when nothing is left of it."""
    instances = series.get("instance")
    if not instances or not moved.intersection(i.get("uid") for i in instances):
        return series
    kept = [i for i in instances if i.get("uid") not in moved]
    return {**series, "instance": kept} if kept else None


def _merge_series(existing: list[dict[str, Any]], new: list[dict[str, Any]],
                  fhir_version: str = "R4") -> list[dict[str, Any]]:
    # An instance belongs to one series: resent in another series, the new place wins
    # (as convert_study keeps the last copy), so it is never counted twice.
    placed = {i.get("uid"): s.get("uid") for s in new for i in s.get("instance") or []}
    by_uid = {}
    for series in existing:
        moved = {uid for uid, series_uid in placed.items() if series_uid != series.get("uid")}
        series = _without_moved(series, moved)
        if series is not None:
            by_uid[series.get("uid")] = series
    _, series_order, instance_order = study_orders(fhir_version)
    for series in new:
        uid = series.get("uid")
        if uid in by_uid:
            series = merge_elements(by_uid[uid], series, order=series_order, special={
                "instance": lambda old, part: _merge_instances(old, part, instance_order),
                "started": _more_precise})
        by_uid[uid] = series
    merged = []
    for series in by_uid.values():
        if series.get("instance") is not None:
            series = _counted(series, "numberOfInstances", len(series["instance"]), series_order)
        merged.append(series)
    return sorted(merged, key=lambda s: sort_key(s.get("number"), s.get("uid") or ""))


def _counted(element: dict[str, Any], name: str, count: int, order: Order) -> dict[str, Any]:
    counted = {**element, name: count}
    return counted if name in element else in_order(counted, order)


def _merge_subject(existing: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    old_id, new_id = existing.get("identifier"), new.get("identifier")
    if old_id and new_id and not same_patient([new_id], [old_id]):
        raise PatientMismatchError("the new part's subject has a different patient identifier than the "
                                   "existing ImagingStudy's subject")
    if not old_id and new_id and existing.get("reference") == new.get("reference"):
        return in_order({**existing, "identifier": new_id}, REFERENCE_ORDER)
    return existing


def merge_imaging_study(existing: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """existing + a new part of the same study (module rules), as FHIR JSON dicts. The existing
    subject is kept; PatientMismatchError when both subjects carry an identifier and they differ.

    Either release (mapping.r5.study_version tells): an R4 existing study meets an R5 part as
    R5 (rendered by mapping/r5.py first); an R5 existing study and an R4 part is a MappingError."""
    fhir_version = study_version(new) or study_version(existing) or "R4"
    existing_version = study_version(existing) or fhir_version
    if existing_version != fhir_version:
        if fhir_version != "R5":
            raise MappingError(f"cannot merge an R4 part into an {existing_version} ImagingStudy")
        existing = imaging_study_r5(existing)
    study_order = study_orders(fhir_version)[0]
    special = {name: _keep for name in _KEPT}
    special.update({"subject": _merge_subject, "started": _more_precise,
                    "series": lambda old, part: _merge_series(old, part, fhir_version)})
    merged = merge_elements(existing, new, order=study_order, special=special)
    if merged.get("series"):
        merged = _counted(merged, "numberOfSeries", len(merged["series"]), study_order)
        merged = _counted(merged, "numberOfInstances", sum(s.get("numberOfInstances") or len(s.get("instance") or [])
                                                           for s in merged["series"]), study_order)
    return merged


def _merge_patient(existing: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Fill in what the existing Patient lacks; never overwrite (``unknown`` gender counts as absent).
    Identifiers the existing Patient lacks (by system and value) are added after its own."""
    merged = dict(existing)
    for name, value in new.items():
        if name not in merged or (name == "gender" and merged[name] == "unknown"):
            merged[name] = value
        elif name == "identifier" and isinstance(value, list) and isinstance(merged[name], list):
            known = {_identifier_key(i) for i in merged[name]}
            added = [i for i in value if _identifier_key(i) not in known]
            if added:
                merged[name] = [*merged[name], *added]
    return in_order(merged, PATIENT_ORDER) if len(merged) > len(existing) else merged


def _without_dangling_endpoints(study: dict[str, Any], known: set[str]) -> dict[str, Any]:
    """study without local (urn:uuid:) endpoint references to an Endpoint that is not in known
    (the study itself when there are none: merges of large studies copy nothing here)."""
    def dangling(reference: dict[str, Any]) -> bool:
        ref = reference.get("reference") or ""
        return ref.startswith("urn:uuid:") and ref not in known

    def without(element: dict[str, Any]) -> dict[str, Any]:
        element = dict(element)
        kept = [e for e in element["endpoint"] if not dangling(e)]
        if kept:
            element["endpoint"] = kept
        else:
            del element["endpoint"]
        return element

    if any(dangling(e) for e in study.get("endpoint") or []):
        study = without(study)
    series_list = study.get("series") or []
    if any(dangling(e) for series in series_list for e in series.get("endpoint") or []):
        study = {**study, "series": [without(s) if any(dangling(e) for e in s.get("endpoint") or []) else s
                                     for s in series_list]}
    return study


def merge_resources(existing: StudyResources, new: StudyResources) -> StudyResources:
    """existing + a new part, for a whole study (Patient values filled in, never overwritten).

    Raises PatientMismatchError when the patients' identifiers differ, MappingError when the
    two are not the same study.
    """
    if existing.study_uid != new.study_uid:
        raise MappingError(f"cannot merge study {new.study_uid} into study {existing.study_uid}")
    existing = as_version(existing, new.fhir_version)  # an R4 file meeting an R5 part becomes R5
    old_patient, new_patient = existing.patient, new.patient
    if not same_patient(new_patient.get("identifier") or [], old_patient.get("identifier") or []):
        raise PatientMismatchError(f"study {new.study_uid}: the new part's PatientID differs from the "
                                   f"existing study's")
    patient = _merge_patient(old_patient, new_patient)
    study = merge_imaging_study(existing.imaging_study, new.imaging_study)
    subject = study.get("subject") or {}
    if not subject.get("identifier") and patient.get("identifier"):
        study["subject"] = in_order({**subject, "identifier": patient["identifier"][0]}, REFERENCE_ORDER)
    # Endpoints are a union by address: the existing ones first, then those the new part adds.
    endpoints: dict[str, dict[str, Any]] = {}
    for endpoint in (*existing.endpoints, *new.endpoints):
        endpoints.setdefault(endpoint["address"], endpoint)
    study = _without_dangling_endpoints(study, {endpoint_url(address) for address in endpoints})
    return StudyResources(
        study_uid=new.study_uid,
        patient=patient,
        imaging_study=study,
        endpoints=tuple(endpoints.values()),
        warnings=new.warnings,
        selections=merge_selections(existing.selections, new.selections),
        fhir_version=new.fhir_version,
    )


def _selection_key(selection: dict[str, Any]) -> Any:
    identifier = selection_identifier(selection)
    return canonical(selection) if identifier is None else identifier.get("value")


def merge_selections(existing: tuple[dict[str, Any], ...],
                     new: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
    """The union of two studies' ImagingSelections by their per-selection identifier (one per
    selecting instance and series): a resent KOS, SEG or RTSTRUCT replaces its earlier
    selection at its place; the existing ones come first."""
    return tuple(union(list(existing), list(new), key=_selection_key))
