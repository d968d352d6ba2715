"""A deletion on the source applied to each destination (disk file, FHIR ImagingStudy).

What is left is computed by mapping.removal; when nothing is, sync.on_delete decides:
"entered-in-error" (the default: the ImagingStudy stays, marked as a record that should
not exist, so references to it from reports or orders still resolve and the change can be
audited and undone), "delete" (the resource, or the output file, is removed) or "keep".
Only called after a complete listing or an exact change feed: never on a partial or
failed listing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace

from mapping import parse_resources, render
from mapping.fhirjson import study_search
from mapping.removal import remove_from_imaging_study
from scp.sinks import Sink
from scp.sinks.disk import DiskSink
from scp.store.layout import output_file
from scp.store.files import write_atomically

log = logging.getLogger("scp.sources.dicomweb.deletes")

ENTERED_IN_ERROR = "entered-in-error"


def reduced_study(study: dict, series_uids: Iterable[str], on_delete: str) -> dict | None | str:
    """The ImagingStudy to keep: reduced, marked entered-in-error, or "delete" / "keep" (what to do)."""
    left = remove_from_imaging_study(study, series_uids=series_uids) if series_uids else None
    if left is not None:
        return left
    if on_delete == ENTERED_IN_ERROR:
        return {**study, "status": ENTERED_IN_ERROR}
    return on_delete


def remove(sinks: Sequence[Sink], study_uid: str, series_uids: Iterable[str], on_delete: str) -> list[str]:
    """Apply one deletion (series_uids empty: the whole study) to every sink; what each did."""
    series_uids = list(series_uids)
    done = []
    for sink in sinks:
        if isinstance(sink, DiskSink):
            done.append(_remove_from_file(sink, study_uid, series_uids, on_delete))
        elif hasattr(sink, "client"):
            done.append(_remove_from_fhir(sink, study_uid, series_uids, on_delete))
    return done


def _remove_from_file(sink: DiskSink, study_uid: str, series_uids: list[str], on_delete: str) -> str:
    path = sink.output_dir / output_file(study_uid)
    if not path.exists():
        return f"{path} absent"
    resources = parse_resources(json.loads(path.read_text(encoding="utf-8")))
    outcome = reduced_study(resources.imaging_study, series_uids, on_delete)
    if outcome == "keep":
        return f"{path} kept"
    if outcome == "delete":
        path.unlink()
        return f"{path} deleted"
    doc = render(replace(resources, imaging_study=outcome), sink.shape)
    write_atomically(path, json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
    return f"{path} rewritten"


def _remove_from_fhir(sink, study_uid: str, series_uids: list[str], on_delete: str) -> str:
    context = f"study {study_uid}"
    reply = sink.client.request("GET", "ImagingStudy", params={"identifier": study_search(study_uid)},
                                expect=(200,), context=context)
    entries = [e.get("resource") for e in (reply.body or {}).get("entry") or []]
    studies = [r for r in entries if isinstance(r, dict) and r.get("resourceType") == "ImagingStudy"]
    if not studies:
        return "not on the FHIR server"
    study = studies[0]
    reference = f"ImagingStudy/{study['id']}"
    outcome = reduced_study(study, series_uids, on_delete)
    if outcome == "keep":
        return f"{reference} kept"
    if outcome == "delete":
        sink.client.request("DELETE", reference, expect=(200, 204), context=context)
        return f"{reference} deleted"
    version = (study.get("meta") or {}).get("versionId")
    headers = {"If-Match": f'W/"{version}"'} if version else {}
    sink.client.request("PUT", reference, body=outcome, headers=headers, expect=(200, 201), context=context)
    return f"{reference} {'marked entered-in-error' if outcome.get('status') == ENTERED_IN_ERROR else 'reduced'}"
