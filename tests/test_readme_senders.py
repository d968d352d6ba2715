"""README "For PACS administrators": every TOML example loads, and the two-hospital example
("Several sites, one node") does what the text around it says (scp.senders, no sockets)."""

from __future__ import annotations

import re
import tomllib

import pytest

from scp.config import Config, config_from_mapping
from scp.senders import Sender, SenderConflict, SenderTable
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
ADMINISTRATORS = README[README.index("## For PACS administrators"):]
SECRETS = {"FHIR_TOKEN": "central", "HOSPITAL_B_FHIR_TOKEN": "b"}


def toml_blocks(text: str) -> list[str]:
    return re.findall(r"^```toml\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def load(block: str) -> Config:
    return config_from_mapping(tomllib.loads(block), environ=SECRETS, source="README")


@pytest.mark.parametrize("block", toml_blocks(ADMINISTRATORS))
def test_every_toml_example_for_administrators_loads(block):
    load(block)


TWO_HOSPITALS = load(next(b for b in toml_blocks(ADMINISTRATORS) if "[fhir.destinations.hospital_b]" in b))
TABLE = SenderTable.from_config(TWO_HOSPITALS)
CT_A, MR_B, PACS = Sender("CT_HOSP_A", "10.1.0.21"), Sender("MR_HOSP_B", "10.2.0.40"), Sender("PACS_MAIN", "10.0.0.5")


def test_the_two_hospitals_patient_ids_get_different_systems():
    assert TABLE.options_for([CT_A]).patient_identifier_system != TABLE.options_for([MR_B]).patient_identifier_system


def test_the_pacs_issuers_map_to_the_hospitals_own_systems():
    pacs = TABLE.options_for([PACS])
    assert pacs.use_issuer_of_patient_id
    assert pacs.issuer_systems == {"HOSP_A": TABLE.options_for([CT_A]).patient_identifier_system,
                                   "HOSP_B": TABLE.options_for([MR_B]).patient_identifier_system}


def test_hospital_b_goes_to_its_own_server_and_the_central_one_and_the_pacs_to_the_central_one_only():
    assert TABLE.destinations_for([MR_B]) == ("fhir", "hospital_b")
    assert TABLE.destinations_for([PACS]) == ("fhir",)
    assert TWO_HOSPITALS.destinations["hospital_b"].token == "b" and TWO_HOSPITALS.fhir.token == "central"


def test_only_the_three_senders_from_their_addresses_may_connect():
    assert TABLE.refusal("STRANGER", "10.1.0.21").kind == "unknown sender"
    assert TABLE.refusal("CT_HOSP_A", "10.2.0.40").kind == "unpaired address"
    assert all(TABLE.refusal(s.ae_title, s.address) is None for s in (CT_A, MR_B, PACS))


def test_a_study_split_between_the_ct_and_the_pacs_is_held_back():
    with pytest.raises(SenderConflict, match="CT_HOSP_A at 10.1.0.21 and PACS_MAIN at 10.0.0.5"):
        TABLE.options_for([CT_A, PACS])
