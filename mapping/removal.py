"""Removing series or instances from an ImagingStudy (a deletion on the source), pure.

`remove_from_imaging_study(study, series_uids, instance_uids)` returns the ImagingStudy
without them, numberOfSeries / numberOfInstances and the study's modality list
recomputed from what is left, every other element as it was; None when nothing is left
(the caller decides between entered-in-error and a delete: sync.on_delete).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def remove_from_imaging_study(study: dict[str, Any], series_uids: Iterable[str] = (),
                              instance_uids: Iterable[str] = ()) -> dict[str, Any] | None:
    if not isinstance(study, dict):
        raise TypeError(f"study: expected an ImagingStudy dict, got {type(study).__name__}")
    drop_series, drop_instances = frozenset(series_uids), frozenset(instance_uids)
    kept = []
    for series in study.get("series") or []:
        if series.get("uid") in drop_series:
            continue
        instances = series.get("instance")
        if instances is None:
            kept.append(series)
            continue
        left = [i for i in instances if i.get("uid") not in drop_instances]
        if not left:
            continue
        if len(left) == len(instances):
            kept.append(series)
            continue
        changed = dict(series)
        changed["instance"] = left
        if "numberOfInstances" in changed:
            changed["numberOfInstances"] = len(left)
        kept.append(changed)
    if not kept:
        return None
    result = dict(study)
    result["series"] = kept
    if "numberOfSeries" in result:
        result["numberOfSeries"] = len(kept)
    if "numberOfInstances" in result:
        result["numberOfInstances"] = sum(s.get("numberOfInstances", len(s.get("instance") or [])) for s in kept)
    if "modality" in result:
        codes = {(c.get("system"), c.get("code")) for c in (s.get("modality") for s in kept) if isinstance(c, dict)}
        result["modality"] = [c for c in result["modality"] if (c.get("system"), c.get("code")) in codes]
        if not result["modality"]:
            del result["modality"]
    return result
