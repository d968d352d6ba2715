"""ImagingSelection (R5): KOS, SEG and RTSTRUCT instances select the images they reference
(mapping/selection.py, mapping/README.md "ImagingSelection"). Every selection a test makes
passes both R5 validators (fhir.resources' R5 model and HL7's R5 JSON schema)."""

from __future__ import annotations

from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from mapping import (MappingError, MappingOptions, StudyResources, convert_study, merge_resources, parse_resources,
                     render, validate_resources)
from mapping.fhirjson import STUDY_UID_SYSTEM
from mapping.header import KEY_OBJECT_SELECTION
from mapping.selection import URI_SYSTEM, selection_identifier, selection_url, validate_selection
from mapping.shapes import selection_bundle
from mapping.study import imaging_study_url
from tests.mapping_cases import CT_STUDY, code_item, dicomdir_instances, instance, reread
from tests.r5_validator import require_r5_schema, validate_r5

SEG_FILE = get_testdata_file("liver_1frame.dcm")  # pydicom's SEG of 3 CT images of one series
RTSTRUCT_FILE = get_testdata_file("rtstruct.dcm")  # pydicom's RT Structure Set (no contour images listed)
SEG_SOURCE_SERIES = "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
SEG_SOURCES = [f"1.2.392.200103.20080913.113635.2.2009.6.22.21.43.10.{n}.1" for n in (23433, 23432, 23431)]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def r5() -> MappingOptions:
    return MappingOptions(fhir_version="R5")


def valid(selection: dict[str, Any]) -> dict[str, Any]:
    """selection, having passed both R5 validators."""
    require_r5_schema()
    validate_selection(selection, "test")
    assert validate_r5(selection) == []
    return selection


def converted(*datasets: Dataset) -> StudyResources:
    """convert_study in R5, every selection having passed both validators."""
    resources = convert_study(datasets, r5())
    validate_resources(resources)
    for selection in resources.selections:
        valid(selection)
    return resources


def selections(*datasets: Dataset) -> tuple[dict[str, Any], ...]:
    return converted(*datasets).selections


def seg() -> Dataset:
    return pydicom.dcmread(SEG_FILE, stop_before_pixels=True)


def rtstruct() -> Dataset:
    return pydicom.dcmread(RTSTRUCT_FILE, force=True)


def ct_study() -> list[Dataset]:
    return dicomdir_instances()[CT_STUDY]


def kos(images: list[Dataset], title: Dataset | None = None) -> Dataset:
    """A Key Object Selection document in the images' study selecting them (written and read
    back as a file): pydicom's test data has no KOS."""
    first = images[0]
    ds = Dataset()
    ds.SOPClassUID = KEY_OBJECT_SELECTION
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    ds.StudyInstanceUID, ds.PatientID, ds.PatientName = first.StudyInstanceUID, first.PatientID, first.PatientName
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "1.2.826.0.1.3680043.8.498.78", 99, 1
    ds.Modality = "KO"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([title or code_item("113000", "DCM", "Of Interest")])
    by_series: dict[str, list[Dataset]] = {}
    for image in images:
        by_series.setdefault(image.SeriesInstanceUID, []).append(image)
    study = Dataset()
    study.StudyInstanceUID = first.StudyInstanceUID
    study.ReferencedSeriesSequence = Sequence()
    for series_uid, members in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedSOPSequence = Sequence()
        for image in members:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = image.SOPClassUID, image.SOPInstanceUID
            item.ReferencedSOPSequence.append(ref)
        study.ReferencedSeriesSequence.append(item)
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([study])
    return reread(ds)


def one_image_per_series(images: list[Dataset]) -> list[Dataset]:
    return list({i.SeriesInstanceUID: i for i in images}.values())


# --- KOS ------------------------------------------------------------------------------------

def test_a_kos_selects_its_evidence_instances_with_its_title_code():
    images = ct_study()
    chosen = [i for i in images if i.SeriesInstanceUID == images[0].SeriesInstanceUID][:2]
    (selection,) = selections(*images, kos(chosen))
    assert selection["code"] == {"coding": [{"system": DCM, "code": "113000", "display": "Of Interest"}]}
    assert selection["seriesUid"] == chosen[0].SeriesInstanceUID
    assert [i["uid"] for i in selection["instance"]] == [c.SOPInstanceUID for c in chosen]
    assert selection["instance"][0]["sopClass"]["code"] == "urn:oid:" + chosen[0].SOPClassUID


def test_one_selection_per_referenced_series():
    images = ct_study()
    chosen = one_image_per_series(images)
    assert len(chosen) == 2
    found = selections(*images, kos(chosen))
    assert [s["seriesUid"] for s in found] == [c.SeriesInstanceUID for c in chosen]


def test_a_kos_with_another_document_title_keeps_it():
    images = ct_study()
    title = code_item("113001", "DCM", "Rejected for Quality Reasons")
    (selection,) = selections(*images, kos(images[:1], title))
    assert selection["code"]["coding"][0]["code"] == "113001"


# --- SEG and RTSTRUCT -----------------------------------------------------------------------

def test_a_seg_selects_its_source_images_per_referenced_series():
    (selection,) = selections(seg())
    assert selection["seriesUid"] == SEG_SOURCE_SERIES
    assert [i["uid"] for i in selection["instance"]] == SEG_SOURCES
    assert {i["sopClass"]["code"] for i in selection["instance"]} == {"urn:oid:" + CT_IMAGE}
    assert selection["code"] == {"coding": [{"system": DCM, "code": "121322",
                                             "display": "Source image for image processing operation"}],
                                 "text": "Segmentation source images"}


def test_seg_source_images_outside_referenced_series_are_found_in_the_study():
    ds = seg()
    del ds.ReferencedSeriesSequence  # left: the functional groups' SourceImageSequence (one per frame)
    study = ds.StudyInstanceUID
    source = instance(study=study, sop=SEG_SOURCES[0], PatientID=ds.PatientID, PatientName=ds.PatientName)
    found = selections(reread(ds), source)
    assert [(s["seriesUid"], [i["uid"] for i in s["instance"]]) for s in found] == [
        (source.SeriesInstanceUID, [SEG_SOURCES[0]])]


def test_a_source_image_in_no_series_of_the_study_is_left_out_with_a_warning():
    ds = seg()
    del ds.ReferencedSeriesSequence
    resources = converted(reread(ds))
    assert resources.selections == ()
    assert any(f"source image {SEG_SOURCES[0]} is in no series" in w for w in resources.warnings)


def test_an_rtstruct_selects_its_referenced_series():
    # pydicom's file lists the series but no contour images: the selection is the whole series
    (selection,) = selections(rtstruct())
    assert selection["seriesUid"] == "1.2.826.0.1.3680043.8.498.2010020400001.2.1.1"
    assert "instance" not in selection
    assert selection["code"]["text"] == "RT Structure Set contour images"


def test_an_rtstruct_selects_its_contour_images():
    ds = rtstruct()
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    uids = [generate_uid(entropy_srcs=["contour", str(n)]) for n in range(2)]
    series.ContourImageSequence = Sequence()
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT_IMAGE, uid
        series.ContourImageSequence.append(item)
    (selection,) = selections(reread(ds))
    assert [i["uid"] for i in selection["instance"]] == uids


def test_an_rtstruct_selection_carries_its_frame_of_reference():
    (selection,) = selections(rtstruct())
    assert selection["frameOfReferenceUid"] == "1.2.826.0.1.3680043.8.498.2010020400001.2"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the invalid UID is the point
def test_a_reference_with_an_invalid_uid_is_dropped_with_a_warning():
    ds = seg()
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = "not a uid"
    resources = converted(ds)
    assert resources.selections == ()
    assert any(w.startswith("ReferencedSeriesSequence (0008,1115): unusable item") for w in resources.warnings)


# --- the elements ---------------------------------------------------------------------------

def test_a_selection_refers_to_the_patient_and_derives_from_the_imaging_study():
    resources = converted(seg())
    (selection,) = resources.selections
    assert selection["subject"] == resources.imaging_study["subject"]
    assert selection["derivedFrom"] == [{"reference": imaging_study_url(resources.study_uid)}]
    assert selection["studyUid"] == resources.study_uid
    assert selection["status"] == "available"


def test_a_selection_from_another_study_refers_to_it_by_its_study_uid():
    (selection,) = selections(rtstruct())  # pydicom's RTSTRUCT references another study
    referenced = "1.2.826.0.1.3680043.8.498.2010020400001.2.1"
    assert selection["studyUid"] == referenced
    assert selection["derivedFrom"] == [{"type": "ImagingStudy", "identifier": {
        "system": STUDY_UID_SYSTEM, "value": "urn:oid:" + referenced}}]


def test_the_identifiers_are_the_selecting_instance_uid_and_one_per_series():
    images = ct_study()
    document = kos(one_image_per_series(images))
    found = selections(*images, document)
    for selection in found:
        assert selection["identifier"] == [
            {"system": STUDY_UID_SYSTEM, "value": "urn:oid:" + document.SOPInstanceUID},
            {"system": URI_SYSTEM, "value": selection_url(document.SOPInstanceUID, selection["seriesUid"])}]
    assert len({s["identifier"][1]["value"] for s in found}) == 2


def test_the_same_instances_in_any_order_give_the_same_selections():
    images = ct_study()
    document = kos(one_image_per_series(images))
    assert selections(*images, document) == selections(document, *reversed(images))


def test_r4_makes_no_selection_and_keeps_the_instances():
    resources = convert_study([seg()], MappingOptions())
    assert resources.selections == ()
    (series,) = resources.imaging_study["series"]
    assert series["instance"][0]["uid"] == seg().SOPInstanceUID


def test_r5_keeps_the_selecting_instance_in_the_imaging_study_too():
    resources = converted(seg())
    assert resources.imaging_study["series"][0]["instance"][0]["uid"] == seg().SOPInstanceUID


# --- shapes and merge -----------------------------------------------------------------------

def test_the_bundle_creates_each_selection_conditionally_by_its_identifier():
    resources = converted(seg())
    (selection,) = resources.selections
    (entry,) = [e for e in render(resources, "bundle")["entry"] if e["resource"]["resourceType"] == "ImagingSelection"]
    identifier = selection["identifier"][1]["value"]
    assert entry["fullUrl"] == identifier
    assert entry["request"] == {"method": "POST", "url": "ImagingSelection",
                                "ifNoneExist": f"identifier={URI_SYSTEM}|{identifier}"}
    valid(entry["resource"])


def test_the_contained_shape_contains_the_selections_deriving_from_their_container():
    document = render(converted(seg()), "contained")
    (contained,) = [r for r in document["contained"] if r["resourceType"] == "ImagingSelection"]
    assert contained["id"] == "selection-1"
    assert contained["derivedFrom"] == [{"reference": "#"}]
    assert contained["subject"]["reference"] == "#patient"
    valid(contained)


@pytest.mark.parametrize("shape", ["bundle", "contained"])
def test_both_shapes_read_back_to_the_same_selections(shape):
    resources = converted(seg(), rtstruct_in(seg()))
    document = render(resources, shape)
    parsed = parse_resources(document)
    assert parsed.selections == resources.selections
    assert render(parsed, shape) == document


def rtstruct_in(other: Dataset) -> Dataset:
    """pydicom's RTSTRUCT moved into other's study and patient (a second selecting instance)."""
    ds = rtstruct()
    ds.StudyInstanceUID, ds.PatientID, ds.PatientName = other.StudyInstanceUID, other.PatientID, other.PatientName
    return ds


def test_a_merge_keeps_the_selections_of_both_parts_and_a_resend_changes_nothing():
    first = converted(seg())
    second = converted(rtstruct_in(seg()))
    merged = merge_resources(first, second)
    assert merged.selections == (*first.selections, *second.selections)
    assert merge_resources(merged, second).selections == merged.selections
    assert merge_resources(merged, first).selections == merged.selections


def test_a_selection_bundle_refers_to_the_study_and_patient_on_the_server():
    resources = converted(seg())
    request = selection_bundle(resources, "Patient/7", "ImagingStudy/s1")
    (entry,) = request["entry"]
    assert request["type"] == "transaction"
    assert entry["resource"]["subject"]["reference"] == "Patient/7"
    assert entry["resource"]["subject"]["identifier"] == resources.imaging_study["subject"]["identifier"]
    assert entry["resource"]["derivedFrom"] == [{"reference": "ImagingStudy/s1"}]
    identifier = selection_identifier(resources.selections[0])
    assert entry["request"]["ifNoneExist"] == f"identifier={URI_SYSTEM}|{identifier['value']}"
    valid(entry["resource"])


def test_a_selection_bundle_without_a_server_patient_keeps_only_the_subject_identifier():
    resources = converted(seg())
    (entry,) = selection_bundle(resources, None, "ImagingStudy/s1")["entry"]
    assert entry["resource"]["subject"] == {"identifier": resources.imaging_study["subject"]["identifier"]}


def test_a_study_without_selections_has_no_selection_bundle():
    assert selection_bundle(convert_study([seg()], MappingOptions()), "Patient/7", "ImagingStudy/s1") is None


def test_a_document_with_a_selection_without_its_identifier_is_refused():
    document = render(converted(seg()), "bundle")
    (entry,) = [e for e in document["entry"] if e["resource"]["resourceType"] == "ImagingSelection"]
    entry["resource"] = {**entry["resource"], "identifier": entry["resource"]["identifier"][:1]}
    with pytest.raises(MappingError, match=f"an ImagingSelection has no {URI_SYSTEM} identifier"):
        parse_resources(document)
