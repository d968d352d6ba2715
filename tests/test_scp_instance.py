"""Reading a received data set just enough to spool it (scp.receive.dataset), on real files."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from mapping import InstanceHeader
from mapping.header import HEADER_TAGS
from scp.receive.dataset import BadInstance, header_file, parse_received
from scp.receive.status import CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH
from scp.store.part10 import header_dataset


def dataset_bytes(path) -> tuple[bytes, str]:
    """The data set as a C-STORE carries it (no file meta) and its transfer syntax."""
    raw = open(path, "rb").read()
    (meta_length,) = struct.unpack_from("<L", raw, 140)
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    return raw[144 + meta_length:], str(syntax)


def real_files():
    """pydicom's bundled test files with the four UIDs (not the truncated ones, refused on purpose)."""
    folder = Path(pydicom.data.__file__).parent / "test_files"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(folder.rglob("*.dcm")):
            if "truncated" in path.name:
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                if open(path, "rb").read(132)[128:] != b"DICM" or "TransferSyntaxUID" not in ds.file_meta:
                    continue
                if all(ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                           "SOPClassUID")):
                    yield path
            except Exception:
                continue


def _bytes_in(element) -> int:
    """Roughly the encoded size of an element (bulk values and sequences of them)."""
    if element.VR == "SQ":
        return sum(_bytes_in(e) for item in element.value for e in item)
    value = element.value
    return len(value) if isinstance(value, (bytes, str)) else 8


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                                  "image_dfl.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_the_uids_are_those_pydicom_reads_in_every_transfer_syntax(name):
    path = get_testdata_file(name)
    data, syntax = dataset_bytes(path)
    instance = parse_received(data, syntax)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert (instance.study_uid, instance.series_uid, instance.sop_uid, instance.sop_class_uid) == (
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)


def test_the_spooled_header_holds_every_element_before_pixel_data_and_no_pixel_data():
    checked = 0
    for path in real_files():
        data, syntax = dataset_bytes(path)
        instance = parse_received(data, syntax)
        spooled = pydicom.dcmread(io.BytesIO(b"".join(header_file(instance, "SENDER"))))
        original = pydicom.dcmread(path, stop_before_pixels=True)
        assert "PixelData" not in spooled
        kept = {e.tag for e in spooled}
        large = {e.tag for e in original if e.tag < 0x7FE00000 and _bytes_in(e) > 60 * 1024}
        assert {e.tag for e in original if e.tag < 0x7FE00000} - large <= kept, path
        assert spooled.file_meta.SourceApplicationEntityTitle == "SENDER"
        checked += 1
    assert checked > 30


def test_header_dataset_gives_the_mapping_the_same_header_as_pydicom():
    for path in real_files():
        data, syntax = dataset_bytes(path)
        spooled = b"".join(header_file(parse_received(data, syntax)))
        fast = InstanceHeader.from_dataset(header_dataset(spooled))
        assert fast == InstanceHeader.from_dataset(pydicom.dcmread(io.BytesIO(spooled))), path


def test_the_header_tags_alone_give_the_mapping_the_same_header_as_pydicom():
    # the delivery reads only mapping.header.HEADER_TAGS from each spooled header
    for path in real_files():
        data, syntax = dataset_bytes(path)
        spooled = b"".join(header_file(parse_received(data, syntax)))
        reduced = header_dataset(spooled, HEADER_TAGS)
        assert set(reduced.keys()) <= HEADER_TAGS, path
        assert InstanceHeader.from_dataset(reduced) == InstanceHeader.from_dataset(pydicom.dcmread(io.BytesIO(spooled))), path


def test_a_deflated_data_set_is_spooled_inflated_as_explicit_vr_little_endian():
    data, syntax = dataset_bytes(get_testdata_file("image_dfl.dcm"))
    instance = parse_received(data, syntax)
    assert instance.header_syntax == "1.2.840.10008.1.2.1"
    spooled = pydicom.dcmread(io.BytesIO(b"".join(header_file(instance))))
    assert spooled.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"])
def test_a_missing_uid_is_refused_with_0xA900_naming_it(keyword):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    delattr(ds, keyword)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    (meta_length,) = struct.unpack_from("<L", raw, 140)
    with pytest.raises(BadInstance) as caught:
        parse_received(raw[144 + meta_length:], "1.2.840.10008.1.2.1")
    assert caught.value.status == DATA_SET_DOES_NOT_MATCH
    assert keyword in caught.value.problem


def test_a_uid_that_is_not_a_file_name_is_refused():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = "../../etc/passwd"
    buffer = io.BytesIO()
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        ds.save_as(buffer, enforce_file_format=True)
    finally:
        pydicom.config.settings.writing_validation_mode = pydicom.config.WARN
    raw = buffer.getvalue()
    (meta_length,) = struct.unpack_from("<L", raw, 140)
    with pytest.raises(BadInstance, match="not a valid UID") as caught:
        parse_received(raw[144 + meta_length:], "1.2.840.10008.1.2.1")
    assert caught.value.status == DATA_SET_DOES_NOT_MATCH


@pytest.mark.parametrize("cut", [3, 500, 1500, 5000])
def test_a_truncated_data_set_is_refused_as_unparseable(cut):
    data, syntax = dataset_bytes(get_testdata_file("CT_small.dcm"))
    with pytest.raises(BadInstance) as caught:
        parse_received(data[:cut], syntax)
    assert caught.value.status in (CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH)


def test_garbage_is_refused_as_unparseable():
    with pytest.raises(BadInstance) as caught:
        parse_received(b"\x08\x00\x05\x00CS\xff\xff" + b"garbage" * 10, "1.2.840.10008.1.2.1")
    assert caught.value.status == CANNOT_UNDERSTAND
    with pytest.raises(BadInstance):
        parse_received(b"not deflate", "1.2.840.10008.1.2.1.99")
