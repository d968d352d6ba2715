"""Work done ahead of a study's completion, while the node is quiet.

The node tells the cache of every stored instance (`arrived`, from the receiver's
hot path: a dict update under a lock). While no instance has arrived for a moment,
the delivery worker parses the waiting instances' headers, then converts the waiting
studies, so that a completed study only leaves the sinks to run.

Headers are kept (with the sender their file meta records: what the worker puts is
opaque here) per spool file version (an instance received again is parsed again);
a study's conversion is kept with the exact set of instance versions it was made from
and used only when the completed part is exactly that set. Once a part completes,
its instances are the delivery's business (`completed`): they are no longer parsed
ahead, so a study waiting for a retry holds no headers in memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from scp.store.spool import Version

Clock = Callable[[], float]


class ParseAheadCache:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last_arrival = float("-inf")
        self._arrived: dict[str, set[str]] = {}  # study -> instances not yet in a completed part
        self._headers: dict[str, dict[str, tuple[Version, Any]]] = {}
        self._converted: dict[str, tuple[frozenset, Any]] = {}

    # --- fed by the receiver and the completion timer ---------------------------------------------

    def arrived(self, study_uid: str, sop_uid: str) -> bool:
        """An instance was stored (cheap: the receiver's hot path calls it); True for a new study."""
        now = self._clock()
        with self._lock:
            self._last_arrival = now
            waiting = self._arrived.get(study_uid)
            if waiting is None:
                self._arrived[study_uid] = {sop_uid}
                return True
            waiting.add(sop_uid)
            return False

    def completed(self, study_uid: str, sop_uids: Iterable[str]) -> None:
        """These instances are in a completed part now: no more work ahead for them."""
        with self._lock:
            waiting = self._arrived.get(study_uid)
            if waiting is not None:
                waiting.difference_update(sop_uids)
                if not waiting:
                    del self._arrived[study_uid]

    def quiet_for(self) -> float:
        """Seconds since the last instance of any study arrived."""
        now = self._clock()
        with self._lock:
            return now - self._last_arrival

    def waiting(self) -> dict[str, frozenset[str]]:
        """Study UID -> instances arrived and not yet in a completed part."""
        with self._lock:
            return {uid: frozenset(sops) for uid, sops in self._arrived.items()}

    # --- the work done ahead ----------------------------------------------------------------------

    def unparsed(self, study_uid: str, sop_uids: Iterable[str]) -> list[str]:
        with self._lock:
            known = self._headers.get(study_uid, {})
            return [sop for sop in sop_uids if sop not in known]

    def put(self, study_uid: str, sop_uid: str, version: Version, header: Any) -> None:
        """A parsed header (None: the file could not be used; the delivery reports it)."""
        with self._lock:
            self._headers.setdefault(study_uid, {})[sop_uid] = (version, header)

    def get(self, study_uid: str, sop_uid: str, version: Version) -> Any:
        with self._lock:
            entry = self._headers.get(study_uid, {}).get(sop_uid)
        return entry[1] if entry is not None and entry[0] == version else None

    def parsed(self, study_uid: str, sop_uids: Iterable[str]) -> tuple[dict[str, Version], list[Any]] | None:
        """(versions, headers) when every instance is parsed and usable, else None."""
        with self._lock:
            known = self._headers.get(study_uid, {})
            versions, headers = {}, []
            for sop in sop_uids:
                entry = known.get(sop)
                if entry is None or entry[1] is None:
                    return None
                versions[sop] = entry[0]
                headers.append(entry[1])
        return versions, headers

    def is_converted(self, study_uid: str, sop_uids: Iterable[str]) -> bool | None:
        """True: converted for exactly these instances; False: all parsed, not converted; None: not all parsed."""
        parsed = self.parsed(study_uid, sop_uids)
        if parsed is None:
            return None
        with self._lock:
            converted = self._converted.get(study_uid)
        return converted is not None and converted[0] == frozenset(parsed[0].items())

    def put_converted(self, study_uid: str, versions: dict[str, Version], resources: Any) -> None:
        with self._lock:
            self._converted[study_uid] = (frozenset(versions.items()), resources)

    def converted(self, study_uid: str, versions: dict[str, Version]) -> Any:
        """The conversion made from exactly these instance versions, else None."""
        with self._lock:
            entry = self._converted.get(study_uid)
        return entry[1] if entry is not None and entry[0] == frozenset(versions.items()) else None

    def drop(self, study_uid: str) -> None:
        """Forget the work done for a study (delivered, or waiting for a retry: memory stays flat)."""
        with self._lock:
            self._headers.pop(study_uid, None)
            self._converted.pop(study_uid, None)

    def __len__(self) -> int:
        """Headers held."""
        with self._lock:
            return sum(map(len, self._headers.values()))
