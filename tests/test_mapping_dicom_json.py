"""DICOM JSON input (mapping.dicom_json): the same instance gives the same FHIR as from its file."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_files

from mapping import InstanceHeader, MappingError, MappingOptions, convert_study, render
from mapping.dicom_json import header_from_dicom_json

OPTIONS = MappingOptions(timezone="Europe/Berlin", patient_identifier_system="urn:oid:1.2.3",
                         dicomweb_url="http://pacs.example/dicom-web")


def _bulk(element) -> str:
    return "http://pacs.example/bulk/never-fetched"


def _usable(path: str):
    """The file's dataset and its DICOM JSON (as a DICOMweb server writes it: Unicode text, bulk
    data by URI), or None for files that are no usable instance (the test needs pairs)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            header = InstanceHeader.from_dataset(ds)
            obj = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=_bulk)
    except Exception:
        return None
    return header, obj


def _pairs(paths: list[str]) -> list[tuple[str, InstanceHeader, dict]]:
    pairs = []
    for path in paths:
        usable = _usable(path)
        if usable is not None:
            pairs.append((Path(path).name, *usable))
    return pairs


def _fhir(header: InstanceHeader) -> dict:
    return render(convert_study([header], OPTIONS), "bundle")


def test_the_same_instance_gives_the_same_fhir_from_its_file_and_from_its_dicom_json():
    pairs = _pairs(sorted(get_testdata_files("*.dcm")))
    assert len(pairs) >= 40  # pydicom's wheel holds far more usable files; a collapse means the test broke
    for name, header, obj in pairs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from_json = header_from_dicom_json(obj)
        assert _fhir(from_json) == _fhir(header), name


def test_dicom_json_text_is_utf8_whatever_the_specific_character_set_says():
    # charset_files: Greek, Arabic, Hebrew, Russian, Japanese ISO 2022, Korean, Chinese, UTF-8.
    pairs = _pairs(sorted(get_charset_files("*.dcm")))
    assert len(pairs) >= 10
    for name, header, obj in pairs:
        from_json = header_from_dicom_json(obj)
        assert from_json.patient_name == header.patient_name, name
        assert _fhir(from_json) == _fhir(header), name


def test_bulk_data_uris_are_never_fetched():
    path = get_testdata_files("CT_small.dcm")[0]
    obj = pydicom.dcmread(path).to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=_bulk)
    assert any("BulkDataURI" in element for element in obj.values())
    # A handler that fetched would fail here: the URI's host does not exist.
    assert header_from_dicom_json(obj).sop_instance_uid == pydicom.dcmread(path).SOPInstanceUID


def test_a_dicom_json_object_without_study_uid_is_a_mapping_error_naming_the_tag():
    obj = pydicom.dcmread(get_testdata_files("CT_small.dcm")[0], stop_before_pixels=True).to_json_dict()
    del obj["0020000D"]
    with pytest.raises(MappingError, match="StudyInstanceUID"):
        header_from_dicom_json(obj)


def test_a_malformed_dicom_json_object_is_a_mapping_error():
    with pytest.raises(MappingError, match="DICOM JSON"):
        header_from_dicom_json({"00100010": {"vr": "PN", "Value": 12}})


def test_not_a_dict_is_a_type_error():
    with pytest.raises(TypeError, match="obj"):
        header_from_dicom_json([])  # type: ignore[arg-type]
