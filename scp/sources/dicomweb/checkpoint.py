"""What a sync has done, kept in SPOOL/sync/checkpoint.json (written atomically).

One file per source URL (a hash of it names the file), so two syncs from two servers
never share one. It holds the windows fully listed and delivered (a resumed backfill
skips them), whether the undated-studies listing finished, each delivered study's
signature (series and instance counts, so an unchanged study is neither fetched nor
sent again), studies that failed (tried again on the next run), Orthanc's /changes
position, and when the last change was seen (the lag `status` shows).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scp.store.files import write_atomically

FOLDER = "sync"


@dataclass
class SyncState:
    source: str = ""
    windows_done: list[str] = field(default_factory=list)  # Window.key of each finished window
    undated_done: bool = False
    studies: dict[str, str] = field(default_factory=dict)  # study UID -> signature delivered
    listed: dict[str, list[str]] = field(default_factory=dict)  # window key -> studies seen (for deletes)
    failed: dict[str, str] = field(default_factory=dict)  # study UID -> why (tried again next run)
    changes_since: int | None = None  # Orthanc /changes: the last Seq handled
    backfill_finished: float | None = None  # epoch seconds
    last_change: float | None = None  # epoch seconds: the newest change handled (lag in `status`)
    orthanc_ids: dict[str, list[str]] = field(default_factory=dict)  # Orthanc ID -> [study UID, series UID]
    updated: float | None = None


def checkpoint_path(spool_dir: Path, source: str) -> Path:
    digest = hashlib.sha256(source.rstrip("/").encode()).hexdigest()[:16]
    return Path(spool_dir) / FOLDER / f"checkpoint-{digest}.json"


class Checkpoint:
    """The state and its file; `save` is atomic and thread-safe (workers record studies in parallel)."""

    def __init__(self, path: Path, state: SyncState) -> None:
        self.path = path
        self.state = state
        self.lock = threading.RLock()

    @classmethod
    def load(cls, spool_dir: Path, source: str) -> Checkpoint:
        path = checkpoint_path(spool_dir, source)
        state = read_state(path) or SyncState(source=source.rstrip("/"))
        return cls(path, state)

    def save(self, now: float) -> None:
        with self.lock:
            self.state.updated = now
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, json.dumps(asdict(self.state), indent=1, sort_keys=True).encode())


def read_state(path: Path) -> SyncState | None:
    """The state in a checkpoint file, None when there is none; ValueError naming the file when unreadable."""
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable sync checkpoint ({exc})") from None
    known = SyncState.__dataclass_fields__
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: unreadable sync checkpoint (not an object)")
    return SyncState(**{k: v for k, v in raw.items() if k in known})


def all_checkpoints(spool_dir: Path) -> list[SyncState]:
    folder = Path(spool_dir) / FOLDER
    states = []
    for path in sorted(folder.glob("checkpoint-*.json")) if folder.is_dir() else []:
        try:
            state = read_state(path)
        except ValueError:
            continue
        if state is not None:
            states.append(state)
    return states
