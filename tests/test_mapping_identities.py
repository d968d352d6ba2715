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
