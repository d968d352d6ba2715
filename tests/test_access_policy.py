"""The association policy without sockets (scp.receive.access.AccessPolicy): the [security]
allow-lists and the [[senders]] table combine, both must allow, checked in a fixed order;
and `serve` warns of a table that refuses everyone. On the wire: tests/test_sender_access.py."""

from __future__ import annotations

from typing import Any

from scp.commands.serve import warn_about_senders
from scp.config import Config, config_from_mapping
from scp.receive.access import AccessPolicy
from scp.receive.status import REJECT_CALLING_AE
from scp.senders import SenderTable


def node_config(**raw: Any) -> Config:
    return config_from_mapping(raw, environ={})



def policy(config: Config) -> AccessPolicy:
    return AccessPolicy.from_config(config.node, config.security, SenderTable.from_config(config))


def test_an_ae_title_on_the_allow_list_is_still_refused_from_an_unpaired_address():
    both = policy(node_config(security={"allowed_calling_aets": ["CT_A"]},
                              senders=[{"ae_title": "CT_A", "addresses": ["10.0.5.21"]}]))
    assert both.check("CT_A", "FHIRSCP", "10.0.5.21") is None
    assert both.check("CT_A", "FHIRSCP", "10.0.9.9")[1].startswith("calling AE title 'CT_A' is paired with")


def test_an_ae_title_with_a_senders_entry_is_still_refused_when_the_allow_list_omits_it():
    both = policy(node_config(security={"allowed_calling_aets": ["CT_A"], "allow_unknown_senders": False},
                              senders=[{"ae_title": "CT_A"}, {"ae_title": "CT_B"}]))
    assert both.check("CT_B", "FHIRSCP", "10.0.5.21") == (
        REJECT_CALLING_AE, "calling AE title 'CT_B' is not in security.allowed_calling_aets")


def test_an_address_off_the_allow_list_is_refused_before_the_senders_table_is_asked():
    both = policy(node_config(security={"allowed_addresses": ["10.0.5.0/24"]},
                              senders=[{"ae_title": "CT_A", "addresses": ["10.0.9.9"]}]))
    assert both.check("CT_A", "FHIRSCP", "10.0.9.9")[1] == "peer address 10.0.9.9 is not in security.allowed_addresses"


def test_serve_warns_when_unknown_senders_are_off_and_no_sender_is_listed():
    [warning] = warn_about_senders(node_config(security={"allow_unknown_senders": False}))
    assert "every association will be refused" in warning
    assert warn_about_senders(node_config(security={"allow_unknown_senders": False},
                                          senders=[{"ae_title": "CT_A"}])) == []
    assert warn_about_senders(Config()) == []
