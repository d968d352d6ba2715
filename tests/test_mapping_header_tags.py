"""HEADER_TAGS: every top-level element InstanceHeader.from_dataset reads, so a reader may hand
it those alone (convert's fast path, scp.sources.header_bytes) and get the same header."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset

from mapping import InstanceHeader, MappingError
from mapping.header import HEADER_TAGS
from tests.mapping_cases import read

TEST_FILES = sorted(p for p in Path(get_testdata_file("CT_small.dcm")).parent.rglob("*") if p.is_file())
CHARSET_FILES = sorted(Path(p) for p in get_charset_files("*.dcm"))


class RecordingElements(dict):
    """A Dataset's element dict that records which tags are looked up (None: all of them, by iteration)."""

    def __init__(self, elements: dict) -> None:
        super().__init__(elements)
        self.read: set[int] | None = set()

    def _note(self, tag) -> None:
        if self.read is not None:
            self.read.add(int(tag))

    def __getitem__(self, tag):
        self._note(tag)
        return super().__getitem__(tag)

    def __contains__(self, tag) -> bool:
        self._note(tag)
        return super().__contains__(tag)

    def get(self, tag, default=None):
        self._note(tag)
        return super().get(tag, default)

    def _all(self) -> None:
        self.read = None

    def __iter__(self):
        self._all()
        return super().__iter__()

    def keys(self):
        self._all()
        return super().keys()

    def values(self):
        self._all()
        return super().values()

    def items(self):
        self._all()
        return super().items()


def readable(path: Path) -> Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read(path)
        except Exception:  # not DICOM, or broken beyond reading: nothing for the mapping
            return None


def header_or_error(ds: Dataset) -> InstanceHeader | str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return InstanceHeader.from_dataset(ds)
        except MappingError as exc:
            return str(exc)


@pytest.mark.parametrize("path", TEST_FILES + CHARSET_FILES, ids=lambda p: p.name)
def test_from_dataset_reads_no_top_level_element_outside_header_tags(path):
    ds = readable(path)
    if ds is None:
        pytest.skip("pydicom cannot read it")
    ds._dict = recording = RecordingElements(ds._dict)
    header_or_error(ds)
    assert recording.read is not None, "from_dataset iterated over every element"
    assert recording.read <= HEADER_TAGS, [f"{t:08X}" for t in sorted(recording.read - HEADER_TAGS)]


@pytest.mark.parametrize("path", TEST_FILES + CHARSET_FILES, ids=lambda p: p.name)
def test_a_dataset_of_the_header_tags_alone_gives_the_same_header(path):
    ds = readable(path)
    if ds is None:
        pytest.skip("pydicom cannot read it")
    alone = readable(path)
    for tag in [tag for tag in alone.keys() if tag not in HEADER_TAGS]:
        del alone[tag]
    assert header_or_error(alone) == header_or_error(ds)
