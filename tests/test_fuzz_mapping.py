"""Bad input through the mapping (issue 5, "bad input", first half): hypothesis-generated instances.

The instances are built as bytes, the way senders deliver them, and read back with pydicom
(`dcmread(stop_before_pixels=True)`, as the node and `convert` do), so pydicom's lazy decoding
(character sets, numbers, wrong VRs) happens inside the mapping, where it happens in production.
What is generated: the elements the mapping reads, each present or not, with broken dates and
times, oversized strings, numbers that are not numbers, wrong VRs (explicit VR), values in a
character set other than the declared one, unknown or multi-valued character sets, malformed
code sequences, plus random standard and private tags with random VRs and bytes.

The rules:
- InstanceHeader.from_dataset and convert_study raise nothing but DicomFhirError subclasses;
- what they return renders in both shapes to JSON that fhir.resources.R4B accepts, and that
  parse_resources reads back to the same document;
- warnings never quote the patient's name or ID.

Deterministic in CI (derandomized, no example database); max 200 examples per rule.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import struct

import pydicom
import pytest
from fhir.resources import get_fhir_model_class as r5_model_class
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import HealthCheck, assume, event, example, given, reject, settings
from hypothesis import strategies as st
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from mapping import (SHAPES, DicomFhirError, InstanceHeader, MappingError, MappingOptions, convert_study,
                     merge_resources, parse_resources, render, validate_resources)
from tests.conftest import IN_CI

# pydicom warns (rightly) about every malformed value; the rules here are about what the mapping does.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# FUZZ_EXAMPLES=5000 to search harder locally; CI runs the same 200 examples every time.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None, derandomize=IN_CI,
                database=None if IN_CI else settings().database,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# ---------------------------------------------------------------------------------------------
# Encoding: elements → bytes (explicit or implicit VR little endian), then pydicom reads them.
# An element is (tag, vr, value) with value bytes, or for SQ a list of items (lists of elements).

ALL_VRS = ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL",
           "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US",
           "UT", "UV")
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}

ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF


def _tag(tag: int) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF)


def encode(elements, explicit: bool) -> bytes:
    out = bytearray()
    for tag, vr, value in sorted(elements, key=lambda e: e[0]):
        if vr == "SQ":
            body = b"".join(_item(item, explicit) for item in value)
            out += _header(tag, "SQ", UNDEFINED, explicit) + body + _tag(SEQ_END) + b"\0\0\0\0"
            continue
        if explicit and vr not in LONG_VRS:
            value = value[:0xFFFE]
        if len(value) % 2:
            value += b" " if vr in TEXT_VRS else b"\0"
        out += _header(tag, vr, len(value), explicit) + value
    return bytes(out)


def _item(elements, explicit: bool) -> bytes:
    return _tag(ITEM) + struct.pack("<I", UNDEFINED) + encode(elements, explicit) + _tag(ITEM_END) + b"\0\0\0\0"


def _header(tag: int, vr: str, length: int, explicit: bool) -> bytes:
    if not explicit:
        return _tag(tag) + struct.pack("<I", length)
    if vr in LONG_VRS:
        return _tag(tag) + vr.encode() + b"\0\0" + struct.pack("<I", length)
    return _tag(tag) + vr.encode() + struct.pack("<H", length)


def part10(elements, explicit: bool, sop_class: bytes, sop_instance: bytes) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _printable_uid(sop_class, "1.2.840.10008.5.1.4.1.1.2")
    meta.MediaStorageSOPInstanceUID = _printable_uid(sop_instance, "1.2.3.4")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    fp = io.BytesIO()
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue() + encode(elements, explicit)


def _printable_uid(value: bytes, fallback: str) -> str:
    text = value.decode("ascii", "ignore").strip("\0 ")
    return text if text and all(c in "0123456789." for c in text) and len(text) <= 64 else fallback


def read(data: bytes) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except AttributeError as exc:
        # pydicom 3.0 itself crashes reading some SpecificCharacterSet encodings (values.convert_value
        # asks a DataElement for .length): no Dataset exists to map, so the example is not one. The
        # node never meets this: the folder converter skips such a file as corrupt, the receiver
        # does not use dcmread. Seen with @reproduce_failure('6.170.17', b'AXicjVCJCYBADGsEcQ...').
        if "length" not in str(exc):
            raise
        reject()


# ---------------------------------------------------------------------------------------------
# Values. Strategies are built once at import (hypothesis validates each new strategy object, which
# dominated the run time when composites built them per draw); the helpers below take `draw`.


@functools.lru_cache(maxsize=None)
def one_in(n: int):
    """True about once in n draws. Hypothesis favours the bounds of a range (0 and n-1 come up far
    more often than 1/n), so the rare case is a value from the middle."""
    return st.integers(0, n - 1).map(lambda i: i == n // 2)


CHARSETS = ("", "ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 144", "ISO_IR 127", "ISO_IR 126",
            "ISO_IR 138", "ISO_IR 148", "ISO_IR 13", "ISO_IR 166", "ISO_IR 192", "GB18030", "GBK",
            "ISO 2022 IR 6", "ISO 2022 IR 87", "ISO 2022 IR 13", "ISO 2022 IR 149", "ISO 2022 IR 58",
            "ISO 2022 IR 100", "\\ISO 2022 IR 87", "ISO 2022 IR 6\\ISO 2022 IR 87\\ISO 2022 IR 159",
            "ISO_IR 100\\ISO_IR 192", "ISO-IR 100", "ISO_IR100", "UTF-8", "utf8", "bogus", "ISO_IR 999")
CODECS = ("ascii", "latin_1", "iso8859_2", "iso8859_5", "iso8859_7", "iso8859_8", "shift_jis", "iso2022_jp",
          "euc_kr", "gb18030", "gbk", "utf-8", "utf-16-le", "cp1252", "koi8_r")
charsets = st.lists(st.sampled_from(CHARSETS), min_size=1, max_size=2).map(lambda v: "\\".join(v).encode())
codecs = st.sampled_from(CODECS)

# Characters that break naive handling: DICOM delimiters, control characters, escapes, NUL,
# non-BMP, combining marks, RTL, BOM, whitespace of every kind.
NASTY = "\\^=|\0\x1b\t\r\n\x0b\x0c\x7f\x85\u00a0\u2028\ufeff\u200b\u0301\u05d0\U0001f600 %$&<>\"'"
text_chars = st.one_of(st.characters(codec="utf-8"), st.sampled_from(NASTY))
short_text = st.text(text_chars, max_size=24)
oversized = st.tuples(st.text(text_chars, min_size=1, max_size=3), st.integers(65, 20000)).map(lambda t: t[0] * t[1])
small_binary = st.binary(max_size=40)


def encoded(text=short_text):
    """A str encoded with some codec (often not the declared character set); one in ten raw bytes."""
    as_text = st.tuples(text, codecs).map(lambda t: t[0].encode(t[1], errors="replace"))
    return either(one_in(10), small_binary, as_text)


def either(condition, if_true, if_false):
    """One strategy or the other, drawing only the one chosen."""
    @st.composite
    def choose(draw):
        return draw(if_true if draw(condition) else if_false)
    return choose()


encoded_oversized = encoded(oversized)


def text_value(kind):
    """A value of the given kind in some encoding; one in eight oversized."""
    return either(one_in(8), encoded_oversized, encoded(kind))


def ascii_bytes(strategy):
    return strategy.map(lambda s: s.encode("ascii", errors="replace"))


digits = st.text("0123456789", min_size=0, max_size=16)
dates = st.one_of(
    st.dates().map(lambda d: d.strftime("%Y%m%d")),
    st.dates().map(lambda d: d.strftime("%Y.%m.%d")),  # legacy ACR-NEMA
    st.dates().map(lambda d: d.strftime("%Y-%m-%d")),
    st.sampled_from(["2005", "200509", "00000000", "20051301", "20050230", "99999999", "19000101", "1",
                     "20050906-20050907", "-20050906", "20050906\\20050907", "        ", "2005 09 06"]),
    digits, st.text("0123456789.-: TZ+", max_size=20))
times = st.one_of(
    st.times().map(lambda t: t.strftime("%H%M%S.%f")),
    st.times().map(lambda t: t.strftime("%H%M")), st.times().map(lambda t: t.strftime("%H")),
    st.times().map(lambda t: t.strftime("%H:%M:%S")),
    st.sampled_from(["246060", "2400", "235960", "10.5", ".123", "101530.1234567", "1015-0100", "-", "10\\11",
                     "101530.", "1015301"]),
    digits, st.text("0123456789.:+-", max_size=20))
offsets = st.one_of(st.sampled_from(["+0000", "-0000", "+0100", "-0330", "+1400", "-1200", "0", "+2500",
                                     "+01:00", "0100", "+01", "+0160", "UTC", "+000000"]),
                    st.text("0123456789+-:", max_size=8))
integers = st.one_of(st.integers(-2**70, 2**70).map(str),
                     st.sampled_from(["1.0", "1.5", "1e3", "-0", " 12 ", "NaN", "inf", "-inf", "1e400", "0x10",
                                      "1\\2", "", "+7", "٣"]),
                     digits)
valid_uids = st.lists(st.integers(0, 10**7), min_size=1, max_size=6).map(lambda p: "1.2." + ".".join(map(str, p)))
bad_uids = st.one_of(st.sampled_from(["", " ", "\0", "1.2.3\0", " 1.2.3 ", "1.2.3\\1.2.4", "1..2", "1.2.", "0.1",
                                      "a.b.c", "1." + "1" * 70, "1.2.3 4"]), short_text)
# Mostly valid (so most examples get past the four required UIDs), one in ten not.
uids = ascii_bytes(either(one_in(10), bad_uids, valid_uids))
sexes = st.one_of(st.sampled_from(["M", "F", "O", "", "m", "f", "U", "X", "MALE", "female", "M\\F", " M "]),
                  short_text)
person_names = st.lists(st.lists(short_text, max_size=6).map("^".join), min_size=1, max_size=4).map("=".join)
SOP_CLASSES = ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.88.22",
               "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.1"]

# What the mapping reads, by tag: (expected VR, strategy for the value bytes).
HEADER_TAGS = {
    0x00080008: ("CS", encoded(st.lists(short_text, max_size=5).map("\\".join))),  # ImageType
    0x00080016: ("UI", st.one_of(uids, st.sampled_from(SOP_CLASSES).map(str.encode))),  # SOPClassUID
    0x00080018: ("UI", uids),  # SOPInstanceUID
    0x00080020: ("DA", ascii_bytes(dates)),  # StudyDate
    0x00080021: ("DA", ascii_bytes(dates)),  # SeriesDate
    0x00080030: ("TM", ascii_bytes(times)),  # StudyTime
    0x00080031: ("TM", ascii_bytes(times)),  # SeriesTime
    0x00080050: ("SH", text_value(short_text)),  # AccessionNumber
    0x00080060: ("CS", text_value(st.one_of(st.sampled_from(["CT", "MR", "SR", "OT", "ct", "C T", "CT\\MR"]),
                                            short_text))),  # Modality
    0x00080080: ("LO", text_value(short_text)),  # InstitutionName
    0x00080090: ("PN", text_value(person_names)),  # ReferringPhysicianName
    0x00080201: ("SH", ascii_bytes(offsets)),  # TimezoneOffsetFromUTC
    0x00081030: ("LO", text_value(short_text)),  # StudyDescription
    0x0008103E: ("LO", text_value(short_text)),  # SeriesDescription
    0x00081040: ("LO", text_value(short_text)),  # InstitutionalDepartmentName
    0x00081060: ("PN", text_value(st.lists(person_names, max_size=3).map("\\".join))),  # NameOfPhysiciansReadingStudy
    0x00100010: ("PN", text_value(person_names)),  # PatientName
    0x00100020: ("LO", text_value(short_text)),  # PatientID
    0x00100021: ("LO", text_value(st.one_of(st.sampled_from(["1.2.3.4", "urn:oid:1.2.3", "HOSP A", "http://x y"]),
                                            short_text))),  # IssuerOfPatientID
    0x00100030: ("DA", ascii_bytes(dates)),  # PatientBirthDate
    0x00100040: ("CS", text_value(sexes)),  # PatientSex
    0x00180015: ("CS", text_value(st.one_of(st.sampled_from(["CHEST", "HEAD", "chest", "ABDOMENPELVIS", "XYZ"]),
                                            short_text))),  # BodyPartExamined
    0x0020000D: ("UI", uids),  # StudyInstanceUID
    0x0020000E: ("UI", uids),  # SeriesInstanceUID
    0x00200011: ("IS", ascii_bytes(integers)),  # SeriesNumber
    0x00200013: ("IS", ascii_bytes(integers)),  # InstanceNumber
    0x00200060: ("CS", text_value(st.sampled_from(["R", "L", "B", "U", "", "r", "X", "R\\L"]))),  # Laterality
    0x00200062: ("CS", text_value(st.sampled_from(["R", "L", "B", "U", "", "x"]))),  # ImageLaterality
    0x00401002: ("LO", text_value(short_text)),  # ReasonForTheRequestedProcedure
    0x00420010: ("ST", text_value(short_text)),  # DocumentTitle
}
CODE_SEQUENCES = (0x00081032, 0x0040100A, 0x0040A043)  # ProcedureCode, ReasonForRequestedProcedureCode, ConceptName
ISSUER_SEQUENCE = 0x00080051  # IssuerOfAccessionNumberSequence
CODE_ITEM = {
    0x00080100: ("SH", text_value(st.one_of(st.sampled_from(["113724", "T-D3000", "121", ""]), short_text))),
    0x00080102: ("SH", text_value(st.one_of(st.sampled_from(["DCM", "SCT", "SRT", "LN", "99LOCAL", "", "L N"]),
                                            short_text))),
    0x00080103: ("SH", text_value(short_text)),  # CodingSchemeVersion
    0x00080104: ("LO", text_value(short_text)),  # CodeMeaning
    0x00080119: ("UC", text_value(short_text)),  # LongCodeValue
    0x00080120: ("UR", text_value(st.one_of(st.sampled_from(["urn:oid:1.2", "http://a b"]), short_text))),  # URNCode
}
ISSUER_ITEM = {
    0x00400031: ("UT", text_value(short_text)),  # LocalNamespaceEntityID
    0x00400032: ("UT", text_value(st.one_of(st.sampled_from(["1.2.3", "http://h.example/acc", "x y"]),
                                            short_text))),
    0x00400033: ("CS", text_value(st.sampled_from(["ISO", "URI", "UUID", "DNS", "X400", "", "iso"]))),
}
SPECIFIC_CHARACTER_SET = 0x00080005
# Patient and study level: the same in every instance of a study (usually; see instances()).
STUDY_LEVEL = frozenset({SPECIFIC_CHARACTER_SET, 0x00080020, 0x00080030, 0x00080050, ISSUER_SEQUENCE, 0x00080080,
                         0x00080090, 0x00080201, 0x00081030, 0x00081032, 0x00081040, 0x00081060, 0x00100010,
                         0x00100020, 0x00100021, 0x00100030, 0x00100040, 0x0040100A, 0x00401002})
REQUIRED = frozenset({0x0020000D, 0x0020000E, 0x00080016, 0x00080018})

random_groups = st.sampled_from([0x0008, 0x0009, 0x0010, 0x0011, 0x0018, 0x0020, 0x0029, 0x0032, 0x0040, 0x0042,
                                 0x0054, 0x0088, 0x4001])
random_elements = st.one_of(st.integers(1, 0xFFFF), st.sampled_from([0x0010, 0x1010, 0x0020, 0x1030]))
any_vr = st.sampled_from(ALL_VRS)
any_vr_but_sq = st.sampled_from([v for v in ALL_VRS if v != "SQ"])
any_bytes = st.one_of(st.binary(max_size=64), encoded())
item_count = st.integers(0, 3)
extra_count = st.integers(0, 3)
text_sequence_tags = st.sampled_from([*CODE_SEQUENCES, ISSUER_SEQUENCE])


def draw_random_element(draw, depth: int = 0):
    """Any tag (standard or private) with any VR and arbitrary bytes."""
    tag = draw(random_groups) << 16 | draw(random_elements)
    vr = draw(any_vr)
    if vr == "SQ":
        return (tag, vr, draw_items(draw, depth + 1) if depth < 2 else [])
    return (tag, vr, draw(any_bytes))


def draw_element(draw, tag: int, expected_vr: str, value, explicit: bool):
    """Usually the right VR; one in ten a wrong one (explicit VR only), keeping the value bytes."""
    vr = draw(any_vr_but_sq) if explicit and draw(one_in(10)) else expected_vr
    return (tag, vr, draw(value))


def draw_items(draw, depth: int, table=CODE_ITEM):
    result = []
    for _ in range(draw(item_count)):
        item = [(tag, vr, draw(value)) for tag, (vr, value) in table.items() if draw(st.booleans())]
        if draw(one_in(5)):
            item.append(draw_random_element(draw, depth))
        result.append(_dedupe(item))
    return result


def _dedupe(elements):
    seen: dict[int, tuple] = {}
    for element in elements:
        seen.setdefault(element[0], element)
    return list(seen.values())


def draw_instance(draw, study_uid: bytes, series_uid: bytes, explicit: bool, patient=None, skip=frozenset()):
    """The elements of one instance: the header tags (each maybe absent) and random extras.

    patient: {tag: value bytes} always used for those tags (PatientName, PatientID).
    skip: tags not to generate.
    """
    elements = []
    if SPECIFIC_CHARACTER_SET not in skip and not draw(one_in(4)):
        elements.append((SPECIFIC_CHARACTER_SET, "CS", draw(charsets)))
    fixed = {0x0020000D: study_uid, 0x0020000E: series_uid}
    for tag, (vr, value) in HEADER_TAGS.items():
        if tag in skip:
            continue
        if patient and tag in patient:
            elements.append((tag, vr, patient[tag]))
            continue
        missing = draw(one_in(50)) if tag in REQUIRED else draw(st.booleans())
        if missing:  # rarely for the four UIDs: most examples should get past them
            continue
        if tag in fixed and not draw(one_in(10)):
            elements.append((tag, vr, fixed[tag]))
        else:
            elements.append(draw_element(draw, tag, vr, value, explicit))
    for tag in CODE_SEQUENCES:
        if tag not in skip and draw(one_in(3)):
            elements.append((tag, "SQ", draw_items(draw, 1)))
    if ISSUER_SEQUENCE not in skip and draw(one_in(4)):
        elements.append((ISSUER_SEQUENCE, "SQ", draw_items(draw, 1, ISSUER_ITEM)))
    elements += [draw_random_element(draw) for _ in range(draw(extra_count))]
    if explicit and draw(one_in(10)):  # a sequence tag sent as text
        tag = draw(text_sequence_tags)
        if tag not in skip:
            elements = [e for e in elements if e[0] != tag] + [(tag, "LO", draw(any_bytes))]
    return _dedupe(elements)


@st.composite
def instances(draw, patient=None, most=4, fewest=1):
    """`fewest` to `most` instances of (usually) one study and patient, as pydicom reads them from bytes.

    Study-level values are drawn once and shared; one instance in ten has its own (another
    patient, another date...), and one in ten another StudyInstanceUID.
    """
    explicit = draw(st.booleans())
    study = draw(uids)
    series = [draw(uids) for _ in range(draw(st.integers(1, 2)))]
    shared = [e for e in draw_instance(draw, study, series[0], explicit, patient) if e[0] in STUDY_LEVEL]
    datasets = []
    for _ in range(draw(st.integers(fewest, most))):
        study_uid = draw(uids) if draw(one_in(10)) else study
        own_study_level = draw(one_in(10))
        elements = draw_instance(draw, study_uid, draw(st.sampled_from(series)), explicit, patient,
                                 skip=frozenset() if own_study_level else STUDY_LEVEL)
        if not own_study_level:
            elements = _dedupe(elements + shared)
        by_tag = {e[0]: e[2] for e in elements}
        data = part10(elements, explicit, by_tag.get(0x00080016, b""), by_tag.get(0x00080018, b""))
        datasets.append(read(data))
    return datasets


options = st.builds(
    MappingOptions,
    patient_identifier_system=st.sampled_from([None, "urn:oid:1.2.3.4", "http://hospital.example/mrn"]),
    use_issuer_of_patient_id=st.booleans(),
    accession_system=st.sampled_from([None, "http://hospital.example/accession"]),
    timezone=st.sampled_from([None, "Europe/Berlin", "UTC", "Pacific/Chatham", "America/St_Johns"]),
    dicomweb_url=st.sampled_from([None, "https://pacs.example/dicom-web"]),
    fhir_version=st.sampled_from(["R4", "R5"]))  # every rule below holds for both releases


# ---------------------------------------------------------------------------------------------
# The rules


def usable_headers(datasets, rejections=None):
    """The InstanceHeaders of the instances the mapping accepts (the node refuses the others
    one by one with a failure status and goes on with the rest of the study)."""
    headers = []
    for ds in datasets:
        try:
            headers.append(InstanceHeader.from_dataset(ds))
        except DicomFhirError as exc:
            event(f"instance rejected: {type(exc).__name__}")
            if rejections is not None:
                rejections.append(str(exc))
    return headers


def check_valid_fhir(resources) -> None:
    """The edge a sink applies before writing (validate_resources), then what it writes."""
    try:
        validate_resources(resources)
    except MappingError as exc:  # a project error, named without values: the study is set aside
        event(f"rejected at the edge: {type(exc).__name__}")
        return
    event("converted and rendered")
    for shape in SHAPES:
        document = render(resources, shape)
        text = json.dumps(document, ensure_ascii=False, allow_nan=False)  # JSON-ready: no bytes, dates, NaN
        model = (r5_model_class if resources.fhir_version == "R5" else get_fhir_model_class)(document["resourceType"])
        model.model_validate(json.loads(text))
        assert render(parse_resources(document), shape) == document


@FUZZ
@given(datasets=instances(most=1))
def test_reading_a_header_raises_only_project_errors(datasets):
    for ds in datasets:
        try:
            header = InstanceHeader.from_dataset(ds)
        except DicomFhirError:
            continue
        assert header.study_uid and header.series_uid and header.sop_instance_uid and header.sop_class_uid


def converted(datasets, opts):
    """The study of the usable instances, converted; None when the mapping rejects it with a project error
    (the rule of each test is about what a study that converts gives)."""
    headers = usable_headers(datasets)
    assume(headers)
    try:
        return convert_study(headers, opts)
    except DicomFhirError as exc:
        event(f"study rejected: {type(exc).__name__}")
        return None


@FUZZ
@given(datasets=instances(), opts=options)
def test_converting_a_study_raises_only_project_errors_and_gives_valid_fhir(datasets, opts):
    resources = converted(datasets, opts)
    if resources is None:
        return
    check_valid_fhir(resources)


@FUZZ
@given(datasets=instances(), opts=options)
def test_converting_datasets_directly_raises_only_project_errors_and_gives_valid_fhir(datasets, opts):
    try:
        resources = convert_study(datasets, opts)
    except DicomFhirError as exc:
        event(f"study rejected: {type(exc).__name__}")
        return
    check_valid_fhir(resources)


# The primitive rules of the project's FHIR test server (Medplum's validationRegexes,
# tests/fhir_server): a string holds no control character but TAB, CR and LF; a uri no whitespace.
# fhir.resources does not check these, a FHIR server does.
FHIR_STRING = re.compile(r"[\t\r\n\u0020-\U0010FFFF]+")
FHIR_URI = re.compile(r"[^\s\ufeff]*")
URI_KEYS = frozenset({"system", "url", "address", "fullUrl"})


def primitive_problems(node, path=()):
    """(path, problem) for every string in a rendered document that a FHIR server would refuse."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from primitive_problems(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from primitive_problems(value, (*path, str(i)))
    elif isinstance(node, str):
        if not FHIR_STRING.fullmatch(node):
            yield "/".join(path), f"not a FHIR string: {node[:60]!r}"
        elif path[-1] in URI_KEYS and not FHIR_URI.fullmatch(node):
            yield "/".join(path), f"not a FHIR uri: {node[:60]!r}"


@FUZZ
@given(datasets=instances(), opts=options)
def test_rendered_strings_pass_the_fhir_servers_primitive_rules(datasets, opts):
    resources = converted(datasets, opts)
    if resources is None:
        return
    for shape in SHAPES:
        assert list(primitive_problems(render(resources, shape))) == []


def instance_uids(resources) -> list[tuple[str, str]]:
    study = resources.imaging_study
    return sorted((s["uid"], i["uid"]) for s in study.get("series") or [] for i in s.get("instance") or [])


@FUZZ
@given(datasets=instances(fewest=2), opts=options, split=st.integers(1, 3))
def test_a_study_converted_in_two_parts_and_merged_holds_what_the_whole_holds(datasets, opts, split):
    """The node converts each burst of a study and merges it into what it delivered before."""
    headers = usable_headers(datasets)
    assume(len(headers) >= 2 and len({h.sop_instance_uid for h in headers}) == len(headers))
    split = min(split, len(headers) - 1)
    try:
        whole = convert_study(headers, opts)
        merged = merge_resources(convert_study(headers[:split], opts), convert_study(headers[split:], opts))
    except DicomFhirError as exc:
        event(f"rejected: {type(exc).__name__}")
        return
    assert instance_uids(merged) == instance_uids(whole)
    assert merged.imaging_study.get("numberOfInstances") == whole.imaging_study.get("numberOfInstances")
    assert merged.imaging_study.get("numberOfSeries") == whole.imaging_study.get("numberOfSeries")
    check_valid_fhir(merged)


def _ct(sop_uid: str, **values) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.1"
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.2", sop_uid, "CT"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@FUZZ
@example(datasets=[_ct("1.2.3.1.1", InstanceNumber="1"), _ct("1.2.3.1.2", InstanceNumber="-1")],
         opts=MappingOptions())
@given(datasets=instances(), opts=options)
def test_merging_a_study_into_itself_changes_nothing(datasets, opts):
    """A study sent twice is merged with its own earlier output: the document must not change."""
    resources = converted(datasets, opts)
    if resources is None:
        return
    for shape in SHAPES:
        assert render(merge_resources(resources, resources), shape) == render(resources, shape)


@FUZZ
@given(datasets=instances(), opts=options)
def test_a_study_merged_into_its_own_output_renders_the_same_bytes(datasets, opts):
    """A resend as the disk sink sees it: the file it would write is, byte for byte, the one it has."""
    resources = converted(datasets, opts)
    if resources is None:
        return
    for shape in SHAPES:
        written = json.dumps(render(resources, shape), indent=2, ensure_ascii=False)
        merged = merge_resources(parse_resources(json.loads(written)), resources)
        assert json.dumps(render(merged, shape), indent=2, ensure_ascii=False) == written


def test_an_instance_resent_in_another_series_is_counted_once_after_merging():
    first = convert_study([_ct("1.2.3.1.1")])
    moved = _ct("1.2.3.1.1", SeriesInstanceUID="1.2.3.2")
    merged = merge_resources(first, convert_study([moved]))
    assert convert_study([_ct("1.2.3.1.1"), moved]).imaging_study["numberOfInstances"] == 1
    assert instance_uids(merged) == [("1.2.3.2", "1.2.3.1.1")]


MARKER_NAME = "Qzxwvj"
MARKER_ID = "Jkqvzx"


@FUZZ
@given(data=st.data(), opts=options)
def test_warnings_and_errors_never_quote_the_patients_name_or_id(data, opts):
    codec = data.draw(st.sampled_from(CODECS), "codec")
    patient = {0x00100010: (MARKER_NAME + "^" + data.draw(short_text, "given")).encode(codec, errors="replace"),
               0x00100020: (MARKER_ID + data.draw(short_text, "id")).encode(codec, errors="replace")}
    datasets = data.draw(instances(patient=patient, most=2), "instances")
    messages: list[str] = []
    headers = usable_headers(datasets, messages)
    messages += [w for h in headers for w in h.warnings]
    if headers:
        try:
            messages += convert_study(headers, opts).warnings
        except DicomFhirError as exc:
            messages.append(str(exc))
    for message in messages:
        assert MARKER_NAME not in message and MARKER_ID not in message, message
