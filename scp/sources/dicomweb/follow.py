"""--follow: after the backfill, keep FHIR in step with the source.

Two change sources:

- Orthanc's /changes feed (sync.orthanc_url): exact and cheap. `StableStudy` (Orthanc's
  StableAge: no new instance for that long, the node's idle rule) delivers the study
  (fetched again in full and merged, so an instance added later arrives with the next
  StableStudy); `NewInstance` / `NewStudy` need nothing, a StableStudy follows them;
  a `Deleted` change of a study or series is propagated (scp.sources.dicomweb.deletes).
  Orthanc 1.10 (Debian 12) records no `Deleted` change in /changes (it removes a deleted
  resource's entries instead), so after each read of the feed the delivered studies and
  series are also compared with Orthanc's complete /studies and /series ID lists
  (reconcile_orthanc). The feed position (`since`) is in the checkpoint, taken before the
  backfill starts so nothing that changes during it is missed.
- Generic polling: the last sync.recent_days of StudyDate are listed every
  sync.poll_interval; a study whose series / instance count changed is delivered once the
  count stayed the same for sync.stable_age; a study gone from a window that was fully
  listed before is deleted. A listing that fails deletes nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from mapping.dicom_json import study_uid_of
from scp.sources.dicomweb.backfill import Syncer, signature
from scp.sources.dicomweb.client import DicomWebClient
from scp.sources.dicomweb.deletes import remove
from scp.sources.dicomweb.windows import recent_windows

log = logging.getLogger("scp.sources.dicomweb.follow")

PAGE = 200


def orthanc_client(syncer: Syncer) -> DicomWebClient:
    return DicomWebClient(syncer.sync.orthanc_url or "", syncer.sync, auth=syncer.client.auth)


def start_position(syncer: Syncer) -> None:
    """Before the backfill: remember where Orthanc's feed is now (once per checkpoint)."""
    if syncer.sync.orthanc_url and syncer.checkpoint.state.changes_since is None:
        last = orthanc_client(syncer).get_json("changes", {"last": ""}, context="Orthanc /changes")
        syncer.checkpoint.state.changes_since = int((last or {}).get("Last", 0))
        syncer.checkpoint.save(syncer.wall_clock())


def follow(syncer: Syncer, stop: threading.Event, *, today: Callable[[], dt.date]) -> None:
    if syncer.sync.orthanc_url:
        client = orthanc_client(syncer)
        while not stop.is_set():
            if not read_changes(syncer, client):
                reconcile_orthanc(syncer, client)
                stop.wait(syncer.sync.poll_interval)
    else:
        pending: dict[str, tuple[str, float]] = {}
        while not stop.is_set():
            poll(syncer, today(), pending)
            stop.wait(syncer.sync.poll_interval)


def read_changes(syncer: Syncer, client: DicomWebClient) -> bool:
    """Handle one page of Orthanc's changes; True when more are waiting."""
    state = syncer.checkpoint.state
    since = state.changes_since or 0
    page = client.get_json("changes", {"since": str(since), "limit": str(PAGE)}, context="Orthanc /changes") or {}
    for change in page.get("Changes") or []:
        kind, level, orthanc_id = change.get("ChangeType"), change.get("ResourceType"), change.get("ID", "")
        if kind == "StableStudy":
            study = client.get_json(f"studies/{orthanc_id}", context=f"Orthanc study {orthanc_id}", missing_ok=True)
            uid = ((study or {}).get("MainDicomTags") or {}).get("StudyInstanceUID")
            if uid:
                syncer.sync_study(uid, "")
        elif kind == "Deleted" and level in ("Study", "Series"):
            known = state.orthanc_ids.get(orthanc_id)
            if known is None:
                log.info("Orthanc deleted %s %s, which this sync never delivered", level.lower(), orthanc_id)
            else:
                study_uid, series_uid = known
                done = remove(syncer.sinks, study_uid, [series_uid] if series_uid else [], syncer.sync.on_delete)
                log.info("study %s: %s deleted on the source: %s", study_uid,
                         f"series {series_uid}" if series_uid else "the study", "; ".join(done))
                syncer.report.removed += 1
                if not series_uid:
                    state.studies.pop(study_uid, None)
        state.changes_since = int(change.get("Seq", since))
        state.last_change = syncer.wall_clock()
    state.changes_since = int(page.get("Last", state.changes_since or 0))
    syncer.checkpoint.save(syncer.wall_clock())
    return not page.get("Done", True)


def reconcile_orthanc(syncer: Syncer, client: DicomWebClient) -> None:
    """Deletions: Orthanc 1.10 drops a deleted resource's entries from /changes and logs no
    Deleted change there, so the studies and series delivered are compared with Orthanc's
    complete lists of study and series IDs (two cheap requests). A failed listing raises
    before anything is removed."""
    state = syncer.checkpoint.state
    if not state.orthanc_ids:
        return
    studies = set(client.get_json("studies", context="Orthanc /studies") or [])
    series = set(client.get_json("series", context="Orthanc /series") or [])
    gone_studies = {uid for oid, (uid, series_uid) in state.orthanc_ids.items() if not series_uid and oid not in studies}
    for oid, (study_uid, series_uid) in sorted(state.orthanc_ids.items()):
        if series_uid and oid not in series and study_uid not in gone_studies:
            _removed(syncer, study_uid, series_uid)
    for study_uid in sorted(gone_studies):
        _removed(syncer, study_uid, "")
    state.orthanc_ids = {oid: ids for oid, ids in state.orthanc_ids.items()
                         if (oid in series if ids[1] else oid in studies)}
    if gone_studies or len(state.orthanc_ids) != len(studies | series):
        syncer.checkpoint.save(syncer.wall_clock())


def _removed(syncer: Syncer, study_uid: str, series_uid: str) -> None:
    done = remove(syncer.sinks, study_uid, [series_uid] if series_uid else [], syncer.sync.on_delete)
    log.info("study %s: %s deleted on the source: %s", study_uid,
             f"series {series_uid}" if series_uid else "the study", "; ".join(done))
    syncer.report.removed += 1
    syncer.checkpoint.state.last_change = syncer.wall_clock()
    if not series_uid:
        syncer.checkpoint.state.studies.pop(study_uid, None)


def poll(syncer: Syncer, today: dt.date, pending: dict[str, tuple[str, float]]) -> None:
    """One poll of the recent windows (see the module docstring)."""
    state = syncer.checkpoint.state
    now = syncer.wall_clock()
    for window in recent_windows(today, syncer.sync.recent_days):
        found = syncer.list_studies(window)  # raises on a failed listing: nothing below runs
        listed = {study_uid_of(obj): signature(obj) for obj in found}
        for uid in sorted(set(state.listed.get(window.key, ())) - set(listed)):
            done = remove(syncer.sinks, uid, [], syncer.sync.on_delete)
            log.info("study %s: gone from the source: %s", uid, "; ".join(done))
            state.studies.pop(uid, None)
            syncer.report.removed += 1
        for uid, sig in listed.items():
            if state.studies.get(uid) == sig:
                pending.pop(uid, None)
                continue
            seen = pending.get(uid)
            if seen is None or seen[0] != sig:
                pending[uid] = (sig, now)  # new or still changing: wait until it is stable
            elif now - seen[1] >= syncer.sync.stable_age:
                if syncer.sync_study(uid, sig):
                    pending.pop(uid, None)
                    state.last_change = now
        state.listed[window.key] = sorted(listed)
    syncer.checkpoint.save(now)
