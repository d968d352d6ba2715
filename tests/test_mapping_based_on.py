"""ImagingStudy.basedOn and the reasons of the requests (mapping/README.md, "ImagingStudy": basedOn,
reasonCode), on real headers: pydicom's examples_overlay.dcm carries a RequestAttributesSequence."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from tests.mapping_cases import CT_SMALL, code_item, convert, instance, read, reread, study_of

ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}


def request(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def issuer(**values: str) -> Sequence:
    return Sequence([request(**values)])


def identifiers(study: dict) -> list[tuple[str, str | None, str]]:
    assert all(b["type"] == "ServiceRequest" and set(b) == {"type", "identifier"} for b in study.get("basedOn", []))
    return [(b["identifier"]["type"]["coding"][0]["code"], b["identifier"].get("system"), b["identifier"]["value"])
            for b in study.get("basedOn", [])]


def test_the_accession_number_is_a_service_request_reference_by_the_accession_identifier():
    ds = read(CT_SMALL)
    ds.AccessionNumber = "A-1"
    ds.IssuerOfAccessionNumberSequence = issuer(UniversalEntityID="1.2.3.4", UniversalEntityIDType="ISO")
    study = study_of(ds)
    accession = next(i for i in study["identifier"] if i.get("type") == ACSN)
    assert study["basedOn"] == [{"type": "ServiceRequest", "identifier": accession}]
    assert accession["system"] == "urn:oid:1.2.3.4"


def test_no_accession_and_no_request_gives_no_based_on():
    assert "basedOn" not in study_of(instance())


def test_request_items_add_their_accession_placer_and_filler_order_numbers():
    ds = instance(RequestAttributesSequence=Sequence([
        request(AccessionNumber="A-2", IssuerOfAccessionNumberSequence=issuer(LocalNamespaceEntityID="urn:oid:9.8"),
                PlacerOrderNumberImagingServiceRequest="P-7",
                OrderPlacerIdentifierSequence=issuer(UniversalEntityID="https://ris.example/placer",
                                                     UniversalEntityIDType="URI"),
                FillerOrderNumberImagingServiceRequest="F-9")]))
    assert identifiers(study_of(ds)) == [("ACSN", "urn:oid:9.8", "A-2"), ("PLAC", "https://ris.example/placer", "P-7"),
                                         ("FILL", None, "F-9")]


def test_a_request_item_with_the_studys_accession_number_adds_no_duplicate():
    ds = instance(AccessionNumber="A-1", RequestAttributesSequence=Sequence([
        request(AccessionNumber="A-1"), request(AccessionNumber="A-1", RequestedProcedureID="RP-1")]))
    assert identifiers(study_of(ds, accession_system="urn:oid:1.2")) == [("ACSN", "urn:oid:1.2", "A-1")]


def test_a_requested_procedure_id_alone_is_no_service_request_identifier():
    # examples_overlay.dcm: a real MR header whose request item has only a RequestedProcedureID
    # (the accession number is in the dataset itself).
    from pydicom.data import get_testdata_file
    ds = read(get_testdata_file("examples_overlay.dcm"))
    assert ds.RequestAttributesSequence[0].RequestedProcedureID and "AccessionNumber" not in ds.RequestAttributesSequence[0]
    assert identifiers(study_of(ds)) == [("ACSN", None, ds.AccessionNumber)]


def test_the_reasons_of_the_requests_join_the_studys_reason_codes_once_each():
    ds = instance(ReasonForRequestedProcedureCodeSequence=Sequence([code_item("R51", "I10", "Headache")]),
                  RequestAttributesSequence=Sequence([
                      request(ReasonForRequestedProcedureCodeSequence=Sequence([
                          code_item("R51", "I10", "Headache"), code_item("G43", "I10", "Migraine")]))]))
    assert [c["coding"][0]["code"] for c in study_of(ds)["reasonCode"]] == ["R51", "G43"]


def test_a_request_reason_code_replaces_the_free_text_reason():
    ds = instance(ReasonForTheRequestedProcedure="headache", RequestAttributesSequence=Sequence([
        request(ReasonForRequestedProcedureCodeSequence=Sequence([code_item("R51", "I10", "Headache")]))]))
    assert [c["coding"][0]["code"] for c in study_of(ds)["reasonCode"]] == ["R51"]


def test_request_items_read_from_a_part10_file_give_the_same_based_on():
    ds = instance(AccessionNumber="A-1", RequestAttributesSequence=Sequence([
        request(AccessionNumber="A-2", PlacerOrderNumberImagingServiceRequest="P-7")]))
    assert identifiers(study_of(reread(ds))) == identifiers(study_of(ds)) == [
        ("ACSN", None, "A-1"), ("ACSN", None, "A-2"), ("PLAC", None, "P-7")]


def test_an_issuer_that_is_neither_oid_nor_uri_is_no_system_and_says_so():
    ds = instance(RequestAttributesSequence=Sequence([request(
        FillerOrderNumberImagingServiceRequest="F-9", OrderFillerIdentifierSequence=issuer(LocalNamespaceEntityID="RIS A"))]))
    resources = convert(ds)
    assert identifiers(resources.imaging_study) == [("FILL", None, "F-9")]
    assert any(w.startswith("RequestAttributesSequence (0040,0275) > OrderFillerIdentifierSequence (0040,0027)")
               for w in resources.warnings)
