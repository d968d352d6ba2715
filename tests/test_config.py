"""Configuration is validated at start-up with errors that name the key."""

import re
from dataclasses import fields
from pathlib import Path

import pytest

from mapping.errors import ConfigurationError
from scp.config import Config, SenderConfig, config_from_mapping, default_workers, load_config, override

REPO = Path(__file__).resolve().parent.parent


def test_documented_example_config_loads_and_equals_the_defaults():
    # No environment: CI sets DICOM_FHIR_SCP_NODE_WORKERS, which rightly overrides the file.
    assert load_config(REPO / "config" / "dicom-fhir-scp.toml", {}) == Config()


def test_unknown_key_is_named():
    with pytest.raises(ConfigurationError, match=r"node\.prot"):
        config_from_mapping({"node": {"prot": 1}}, environ={})


def test_wrong_type_is_named():
    with pytest.raises(ConfigurationError, match=r"node\.port: expected an integer"):
        config_from_mapping({"node": {"port": "11112"}}, environ={})


def test_secret_from_environment_and_hidden_in_repr():
    config = config_from_mapping(
        {"fhir": {"url": "https://f.example", "auth": "bearer", "token_env": "TOK"}}, environ={"TOK": "s3cret"})
    assert config.fhir.token == "s3cret"
    assert "s3cret" not in repr(config)


def test_missing_environment_variable_is_named():
    with pytest.raises(ConfigurationError, match="FHIR_TOKEN"):
        config_from_mapping({"fhir": {"token_env": "FHIR_TOKEN"}}, environ={})


def test_auth_mode_requires_its_credentials():
    with pytest.raises(ConfigurationError, match=r"fhir\.password"):
        config_from_mapping({"fhir": {"url": "https://f.example", "auth": "basic", "username": "u"}}, environ={})


def test_empty_output_dir_disables_disk_sink():
    assert config_from_mapping({"node": {"output_dir": ""}}, environ={}).node.output_dir is None


def test_command_line_overrides_file():
    config = config_from_mapping({"node": {"port": 104}}, environ={})
    assert override(config, "node", port=4242, ae_title=None).node.port == 4242
    assert override(config, "node", port=None).node.port == 104


def test_invalid_timezone_is_rejected():
    with pytest.raises(ConfigurationError, match="timezone"):
        config_from_mapping({"mapping": {"timezone": "Mars/Olympus"}}, environ={})


# A commented example line: a table header ("# [fhir.destinations.b]", "# [[senders]]") or a key ("# url = ...").
COMMENTED_EXAMPLE = re.compile(r"^# (\[\[?[a-z_.]+\]\]?\s*$|[a-z_]+ = )")


def uncommented_examples(text: str) -> str:
    return "\n".join(line[2:] if COMMENTED_EXAMPLE.match(line) else line for line in text.splitlines())


def test_every_commented_example_of_the_documented_config_loads_when_uncommented(tmp_path):
    copy = tmp_path / "examples.toml"
    copy.write_text(uncommented_examples((REPO / "config" / "dicom-fhir-scp.toml").read_text()))
    secrets = {name: "x" for name in ("FHIR_TOKEN", "FHIR_PASSWORD", "FHIR_CLIENT_SECRET", "HOSPITAL_B_FHIR_TOKEN")}
    config = load_config(copy, secrets)
    assert [s.ae_title for s in config.senders] == ["CT_HOSP_A", "MR_HOSP_B", "PACS_MAIN"]
    assert config.senders[1].destinations == ("fhir", "hospital_b")
    assert config.destinations["hospital_b"].url == "https://fhir.hospital-b.example/R4"
    assert config.destinations["hospital_b"].token == "x"
    assert config.mapping.issuer_systems["HOSP_B"] == config.senders[1].patient_identifier_system
    assert config.senders[2].issuer_systems == config.mapping.issuer_systems
    assert config.security.allow_unknown_senders is True


def test_every_senders_key_is_described_in_the_documented_config():
    text = (REPO / "config" / "dicom-fhir-scp.toml").read_text()
    described = set(re.findall(r"^#   ([a-z_]+) ", text, re.MULTILINE))
    assert {f.name for f in fields(SenderConfig)} <= described


def test_node_workers_default_to_the_cpus_this_process_may_use():
    assert Config().node.workers == default_workers() >= 1


@pytest.mark.parametrize("workers", [0, 65])
def test_node_workers_outside_1_to_64_are_refused(workers):
    with pytest.raises(ConfigurationError, match=r"node\.workers"):
        config_from_mapping({"node": {"workers": workers}}, environ={})


def test_node_worker_sockets_must_be_reuseport_or_handover():
    with pytest.raises(ConfigurationError, match=r"node\.worker_sockets.*reuseport"):
        config_from_mapping({"node": {"worker_sockets": "fork"}}, environ={})
