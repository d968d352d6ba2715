"""convert's fast header read (scp.sources.header_bytes): the same outcome as pydicom reading the
whole file, or no cut at all."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

import scp.sources.folder as folder
from mapping.header import HEADER_TAGS
from scp.sources.header_bytes import read_reduced
from tests.dicomgen import generate_study

TEST_FILES = sorted(p for p in Path(get_testdata_file("CT_small.dcm")).parent.rglob("*") if p.is_file())
CT_SMALL = Path(get_testdata_file("CT_small.dcm"))


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, record.levelname, record.getMessage()))


@pytest.fixture
def lines():
    handler, root = Lines(), logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


def outcome(path: Path, lines: Lines, monkeypatch, *, whole: bool) -> tuple:
    """read_outcome with its log lines, through the fast path or (whole) pydicom's whole-file read."""
    with monkeypatch.context() as patch:
        if whole:
            patch.setattr(folder, "_mapped_dataset", folder.read_dataset)
        lines.lines = []
        return folder.read_outcome(path), lines.lines


def cut(path: Path) -> pydicom.Dataset | None:
    with open(path, "rb") as fp:
        return read_reduced(fp, HEADER_TAGS)


@pytest.mark.parametrize("validation", ["warn", "raise"])
def test_every_pydicom_test_file_gives_the_outcome_and_log_lines_of_reading_it_whole(validation, lines,
                                                                                     monkeypatch):
    if validation == "raise":
        monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    cuts = 0
    for path in TEST_FILES:
        assert outcome(path, lines, monkeypatch, whole=False) == outcome(path, lines, monkeypatch, whole=True), path
        cuts += cut(path) is not None
    assert cuts > len(TEST_FILES) // 2  # most files take the fast path: the comparison means something


def test_generated_instances_are_cut_to_the_header_tags(tmp_path):
    path = generate_study(tmp_path, 1, 1).files[0]
    ds = cut(path)
    assert ds is not None
    assert set(ds.keys()) <= HEADER_TAGS | {min(pydicom.dcmread(path, stop_before_pixels=True).keys())}
    assert ds.file_meta.TransferSyntaxUID == pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ds.original_encoding == (False, True)


@pytest.mark.parametrize("name, end, reason", [
    ("CT_small.dcm", 100, folder.NOT_DICOM),  # in the preamble
    ("CT_small.dcm", 700, folder.INCOMPLETE),  # in a header value: pydicom reads what is there
    ("CT_small.dcm", -1000, folder.TRUNCATED),  # in the Pixel Data (138 bytes of padding follow it)
    ("JPEG2000.dcm", -100, folder.TRUNCATED),  # in encapsulated Pixel Data
])
def test_a_file_cut_short_is_left_to_pydicom_and_skipped_as_before(name, end, reason, tmp_path, lines, monkeypatch):
    data = Path(get_testdata_file(name)).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:end])
    assert cut(path) is None
    fast, whole = outcome(path, lines, monkeypatch, whole=False), outcome(path, lines, monkeypatch, whole=True)
    assert fast == whole and fast[0].reason == reason


def test_a_file_without_the_dicm_prefix_is_left_to_pydicom(tmp_path):
    (tmp_path / "bare.dcm").write_bytes(CT_SMALL.read_bytes()[132:])
    assert cut(tmp_path / "bare.dcm") is None


def test_a_deflated_data_set_is_left_to_pydicom(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert cut(tmp_path / "deflated.dcm") is None


def test_tags_out_of_order_are_left_to_pydicom(tmp_path):
    data = bytearray(CT_SMALL.read_bytes())
    ds = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    # Swap the tags of the first two data set elements (both short explicit VR): the order breaks.
    first = data.index(b"\x08\x00\x05\x00")  # SpecificCharacterSet, the first data set element
    (length,) = struct.unpack_from("<H", data, first + 6)
    second = first + 8 + length
    data[first:first + 4], data[second:second + 4] = data[second:second + 4], data[first:first + 4]
    (tmp_path / "swapped.dcm").write_bytes(bytes(data))
    assert ds.SpecificCharacterSet  # the element the test swaps is there
    assert cut(tmp_path / "swapped.dcm") is None

