"""Coded values: designator → system, and the bodySite/laterality tables (PS3.16)."""

from __future__ import annotations

import pytest
from pydicom.sr._concepts_dict import concepts

from mapping.bodysite import BODY_PARTS, LATERALITIES, body_site, laterality
from mapping.codes import CodedValue, codeable_concept, coding, system_for

SCT = "http://snomed.info/sct"


@pytest.mark.parametrize("designator,system", [
    ("DCM", "http://dicom.nema.org/resources/ontology/DCM"), ("SCT", SCT), ("SRT", SCT),
    ("LN", "http://loinc.org"), ("RADLEX", "http://www.radlex.org"), ("UCUM", "http://unitsofmeasure.org"),
    ("ICD10", "http://hl7.org/fhir/sid/icd-10")])
def test_known_designators_map_to_their_fhir_systems(designator, system):
    assert system_for(designator) == system


@pytest.mark.parametrize("designator,system", [("99HOSP", "urn:dicom:coding-scheme:99HOSP"),
                                               ("L", "urn:dicom:coding-scheme:L"),
                                               ("MY SCHEME", "urn:dicom:coding-scheme:MY_SCHEME")])
def test_any_other_designator_becomes_a_dicom_coding_scheme_urn(designator, system):
    assert system_for(designator) == system


def test_coding_carries_code_display_and_system():
    assert coding(CodedValue("24627-2", "LN", "CT Chest")) == {"system": "http://loinc.org", "code": "24627-2",
                                                                "display": "CT Chest"}


def test_a_snomed_rt_code_is_translated_to_its_snomed_ct_concept():
    # T-D3000 "Chest" in SNOMED RT is 51185008 in SNOMED CT (pydicom's SRT → SCT table).
    assert coding(CodedValue("T-D3000", "SRT", "Chest"))["code"] == "51185008"


def test_an_untranslatable_snomed_rt_code_is_not_passed_off_as_snomed_ct():
    assert coding(CodedValue("X-99999", "SRT", "?"))["system"] == "urn:dicom:coding-scheme:SRT"


def test_codeable_concept_falls_back_to_text():
    assert codeable_concept([], "chest pain") == {"text": "chest pain"}
    assert codeable_concept([]) is None


def test_body_part_table_maps_chest_as_the_contract_says():
    assert body_site("CHEST") == {"system": SCT, "code": "43799004", "display": "Chest"}


@pytest.mark.parametrize("term,code", [("ABDOMEN", "818981001"), ("HEAD", "69536005"), ("CSPINE", "122494005"),
                                       ("KNEE", "72696002"), ("WHOLEBODY", "38266002"), ("BREAST", "76752008"),
                                       ("PELVIS", "816092008"), ("HEADNECK", "774007"), ("LSPINE", "122496007")])
def test_body_part_table_covers_common_annex_l_terms(term, code):
    assert body_site(term)["code"] == code


def test_body_part_table_codes_and_displays_agree_with_pydicoms_snomed_data():
    known = {(code, meaning) for entries in concepts["SCT"].values() for code, (meaning, _) in entries.items()}
    assert len(BODY_PARTS) > 200
    for term, (code, display) in BODY_PARTS.items():
        if term == "CHEST":
            continue  # 43799004, as the contract states
        assert (code, display) in known, term


def test_an_unknown_body_part_keeps_its_text_as_display_only():
    assert body_site("ELBOWISH") == {"display": "ELBOWISH"}
    assert body_site("") is None


@pytest.mark.parametrize("value,code,display", [("R", "24028007", "Right"), ("L", "7771000", "Left"),
                                                ("B", "51440002", "Right and left"), ("U", "66459002", "Unilateral")])
def test_laterality_table(value, code, display):
    assert laterality(value) == {"system": SCT, "code": code, "display": display}


def test_no_laterality_for_other_values():
    assert laterality("X") is None and laterality("") is None and len(LATERALITIES) == 4
