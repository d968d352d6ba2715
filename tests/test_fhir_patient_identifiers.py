"""Patient identifiers end to end (issue #11, mapping/README.md "Identifiers and systems"): the FHIR
sink against the real FHIR engine (tests/fhir_engine.py), as tests/test_fhir_delivery.py uses it."""

from __future__ import annotations

import copy

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from mapping import MappingOptions, convert_study
from scp.config import FhirConfig
from scp.sinks.fhir.sink import FhirSink
from tests.dicomgen import template_dataset
from tests.fhir_engine import FhirEngine
from tests.fhir_engine import fhir_engine, fhir_engine_process  # noqa: F401 (fixtures)

pytestmark = pytest.mark.interop

SITE_A, SITE_B, NATIONAL = "urn:oid:1.2.3.1", "https://b.example/mrn", "urn:oid:2.16.840.1.113883.4.1"
OPTIONS = MappingOptions(use_issuer_of_patient_id=True,
                         issuer_systems={"HOSP_A": SITE_A, "HOSP_B": SITE_B, "NATIONAL": NATIONAL})


@pytest.fixture(scope="module")
def template() -> pydicom.Dataset:
    ds = template_dataset()
    del ds.PixelData  # the mapping reads headers only
    return ds


def other_id(patient_id: str, issuer: str) -> Dataset:
    item = Dataset()
    item.PatientID, item.IssuerOfPatientID = patient_id, issuer
    return item


def study(template: pydicom.Dataset, patient_id: str, issuer: str, *others: Dataset, n: int = 2) -> list[Dataset]:
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
        ds.InstanceNumber = i + 1
        ds.PatientID, ds.IssuerOfPatientID = patient_id, issuer
        if others:
            ds.OtherPatientIDsSequence = list(others)
        out.append(ds)
    return out


def deliver(engine: FhirEngine, datasets: list[Dataset]) -> None:
    FhirSink(FhirConfig(url=engine.base_url), OPTIONS).deliver(convert_study(datasets, OPTIONS))


def pairs(patient: dict) -> list[tuple[str | None, str]]:
    return [(i.get("system"), i["value"]) for i in patient.get("identifier", [])]


def test_a_study_with_other_patient_ids_creates_one_patient_carrying_every_identifier(fhir_engine, template):
    deliver(fhir_engine, study(template, "A-1", "HOSP_A", other_id("B-7", "HOSP_B"), other_id("S-9", "NATIONAL")))

    [patient] = fhir_engine.resources("Patient")
    assert pairs(patient) == [(SITE_A, "A-1"), (SITE_B, "B-7"), (NATIONAL, "S-9")]
    [imaging_study] = fhir_engine.resources("ImagingStudy")
    assert imaging_study["subject"]["reference"] == f"Patient/{patient['id']}"


def test_a_second_study_of_that_patient_is_attached_to_the_same_patient(fhir_engine, template):
    deliver(fhir_engine, study(template, "A-1", "HOSP_A", other_id("B-7", "HOSP_B")))
    deliver(fhir_engine, study(template, "A-1", "HOSP_A"))

    [patient] = fhir_engine.resources("Patient")
    assert {s["subject"]["reference"] for s in fhir_engine.resources("ImagingStudy")} == {f"Patient/{patient['id']}"}


def test_the_same_patient_id_under_two_systems_creates_two_patients(fhir_engine, template):
    deliver(fhir_engine, study(template, "P-1", "HOSP_A"))
    deliver(fhir_engine, study(template, "P-1", "HOSP_B"))

    patients = fhir_engine.resources("Patient")
    assert sorted(pairs(p)[0] for p in patients) == sorted([(SITE_A, "P-1"), (SITE_B, "P-1")])
    by_id = {p["id"]: pairs(p)[0][0] for p in patients}
    systems = sorted(by_id[s["subject"]["reference"].split("/")[-1]] for s in fhir_engine.resources("ImagingStudy"))
    assert systems == sorted([SITE_A, SITE_B])
