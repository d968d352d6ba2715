"""scp.sources.folder.process_dicom_2_fhir as a drop-in for both seed libraries.

dicom-fhir-converter: process_dicom_2_fhir(dcmDir), a folder; its contained Patient had
the id "patient.contained.inline". PyPI dicom2fhir: process_dicom_2_fhir(datasets), pydicom
Datasets already in memory. Each call form the README's migration section shows is tested here.
"""

from __future__ import annotations

import pydicom
import pytest
from fhir.resources.R4B.imagingstudy import ImagingStudy

from mapping import MappingOptions
from mapping.errors import ConfigurationError, MultipleStudiesError, PatientMismatchError
from scp.sources.folder import process_dicom_2_fhir

from tests.dicomgen import generate_study

pytestmark = pytest.mark.usefixtures("strict_pydicom")


def datasets_of(study) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in study.files]


def contained_patient(study: ImagingStudy):
    [patient] = [r for r in study.contained if r.get_resource_type() == "Patient"]
    return patient


def test_a_folder_as_dicom_fhir_converter_took_it(tmp_path):
    generated = generate_study(tmp_path, 3, 2)
    study = process_dicom_2_fhir(tmp_path)  # dicom2fhir.process_dicom_2_fhir(dcmDir)
    assert isinstance(study, ImagingStudy) and study.numberOfInstances == 3
    assert study.identifier[0].value == f"urn:oid:{generated.study_uid}"


def test_the_contained_patient_id_of_dicom_fhir_converter(tmp_path):
    generate_study(tmp_path, 1, 1)
    study = process_dicom_2_fhir(tmp_path, contained_patient_id="patient.contained.inline")
    assert contained_patient(study).id == "patient.contained.inline"
    assert study.subject.reference == "#patient.contained.inline"


def test_the_default_contained_patient_id_is_patient(tmp_path):
    generate_study(tmp_path, 1, 1)
    study = process_dicom_2_fhir(tmp_path)
    assert (contained_patient(study).id, study.subject.reference) == ("patient", "#patient")


def test_the_contained_patient_id_changes_nothing_else(tmp_path):
    generate_study(tmp_path, 2, 1)
    options = MappingOptions(dicomweb_url="https://pacs.example/dicom-web")
    default = process_dicom_2_fhir(tmp_path, options).model_dump(mode="json")
    renamed = process_dicom_2_fhir(tmp_path, options, contained_patient_id="p1").model_dump(mode="json")
    assert renamed["subject"]["reference"] == "#p1"
    for document in (default, renamed):
        document["subject"]["reference"] = "#x"
        for resource in document["contained"]:
            if resource["resourceType"] == "Patient":
                resource["id"] = "x"
    assert renamed == default


def test_a_contained_patient_id_that_is_not_a_fhir_id_is_refused(tmp_path):
    generate_study(tmp_path, 1, 1)
    with pytest.raises(ConfigurationError, match="contained_patient_id"):
        process_dicom_2_fhir(tmp_path, contained_patient_id="no spaces allowed")


def test_a_list_of_datasets_as_pypi_dicom2fhir_takes_them(tmp_path):
    generated = generate_study(tmp_path, 3, 2)
    from_datasets = process_dicom_2_fhir(datasets_of(generated))  # dicom2fhir.process_dicom_2_fhir(datasets)
    assert from_datasets.model_dump(mode="json") == process_dicom_2_fhir(tmp_path).model_dump(mode="json")


def test_a_generator_of_datasets_and_a_single_dataset(tmp_path):
    generated = generate_study(tmp_path, 2, 1)
    assert process_dicom_2_fhir(ds for ds in datasets_of(generated)).numberOfInstances == 2
    assert process_dicom_2_fhir(datasets_of(generated)[0]).numberOfInstances == 1


def test_datasets_of_two_studies_raise_naming_both(tmp_path):
    first, second = generate_study(tmp_path / "a", 1, 1), generate_study(tmp_path / "b", 1, 1)
    with pytest.raises(MultipleStudiesError, match=first.study_uid) as raised:
        process_dicom_2_fhir(datasets_of(first) + datasets_of(second))
    assert second.study_uid in str(raised.value)


def test_datasets_disagreeing_on_patient_id_raise(tmp_path):
    first = generate_study(tmp_path / "a", 1, 1, patient_id="A-1")
    other = generate_study(tmp_path / "b", 1, 1, study_uid=first.study_uid, patient_id="B-2")
    with pytest.raises(PatientMismatchError):
        process_dicom_2_fhir(datasets_of(first) + datasets_of(other))


def test_no_datasets_give_none():
    assert process_dicom_2_fhir([]) is None
