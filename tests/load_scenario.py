"""The load scenario shared by tests/test_load.py and benchmarks/load.py.

16 associations at once, 200 instances each, over 6 studies: one study is fed by 6
associations at the same time, one by 4, two by 2, two by 1 (3200 instances).
Every association sends its own series of its study, from pynetdicom in one process
(tests/scu.py), files sent as they are on disk (no re-encoding on the sending side).

The instances are a real CT header (pydicom's CT_small.dcm, about 39 KB) encoded once
per association; each instance's file is that encoding with its SOP Instance UID
substituted (UIDs of one length), which writes 3200 files in about a second instead of
the half minute pydicom takes to encode them one by one.
"""

from __future__ import annotations

import io
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import _config as pynetdicom_config

from tests.dicomgen import template_dataset
from tests.scu import associate

ASSOCIATIONS_PER_STUDY = (6, 4, 2, 2, 1, 1)  # 16 associations
INSTANCES_PER_ASSOCIATION = 200
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root


@dataclass(frozen=True)
class Feed:
    """What one association sends: a series of a study."""

    index: int
    study_uid: str
    series_uid: str
    files: tuple[Path, ...]

    @property
    def sop_uids(self) -> list[str]:
        return [p.stem for p in self.files]


@dataclass
class FeedResult:
    feed: Feed
    statuses: list[int | None] = field(default_factory=list)
    error: BaseException | None = None


@dataclass(frozen=True)
class LoadResult:
    results: tuple[FeedResult, ...]
    seconds: float  # from the first association opening to the last C-STORE answered

    @property
    def instances(self) -> int:
        return sum(len(r.statuses) for r in self.results)

    @property
    def throughput(self) -> float:
        return self.instances / self.seconds

    def failures(self) -> list[str]:
        problems = []
        for r in self.results:
            if r.error is not None:
                problems.append(f"association {r.feed.index}: {r.error!r}")
            bad = [s for s in r.statuses if s != 0x0000]
            if bad or len(r.statuses) != len(r.feed.files):
                problems.append(f"association {r.feed.index}: {len(r.statuses)} of {len(r.feed.files)} answered, "
                                f"non-success statuses {bad[:5]}")
        return problems


def make_feeds(root: Path, per_association: int = INSTANCES_PER_ASSOCIATION,
               associations_per_study: tuple[int, ...] = ASSOCIATIONS_PER_STUDY, seed: int = 0) -> list[Feed]:
    rng = random.Random(seed)
    run = f"{UID_ROOT}{rng.randrange(10**17, 10**18)}"
    template = template_dataset()
    feeds = []
    for study_index, count in enumerate(associations_per_study):
        study_uid = f"{run}.{study_index + 1}"
        for _ in range(count):
            index = len(feeds)
            series_uid = f"{run}.{study_index + 1}.{index + 1}"
            folder = Path(root) / f"assoc{index:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            # UID components of fixed width without leading zeros (PS3.5 9.1): 10-98, 10000-99998
            sop = [f"{run}.{index + 10}.{i + 10000}" for i in range(per_association)]
            placeholder = f"{run}.99.99999"
            template.StudyInstanceUID = study_uid
            template.SeriesInstanceUID = series_uid
            template.SeriesNumber = index + 1
            template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = placeholder
            buffer = io.BytesIO()
            template.save_as(buffer, enforce_file_format=True)
            encoded = buffer.getvalue()
            assert encoded.count(placeholder.encode()) == 2  # file meta and data set
            files = []
            for uid in sop:
                path = folder / f"{uid}.dcm"
                path.write_bytes(encoded.replace(placeholder.encode(), uid.encode()))
                files.append(path)
            feeds.append(Feed(index, study_uid, series_uid, tuple(files)))
    return feeds


def expected_per_study(feeds: list[Feed]) -> dict[str, set[str]]:
    studies: dict[str, set[str]] = {}
    for feed in feeds:
        studies.setdefault(feed.study_uid, set()).update(feed.sop_uids)
    return studies


def send_all(port: int, feeds: list[Feed], called: str = "FHIRSCP") -> LoadResult:
    """Every feed over its own association, all at once; returns each C-STORE's status."""
    chunked = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # the files go out as they are
    try:
        return _send_all(port, feeds, called)
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked


def _send_all(port: int, feeds: list[Feed], called: str) -> LoadResult:
    results = [FeedResult(feed) for feed in feeds]
    go = threading.Barrier(len(feeds) + 1)

    def send(result: FeedResult) -> None:
        try:
            assoc = associate(port, calling=f"LOAD{result.feed.index:02d}", called=called, timeout=60)
            go.wait()
            if not assoc.is_established:
                raise AssertionError("association not established")
            try:
                for path in result.feed.files:
                    result.statuses.append(getattr(assoc.send_c_store(path), "Status", None))
            finally:
                assoc.release()
        except BaseException as exc:
            result.error = exc
            go.abort()

    threads = [threading.Thread(target=send, args=(r,), name=f"load{r.feed.index}") for r in results]
    for thread in threads:
        thread.start()
    try:
        go.wait(120)
    except threading.BrokenBarrierError:
        pass
    started = time.monotonic()
    for thread in threads:
        thread.join()
    return LoadResult(tuple(results), time.monotonic() - started)
