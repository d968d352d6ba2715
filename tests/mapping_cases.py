"""Builders for the mapping tests: real headers from pydicom's test data, edited per case.

Datasets built in memory hold converted values; ``reread`` writes one to bytes and reads
it back, so the mapping sees raw elements as it does for files and the network.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from mapping import MappingOptions, StudyResources, convert_study, validate_resources
from mapping.fhirjson import model_json, validated

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
DICOMDIR_TESTS = Path(get_testdata_file("DICOMDIR")).parent
CT_STUDY = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.1"  # 2 CT series: 5 + 2 instances
MR_STUDY = "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.1"  # 3 MR series: 7 + 3 + 1 instances
CR_STUDY = "1.3.6.1.4.1.5962.1.1.0.0.0.1196527414.5534.0.1"  # CR, BodyPartExamined CSPINE
SR_FILE = Path(get_testdata_file("test-SR.dcm"))
STUDY = "1.2.826.0.1.3680043.8.498.1"


def charset_file(name: str) -> Path:
    return Path(get_charset_files(name)[0])


def dicomdir_instances() -> dict[str, list[Dataset]]:
    """The instances under pydicom's dicomdirtests folder, by StudyInstanceUID (7 studies)."""
    studies: dict[str, list[Dataset]] = {}
    for path in sorted(DICOMDIR_TESTS.rglob("*")):
        if path.is_file() and "DICOMDIR" not in path.name and "README" not in path.name:
            ds = read(path)
            studies.setdefault(ds.StudyInstanceUID, []).append(ds)
    return studies


def read(path: Path | str) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def instance(series: int = 1, number: int | None = 1, *, study: str = STUDY, sop: str | None = None,
             **values: Any) -> Dataset:
    """A small CT instance of STUDY: series n has UID STUDY.n, instance k has UID STUDY.n.k.

    values: extra elements by keyword (None deletes one set by default).
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = f"{study}.{series}"
    ds.SOPInstanceUID = sop or f"{study}.{series}.{number if number is not None else 0}"
    ds.Modality = "CT"
    ds.SeriesNumber = series
    if number is not None:
        ds.InstanceNumber = number
    ds.PatientID = "PID-1"
    ds.PatientName = "Doe^Jane"
    for keyword, value in values.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def reread(ds: Dataset) -> Dataset:
    """ds written as a Part 10 file and read back (raw elements, as from disk)."""
    ds = ds.copy()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def code_item(value: str, designator: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, designator, meaning
    return item


def convert(*datasets: Dataset, **options: Any) -> StudyResources:
    """convert_study, then the check a sink makes before writing (the tests are an edge too)."""
    resources = convert_study(datasets, MappingOptions(**options))
    validate_resources(resources)
    return resources


def as_json(resource: dict[str, Any]) -> dict[str, Any]:
    """resource, checked at the tests' edge: valid R4, and exactly what fhir.resources writes for it."""
    assert model_json(validated(resource, "test")) == resource
    return resource


def study_of(*datasets: Dataset, **options: Any) -> dict[str, Any]:
    return as_json(convert(*datasets, **options).imaging_study)


def patient_of(*datasets: Dataset, **options: Any) -> dict[str, Any]:
    return as_json(convert(*datasets, **options).patient)
