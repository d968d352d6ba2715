"""InstanceHeader.from_dataset: the four UIDs required, everything else robust."""

from __future__ import annotations

import dataclasses

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from mapping import InstanceHeader, MappingError
from mapping.header import IdQualifiers, PatientIdentity
from tests.mapping_cases import CT_SMALL, charset_file, convert, instance, read, reread

# Several cases set invalid values on purpose; pydicom warns about them when they are set.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning",
                                        "ignore:The value length:UserWarning")

REQUIRED = [("StudyInstanceUID", "(0020,000D)"), ("SeriesInstanceUID", "(0020,000E)"),
            ("SOPInstanceUID", "(0008,0018)"), ("SOPClassUID", "(0008,0016)")]


def raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


@pytest.mark.parametrize("keyword,tag", REQUIRED)
def test_a_missing_required_uid_is_a_mapping_error_naming_the_tag_and_instance(keyword, tag):
    ds = instance(sop="1.2.3.4.5")
    delattr(ds, keyword)
    with pytest.raises(MappingError) as info:
        InstanceHeader.from_dataset(ds)
    assert keyword in str(info.value) and tag in str(info.value) and "missing" in str(info.value)
    if keyword != "SOPInstanceUID":
        assert "1.2.3.4.5" in str(info.value)


@pytest.mark.parametrize("keyword,tag", REQUIRED)
def test_an_empty_required_uid_is_a_mapping_error(keyword, tag):
    ds = reread(instance())
    ds[Tag(ds.data_element(keyword).tag)] = raw(ds.data_element(keyword).tag, "UI", b"")
    with pytest.raises(MappingError, match=r"is empty"):
        InstanceHeader.from_dataset(ds)


def test_a_uid_that_is_no_fhir_id_is_a_mapping_error():
    with pytest.raises(MappingError, match="SeriesInstanceUID"):
        InstanceHeader.from_dataset(instance(SeriesInstanceUID="1.2." + "3" * 70))


def test_a_malformed_optional_value_is_dropped_with_a_warning_naming_the_tag_not_the_value():
    ds = reread(instance(number=4))
    ds[0x00200013] = raw(0x00200013, "IS", b"4x7Q")  # InstanceNumber
    header = InstanceHeader.from_dataset(ds)
    assert header.instance_number is None
    assert any("InstanceNumber (0020,0013)" in w for w in header.warnings)
    assert not any("4x7Q" in w for w in header.warnings)


def test_a_malformed_sequence_is_dropped_and_the_instance_still_maps():
    ds = reread(instance())
    ds[0x00081032] = raw(0x00081032, "SQ", b"\x01\x02\x03\x04\x05\x06")  # ProcedureCodeSequence
    header = InstanceHeader.from_dataset(ds)
    assert header.procedure_codes == ()
    assert any("ProcedureCodeSequence (0008,1032)" in w for w in header.warnings)
    assert convert(ds).imaging_study["numberOfInstances"] == 1


def test_header_values_are_the_same_from_memory_and_from_a_file():
    ds = read(CT_SMALL)
    assert InstanceHeader.from_dataset(ds) == InstanceHeader.from_dataset(reread(ds))


@pytest.mark.parametrize("name", ["chrFren.dcm", "chrGerm.dcm", "chrX1.dcm", "chrH31.dcm", "chrH32.dcm"])
def test_person_names_are_decoded_with_the_specific_character_set(name):
    ds = read(charset_file(name))
    header = InstanceHeader.from_dataset(ds)
    expected = read(charset_file(name)).PatientName  # pydicom's own decoding
    assert (header.patient_name.alphabetic, header.patient_name.ideographic, header.patient_name.phonetic) == (
        expected.alphabetic, expected.ideographic, expected.phonetic)


def test_the_header_is_immutable():
    header = InstanceHeader.from_dataset(instance())
    with pytest.raises(dataclasses.FrozenInstanceError):
        header.patient_id = "other"  # type: ignore[misc]


def test_coded_sequences_become_small_frozen_values():
    from tests.mapping_cases import code_item
    header = InstanceHeader.from_dataset(instance(ProcedureCodeSequence=[code_item("24627-2", "LN", "CT Chest")]))
    [code] = header.procedure_codes
    assert (code.value, code.designator, code.meaning) == ("24627-2", "LN", "CT Chest")
    assert hash(code)  # hashable: frozen


@pytest.mark.parametrize("keyword,value,expected", [
    ("StudyDescription", "Head\x01CT", "HeadCT"),
    ("PatientID", "12\x0734", "1234"),
    ("AccessionNumber", "A\x1f1", "A1"),
    ("Modality", "C\x0bT", "CT"),
])
def test_control_characters_fhir_refuses_are_removed_with_a_warning(keyword, value, expected):
    field = {"StudyDescription": "study_description", "PatientID": "patient_id",
             "AccessionNumber": "accession_number", "Modality": "modality"}[keyword]
    for ds in (instance(**{keyword: value}), reread(instance(**{keyword: value}))):
        header = InstanceHeader.from_dataset(ds)
        assert getattr(header, field) == expected
        assert any(keyword in w and "control characters" in w for w in header.warnings)
        assert not any(value in w for w in header.warnings)


def test_undeclared_iso_2022_escapes_in_a_name_are_decoded():
    name = "Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"
    for ds in (instance(PatientName=name), reread(instance(PatientName=name, SpecificCharacterSet=None))):
        header = InstanceHeader.from_dataset(ds)
        assert (header.patient_name.alphabetic, header.patient_name.ideographic) == ("Yamada^Tarou", "山田^太郎")


def test_nul_padding_of_uids_is_no_control_character():
    ds = reread(instance())
    ds[0x0020000D] = raw(0x0020000D, "UI", b"1.2.3.4\0")
    header = InstanceHeader.from_dataset(ds)
    assert header.study_uid == "1.2.3.4" and header.warnings == ()


def test_image_type_values_lose_embedded_nul_characters():
    header = InstanceHeader.from_dataset(instance(ImageType=["ORIGINAL\x00X", "PRIMARY"]))
    assert header.image_type == ("ORIGINALX", "PRIMARY")


def test_other_patient_ids_and_the_issuer_qualifiers_are_read_as_typed_values():
    qualifier = Dataset()
    qualifier.UniversalEntityID, qualifier.UniversalEntityIDType, qualifier.IdentifierTypeCode = "1.2.3", "ISO", "PI"
    item = Dataset()
    item.PatientID, item.IssuerOfPatientID, item.TypeOfPatientID = "B-7", "HOSP_B", "TEXT"
    item.IssuerOfPatientIDQualifiersSequence = [qualifier]
    empty = Dataset()  # an item without PatientID says nothing: left out
    empty.IssuerOfPatientID = "HOSP_C"
    header = InstanceHeader.from_dataset(reread(instance(OtherPatientIDsSequence=[item, empty],
                                                         IssuerOfPatientIDQualifiersSequence=[qualifier])))
    assert header.other_patient_ids == (PatientIdentity("B-7", "HOSP_B", "TEXT", IdQualifiers("1.2.3", "ISO", "PI")),)
    assert header.patient_id_qualifiers == IdQualifiers("1.2.3", "ISO", "PI")
    assert header.patient_identity == PatientIdentity("PID-1", "", "", IdQualifiers("1.2.3", "ISO", "PI"))
    assert header.warnings == ()


def test_an_other_patient_ids_sequence_that_is_not_a_sequence_is_dropped_with_a_warning():
    ds = instance()
    ds.add_new(0x00101002, "LO", "not a sequence")
    header = InstanceHeader.from_dataset(ds)
    assert header.other_patient_ids == ()
    assert any(w.startswith("OtherPatientIDsSequence (0010,1002)") for w in header.warnings)
