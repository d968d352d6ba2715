"""[[senders]]: per-sending-AE settings, matched by AE title and (optionally) address."""

from __future__ import annotations

import pytest

from mapping.errors import ConfigurationError
from mapping.options import MappingOptions
from scp.config import config_from_mapping
from scp.senders import Sender, SenderConflict, SenderTable


def config(**raw):
    return config_from_mapping(raw, environ={})


TWO_SITES = config(
    mapping={"patient_identifier_system": "urn:oid:1.2.999"},
    node={"output_dir": "out"},
    fhir={"url": "http://fhir.example/r4", "destinations": {"hospital_b": {"url": "http://b.example/r4"}}},
    senders=[{"ae_title": "CT_A", "addresses": ["10.0.5.21", "10.0.6.0/24"],
              "patient_identifier_system": "urn:oid:1.2.1", "timezone": "Europe/Berlin"},
             {"ae_title": "CT_B", "patient_identifier_system": "urn:oid:1.2.2", "destinations": ["hospital_b"]},
             {"ae_title": "PACS", "use_issuer_of_patient_id": True,
              "issuer_systems": {"HOSP_A": "urn:oid:1.2.1", "HOSP_B": "urn:oid:1.2.2"}}])
TABLE = SenderTable.from_config(TWO_SITES)


def test_a_sender_entry_with_addresses_matches_its_ae_title_only_from_those():
    assert TABLE.match("CT_A", "10.0.5.21").patient_identifier_system == "urn:oid:1.2.1"
    assert TABLE.match("CT_A", "10.0.6.77") is not None
    assert TABLE.match("CT_A", "10.0.7.1") is None
    assert TABLE.refusal("CT_A", "10.0.7.1").kind == "unpaired address"


def test_a_sender_entry_without_addresses_matches_from_anywhere():
    assert TABLE.match("CT_B", "192.0.2.1").ae_title == "CT_B"
    assert TABLE.refusal("CT_B", "192.0.2.1") is None


def test_unknown_senders_are_allowed_unless_switched_off():
    assert TABLE.refusal("OTHER", "192.0.2.1") is None
    closed = SenderTable.from_config(config(security={"allow_unknown_senders": False},
                                            senders=[{"ae_title": "CT_B"}]))
    assert closed.refusal("OTHER", "192.0.2.1").kind == "unknown sender"
    assert closed.refusal("CT_B", "192.0.2.1") is None


def test_a_senders_settings_override_the_global_mapping_and_the_rest_stays():
    options = TABLE.options_for([Sender("CT_A", "10.0.5.21")])
    assert options.patient_identifier_system == "urn:oid:1.2.1" and options.timezone == "Europe/Berlin"
    assert TABLE.options_for([Sender("OTHER", "192.0.2.1")]) == TWO_SITES.mapping


def test_instances_of_one_study_from_senders_with_different_identity_settings_conflict():
    with pytest.raises(SenderConflict, match="patient_identifier_system"):
        TABLE.options_for([Sender("CT_A", "10.0.5.21"), Sender("CT_B", "192.0.2.1")])


def test_senders_that_agree_on_identity_may_share_a_study():
    assert TABLE.options_for([Sender("CT_B", "1.1.1.1"), Sender("CT_B", "2.2.2.2")]).patient_identifier_system \
        == "urn:oid:1.2.2"


def test_an_instance_spooled_without_an_address_matches_entries_without_addresses_only():
    assert TABLE.match("CT_B") is not None
    assert TABLE.match("CT_A") is None


def test_a_study_goes_to_its_senders_destinations_and_everywhere_when_a_sender_names_none():
    assert TABLE.destinations_for([Sender("CT_B")]) == ("hospital_b",)
    assert TABLE.destinations_for([Sender("CT_A", "10.0.5.21")]) == ("disk", "fhir", "hospital_b")


def test_issuer_systems_are_a_table_of_absolute_uris():
    assert TABLE.options(TABLE.match("PACS")).issuer_systems == {"HOSP_A": "urn:oid:1.2.1", "HOSP_B": "urn:oid:1.2.2"}
    with pytest.raises(ConfigurationError, match="issuer_systems.HOSP_A"):
        MappingOptions(issuer_systems={"HOSP_A": "not a uri"})


@pytest.mark.parametrize("raw, named", [
    ({"senders": [{"addresses": ["10.0.0.1"]}]}, "ae_title is required"),
    ({"senders": [{"ae_title": "A", "addresses": ["ten"]}]}, "addresses"),
    ({"senders": [{"ae_title": "A", "timezone": "Mars/Base"}]}, r"senders\[1\] \(A\).*timezone"),
    ({"senders": [{"ae_title": "A", "destinations": ["nowhere"]}]}, "'nowhere' is not a destination"),
    ({"senders": [{"ae_title": "A", "colour": "red"}]}, r"unknown key senders\[1\].colour"),
    ({"fhir": {"destinations": {"disk": {"url": "http://x"}}}}, "fhir.destinations.disk"),
    ({"fhir": {"destinations": {"b": {"auth": "none"}}}}, "fhir.destinations.b.url: required"),
])
def test_a_bad_sender_or_destination_is_refused_at_start_naming_it(raw, named):
    with pytest.raises(ConfigurationError, match=named):
        config(**raw)


def test_issuer_systems_from_the_environment_are_key_value_pairs():
    from scp.config import load_config

    loaded = load_config(None, {"DICOM_FHIR_SCP_MAPPING_ISSUER_SYSTEMS": "HOSP_A=urn:oid:1.2.1, HOSP_B=urn:oid:1.2.2"})
    assert loaded.mapping.issuer_systems == {"HOSP_A": "urn:oid:1.2.1", "HOSP_B": "urn:oid:1.2.2"}
