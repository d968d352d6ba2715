"""Patient (mapping/README.md, "Patient") and person names."""

from __future__ import annotations

import pytest

from mapping.names import EN_REPRESENTATION, PersonName, display_name, human_names
from tests.mapping_cases import charset_file, convert, instance, patient_of, read, reread

# Several cases set invalid values on purpose; pydicom warns about them when they are set.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning",
                                        "ignore:The value length:UserWarning")

MR = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}


def test_patient_identifier_is_the_patient_id_typed_mr():
    assert patient_of(instance(PatientID="PID-77"))["identifier"] == [{"type": MR, "value": "PID-77"}]


def test_name_components_from_the_alphabetic_group():
    [name] = patient_of(instance(PatientName="Doe^Jane^Ann Mary^Dr.^PhD"))["name"]
    assert name == {"use": "usual", "family": "Doe", "given": ["Jane", "Ann", "Mary"], "prefix": ["Dr."],
                    "suffix": ["PhD"]}


def test_name_parts_are_trimmed_and_empty_parts_dropped():
    [name] = patient_of(reread(instance(PatientName=" Doe ^^ Ann ")))["name"]
    assert name == {"use": "usual", "family": "Doe", "given": ["Ann"]}


def test_ideographic_and_phonetic_groups_become_extra_names_with_the_representation_extension():
    names = patient_of(read(charset_file("chrH31.dcm")))["name"]
    assert names[0] == {"use": "usual", "family": "Yamada", "given": ["Tarou"]}
    assert names[1] == {"extension": [{"url": EN_REPRESENTATION, "valueCode": "IDE"}], "family": "山田",
                        "given": ["太郎"]}
    assert names[2] == {"extension": [{"url": EN_REPRESENTATION, "valueCode": "SYL"}], "family": "やまだ",
                        "given": ["たろう"]}


@pytest.mark.parametrize("name,family", [("chrFren.dcm", "Buc"), ("chrGerm.dcm", "Äneas"),
                                         ("chrH32.dcm", "ﾔﾏﾀﾞ"), ("chrX1.dcm", "Wang")])
def test_names_are_decoded_with_the_specific_character_set(name, family):
    assert patient_of(read(charset_file(name)))["name"][0]["family"] == family


def test_an_empty_ideographic_group_adds_no_name():
    assert len(human_names(PersonName.from_text("Wang^XiaoDong=="))) == 1


@pytest.mark.parametrize("value", [None, ""])
def test_a_missing_or_empty_patient_name_gives_a_patient_without_name(value):
    patient = patient_of(reread(instance(PatientName=value)))
    assert "name" not in patient and patient["identifier"][0]["value"] == "PID-1"


@pytest.mark.parametrize("sex,gender", [("M", "male"), ("F", "female"), ("O", "other")])
def test_patient_sex_maps_to_gender(sex, gender):
    assert patient_of(instance(PatientSex=sex))["gender"] == gender


@pytest.mark.parametrize("sex", [None, ""])
def test_absent_or_empty_patient_sex_is_unknown_without_warning(sex):
    resources = convert(instance(PatientSex=sex))
    assert resources.patient["gender"] == "unknown" and resources.warnings == ()


@pytest.mark.parametrize("sex", ["X", "MALE", "m"])
def test_non_standard_patient_sex_is_unknown_with_a_warning(sex):
    resources = convert(instance(PatientSex=sex))
    assert resources.patient["gender"] == "unknown"
    assert any("PatientSex (0010,0040)" in w for w in resources.warnings)


@pytest.mark.parametrize("value,expected", [("19700131", "1970-01-31"), ("1970.01.31", "1970-01-31")])
def test_birth_date_is_a_fhir_date(value, expected):
    assert patient_of(instance(PatientBirthDate=value))["birthDate"] == expected


def test_an_unparseable_birth_date_is_omitted_with_a_warning_not_quoting_it():
    resources = convert(reread(instance(PatientBirthDate="19701331")))
    assert "birthDate" not in resources.patient
    assert [w for w in resources.warnings if "PatientBirthDate (0010,0030)" in w]
    assert not any("19701331" in w for w in resources.warnings)


@pytest.mark.parametrize("value", [None, "", "   "])
def test_without_patient_id_the_patient_has_no_identifier(value):
    resources = convert(reread(instance(PatientID=value)))
    assert "identifier" not in resources.patient
    assert "identifier" not in resources.imaging_study["subject"]


def test_warnings_never_quote_patient_names_or_ids():
    resources = convert(reread(instance(PatientName="Secretname^Ann", PatientID="ID-SECRET-9", PatientSex="Q",
                                        PatientBirthDate="notadate")))
    assert resources.warnings
    text = " ".join(resources.warnings)
    assert "Secretname" not in text and "ID-SECRET-9" not in text and "notadate" not in text


def test_display_name_reads_prefix_given_middle_family_suffix():
    assert display_name(PersonName.from_text("Welby^Marcus^A^Dr.^MD")) == "Dr. Marcus A Welby MD"
    assert display_name(PersonName.from_text("=山田^太郎")) == "太郎 山田"
