"""Identities (mapping/README.md, "Identifiers and systems"): study, accession, patient, SOP class, modality."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from mapping import ConfigurationError, MappingOptions

from tests.mapping_cases import CT_SMALL, STUDY, convert, instance, patient_of, read, study_of

ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def issuer(**values: str) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def test_study_identifier_is_the_study_uid_as_urn_oid():
    assert study_of(instance())["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}


def test_accession_identifier_is_typed_acsn():
    assert study_of(instance(AccessionNumber="A-123"))["identifier"][1] == {"type": ACSN, "value": "A-123"}


def test_accession_system_comes_from_the_issuer_of_accession_number_sequence():
    study = study_of(instance(AccessionNumber="A-123",
                              IssuerOfAccessionNumberSequence=[issuer(LocalNamespaceEntityID="urn:hosp:ris")]),
                     accession_system="urn:configured")
    assert study["identifier"][1]["system"] == "urn:hosp:ris"


def test_accession_system_from_a_universal_iso_issuer_is_an_oid_urn():
    study = study_of(instance(AccessionNumber="A-1", IssuerOfAccessionNumberSequence=[
        issuer(UniversalEntityID="1.2.3.4", UniversalEntityIDType="ISO")]))
    assert study["identifier"][1]["system"] == "urn:oid:1.2.3.4"


def test_accession_system_falls_back_to_the_configured_one():
    study = study_of(instance(AccessionNumber="A-123"), accession_system="urn:configured")
    assert study["identifier"][1]["system"] == "urn:configured"


def test_accession_without_issuer_or_configuration_has_no_system():
    assert "system" not in study_of(instance(AccessionNumber="A-123"))["identifier"][1]


def test_no_accession_identifier_when_the_accession_number_is_empty():
    assert len(study_of(instance(AccessionNumber=""))["identifier"]) == 1


def test_patient_identifier_system_is_the_configured_system():
    identifier = patient_of(instance(PatientID="P9"), patient_identifier_system="urn:oid:1.2.3")["identifier"][0]
    assert (identifier["system"], identifier["value"]) == ("urn:oid:1.2.3", "P9")


def test_patient_identifier_system_is_the_issuer_of_patient_id_when_configured_an_oid_as_urn():
    ds = instance(PatientID="P9", IssuerOfPatientID="1.2.840.99")
    assert patient_of(ds, use_issuer_of_patient_id=True)["identifier"][0]["system"] == "urn:oid:1.2.840.99"
    ds = instance(PatientID="P9", IssuerOfPatientID="urn:hosp:a")
    assert patient_of(ds, use_issuer_of_patient_id=True)["identifier"][0]["system"] == "urn:hosp:a"


def test_issuer_of_patient_id_is_ignored_unless_configured():
    ds = instance(PatientID="P9", IssuerOfPatientID="1.2.840.99")
    assert "system" not in patient_of(ds)["identifier"][0]


def test_issuer_of_patient_id_falls_back_to_the_configured_system_when_absent():
    identifier = patient_of(instance(PatientID="P9"), use_issuer_of_patient_id=True,
                            patient_identifier_system="urn:fallback")["identifier"][0]
    assert identifier["system"] == "urn:fallback"


def test_patient_identifier_never_carries_an_empty_system():
    identifier = patient_of(instance(PatientID="P9", IssuerOfPatientID=""), use_issuer_of_patient_id=True)
    assert "system" not in identifier["identifier"][0]


def test_instance_sop_class_is_an_oid_urn_with_pydicom_display():
    [instance_json] = study_of(read(CT_SMALL))["series"][0]["instance"]
    assert instance_json["sopClass"] == {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2",
                                         "display": "CT Image Storage"}


def test_an_unknown_sop_class_has_no_display():
    [instance_json] = study_of(instance(SOPClassUID="1.2.3.4.5.6"))["series"][0]["instance"]
    assert instance_json["sopClass"] == {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.3.4.5.6"}


def test_modality_codes_use_the_dcm_system():
    study = study_of(instance(Modality="MR"))
    assert study["modality"] == [{"system": DCM, "code": "MR"}]
    assert study["series"][0]["modality"] == {"system": DCM, "code": "MR"}


def test_resources_identify_the_study_by_its_uid():
    assert convert(instance()).study_uid == STUDY


def test_an_accession_issuer_that_is_no_uri_falls_back_to_the_configured_system():
    study = study_of(instance(AccessionNumber="A-1", IssuerOfAccessionNumberSequence=[
        issuer(LocalNamespaceEntityID="General Hospital RIS")]), accession_system="urn:configured")
    assert study["identifier"][1]["system"] == "urn:configured"


def test_an_issuer_of_patient_id_that_is_no_uri_or_oid_is_not_a_system():
    resources = convert(instance(PatientID="P9", IssuerOfPatientID="HOSP A"), use_issuer_of_patient_id=True,
                        patient_identifier_system="urn:fallback")
    assert resources.patient["identifier"][0]["system"] == "urn:fallback"
    assert any("IssuerOfPatientID (0010,0021)" in w for w in resources.warnings)


def test_a_bare_local_accession_issuer_is_not_a_system():
    resources = convert(instance(AccessionNumber="A-1", IssuerOfAccessionNumberSequence=[
        issuer(LocalNamespaceEntityID="RIS")]))
    assert "system" not in resources.imaging_study["identifier"][1]
    assert any("IssuerOfAccessionNumberSequence (0008,0051)" in w for w in resources.warnings)


@pytest.mark.parametrize("option", ["patient_identifier_system", "accession_system"])
def test_configured_systems_must_be_absolute_uris(option):
    with pytest.raises(ConfigurationError, match=option):
        MappingOptions(**{option: "MRN"})
    assert getattr(MappingOptions(**{option: "urn:oid:1.2.3"}), option) == "urn:oid:1.2.3"


# --- issue #11: the issuer table, the qualifiers, OtherPatientIDsSequence -----------------------

SITES = {"HOSP_A": "urn:oid:1.2.3.1", "HOSP_B": "https://b.example/mrn"}


def other_id(patient_id: str, issuer_of_patient_id: str | None = None, **values) -> Dataset:
    item = issuer(PatientID=patient_id, **values)
    if issuer_of_patient_id is not None:
        item.IssuerOfPatientID = issuer_of_patient_id
    return item


def qualifiers(**values: str) -> list[Dataset]:
    return [issuer(**values)]


def test_a_listed_issuer_of_patient_id_takes_its_system_from_issuer_systems():
    ds = instance(PatientID="P9", IssuerOfPatientID="HOSP_A")
    assert patient_of(ds, use_issuer_of_patient_id=True, issuer_systems=SITES)["identifier"][0]["system"] == \
        "urn:oid:1.2.3.1"


def test_issuer_systems_is_consulted_even_with_use_issuer_of_patient_id_off():
    ds = instance(PatientID="P9", IssuerOfPatientID="HOSP_B")
    assert patient_of(ds, issuer_systems=SITES, patient_identifier_system="urn:fallback")["identifier"][0][
        "system"] == "https://b.example/mrn"


def test_issuer_systems_wins_over_an_issuer_that_is_itself_an_oid():
    ds = instance(PatientID="P9", IssuerOfPatientID="1.2.840.99")
    options = {"use_issuer_of_patient_id": True, "issuer_systems": {"1.2.840.99": "urn:site:x"}}
    assert patient_of(ds, **options)["identifier"][0]["system"] == "urn:site:x"


def test_an_unlisted_bare_issuer_falls_back_to_the_configured_system_with_the_warning():
    resources = convert(instance(PatientID="P9", IssuerOfPatientID="HOSP_C"), use_issuer_of_patient_id=True,
                        issuer_systems=SITES, patient_identifier_system="urn:fallback")
    assert resources.patient["identifier"][0]["system"] == "urn:fallback"
    assert any(w.startswith("IssuerOfPatientID (0010,0021)") for w in resources.warnings)


def test_the_qualifiers_universal_entity_id_is_the_system_when_the_issuer_is_a_bare_name():
    ds = instance(PatientID="P9", IssuerOfPatientID="HOSP_C",
                  IssuerOfPatientIDQualifiersSequence=qualifiers(UniversalEntityID="2.16.840.1.9",
                                                                 UniversalEntityIDType="ISO"))
    resources = convert(ds, use_issuer_of_patient_id=True)
    assert resources.patient["identifier"][0]["system"] == "urn:oid:2.16.840.1.9"
    assert not any("0010,0021" in w for w in resources.warnings)


def test_the_qualifiers_are_ignored_unless_use_issuer_of_patient_id_is_on():
    ds = instance(PatientID="P9", IssuerOfPatientIDQualifiersSequence=qualifiers(UniversalEntityID="2.16.840.1.9"))
    assert "system" not in patient_of(ds)["identifier"][0]


def test_the_qualifiers_identifier_type_code_is_the_identifier_type():
    ds = instance(PatientID="P9", IssuerOfPatientIDQualifiersSequence=qualifiers(IdentifierTypeCode="PI"))
    assert patient_of(ds)["identifier"][0]["type"]["coding"][0]["code"] == "PI"


def test_other_patient_ids_become_further_identifiers_each_with_its_issuers_system():
    ds = instance(PatientID="P9", IssuerOfPatientID="HOSP_A", OtherPatientIDsSequence=[
        other_id("B-7", "HOSP_B"), other_id("C-3", "1.2.840.77")])
    identifiers = patient_of(ds, use_issuer_of_patient_id=True, issuer_systems=SITES)["identifier"]
    assert [(i.get("system"), i["value"]) for i in identifiers] == [
        ("urn:oid:1.2.3.1", "P9"), ("https://b.example/mrn", "B-7"), ("urn:oid:1.2.840.77", "C-3")]


def test_an_other_patient_id_uses_its_qualifiers_and_identifier_type_code():
    ds = instance(PatientID="P9", OtherPatientIDsSequence=[other_id(
        "S-1", "NATIONAL", IssuerOfPatientIDQualifiersSequence=qualifiers(
            UniversalEntityID="2.16.840.1.113883.4.1", UniversalEntityIDType="ISO", IdentifierTypeCode="SS"))])
    identifier = patient_of(ds, use_issuer_of_patient_id=True)["identifier"][1]
    assert identifier == {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                               "code": "SS"}]},
                          "system": "urn:oid:2.16.840.1.113883.4.1", "value": "S-1"}


@pytest.mark.parametrize("item_issuer", [None, "HOSP_C", "1.2.840.77"])
def test_an_other_patient_id_without_a_resolvable_system_is_left_out_with_a_warning_naming_the_tag(item_issuer):
    # "1.2.840.77" resolves only with use_issuer_of_patient_id on (it is off here); the configured
    # patient_identifier_system is the PatientID's namespace, never another issuer's.
    resources = convert(instance(PatientID="P9", OtherPatientIDsSequence=[other_id("SECRET-X", item_issuer)]),
                        issuer_systems=SITES, patient_identifier_system="urn:fallback")
    assert [i["value"] for i in resources.patient["identifier"]] == ["P9"]
    [warning] = [w for w in resources.warnings if "OtherPatientIDsSequence (0010,1002)" in w]
    assert "SECRET-X" not in warning and "HOSP_C" not in warning


def test_without_issuers_configured_other_patient_ids_are_not_used_and_give_no_warning():
    # CT_small's items carry no issuer: at the default configuration no item can have a system
    resources = convert(read(CT_SMALL))
    assert len(resources.patient["identifier"]) == 1 and resources.warnings == ()


def test_an_other_patient_id_equal_to_the_primary_is_not_repeated():
    ds = instance(PatientID="P9", IssuerOfPatientID="HOSP_A", OtherPatientIDsSequence=[
        other_id("P9", "HOSP_A"), other_id("B-7", "HOSP_B"), other_id("B-7", "HOSP_B")])
    identifiers = patient_of(ds, issuer_systems=SITES)["identifier"]
    assert [i["value"] for i in identifiers] == ["P9", "B-7"]


def test_without_a_patient_id_other_patient_ids_give_no_identifier():
    ds = instance(PatientID=None, OtherPatientIDsSequence=[other_id("B-7", "HOSP_B")])
    assert "identifier" not in patient_of(ds, issuer_systems=SITES)


def test_the_subject_carries_only_the_primary_identifier():
    ds = instance(PatientID="P9", IssuerOfPatientID="HOSP_A", OtherPatientIDsSequence=[other_id("B-7", "HOSP_B")])
    assert study_of(ds, issuer_systems=SITES)["subject"]["identifier"]["value"] == "P9"


def test_other_patient_ids_come_from_the_first_instance_that_has_them():
    first = instance(1, 1, PatientID="P9")
    second = instance(1, 2, PatientID="P9", OtherPatientIDsSequence=[other_id("B-7", "HOSP_B")])
    third = instance(1, 3, PatientID="P9", OtherPatientIDsSequence=[other_id("B-8", "HOSP_B")])
    identifiers = patient_of(third, second, first, issuer_systems=SITES)["identifier"]
    assert [i["value"] for i in identifiers] == ["P9", "B-7"]
