"""Every configuration key may come from the environment: DICOM_FHIR_SCP_<SECTION>_<KEY>.

Precedence: flag > environment > file > default. Values are typed and validated as
the file's are, and every error names the variable.
"""

from dataclasses import fields
from pathlib import Path

import pytest

from mapping.errors import ConfigurationError
from scp.cli import build_parser
from scp.commands.serve import load
from scp.config import _SECTIONS, Config, environment_overrides, load_config, variable_name


def test_a_variable_sets_its_key():
    assert load_config(None, {"DICOM_FHIR_SCP_NODE_PORT": "104"}).node.port == 104


def test_the_environment_overrides_the_file(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[node]\nport = 2000\nae_title = "FROMFILE"\n')
    loaded = load_config(config, {"DICOM_FHIR_SCP_NODE_PORT": "3000"})
    assert (loaded.node.port, loaded.node.ae_title) == (3000, "FROMFILE")


def test_a_flag_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("DICOM_FHIR_SCP_NODE_PORT", "3000")
    monkeypatch.setenv("DICOM_FHIR_SCP_NODE_AE_TITLE", "FROMENV")
    node = load(build_parser().parse_args(["serve", "--port", "4000"])).node
    assert (node.port, node.ae_title) == (4000, "FROMENV")


def test_dicom_fhir_scp_config_names_the_file(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[node]\nport = 2000\n')
    assert load_config(None, {"DICOM_FHIR_SCP_CONFIG": str(config)}).node.port == 2000


def test_a_config_flag_wins_over_dicom_fhir_scp_config(tmp_path):
    flagged, named = tmp_path / "flag.toml", tmp_path / "env.toml"
    flagged.write_text('[node]\nport = 1\n')
    named.write_text('[node]\nport = 2\n')
    assert load_config(flagged, {"DICOM_FHIR_SCP_CONFIG": str(named)}).node.port == 1


@pytest.mark.parametrize("text, value", [("true", True), ("1", True), ("YES", True), ("false", False),
                                         ("0", False), ("no", False)])
def test_booleans_are_words_or_digits(text, value):
    assert load_config(None, {"DICOM_FHIR_SCP_OPERATIONS_HTTP_ENABLED": text}).operations.http_enabled is value


def test_lists_are_comma_separated():
    config = load_config(None, {"DICOM_FHIR_SCP_SECURITY_ALLOWED_CALLING_AETS": "CT_ROOM1, MR_ROOM2"})
    assert config.security.allowed_calling_aets == ("CT_ROOM1", "MR_ROOM2")


def test_an_empty_list_is_empty():
    assert load_config(None, {"DICOM_FHIR_SCP_SECURITY_ALLOWED_ADDRESSES": ""}).security.allowed_addresses == ()


def test_numbers_and_paths_are_typed():
    config = load_config(None, {"DICOM_FHIR_SCP_NODE_IDLE_TIMEOUT": "2.5", "DICOM_FHIR_SCP_NODE_SPOOL_DIR": "/s"})
    assert (config.node.idle_timeout, config.node.spool_dir) == (2.5, Path("/s"))


def test_empty_means_unset_where_the_file_allows_it(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[node]\narchive_dir = "/archive"\n[mapping]\ntimezone = "Europe/Berlin"\n')
    loaded = load_config(config, {"DICOM_FHIR_SCP_NODE_ARCHIVE_DIR": "", "DICOM_FHIR_SCP_NODE_OUTPUT_DIR": "",
                                  "DICOM_FHIR_SCP_MAPPING_TIMEZONE": ""})
    assert (loaded.node.archive_dir, loaded.node.output_dir, loaded.mapping.timezone) == (None, None, None)


def test_an_empty_string_stays_a_value_where_it_is_one():
    assert load_config(None, {"DICOM_FHIR_SCP_NODE_BIND": ""}).node.bind == ""


@pytest.mark.parametrize("variable, text", [("DICOM_FHIR_SCP_NODE_PORT", "eleven"),
                                            ("DICOM_FHIR_SCP_OPERATIONS_HTTP_ENABLED", "maybe"),
                                            ("DICOM_FHIR_SCP_NODE_IDLE_TIMEOUT", "soon"),
                                            ("DICOM_FHIR_SCP_NODE_PORT", "")])
def test_a_value_of_the_wrong_type_names_the_variable(variable, text):
    with pytest.raises(ConfigurationError, match=variable):
        load_config(None, {variable: text})


@pytest.mark.parametrize("variable, text", [("DICOM_FHIR_SCP_NODE_PORT", "70000"),
                                            ("DICOM_FHIR_SCP_MAPPING_TIMEZONE", "Mars/Olympus"),
                                            ("DICOM_FHIR_SCP_SECURITY_TLS_CERT", "/etc/node.crt"),
                                            ("DICOM_FHIR_SCP_FHIR_URL", "ftp://fhir.example")])
def test_a_value_the_dataclass_refuses_names_the_variable(variable, text):
    with pytest.raises(ConfigurationError, match=variable):
        load_config(None, {variable: text})


def test_an_unknown_variable_is_an_error_naming_it():
    with pytest.raises(ConfigurationError, match="DICOM_FHIR_SCP_NODE_PROT"):
        load_config(None, {"DICOM_FHIR_SCP_NODE_PROT": "104"})


def test_other_variables_are_ignored():
    assert load_config(None, {"DICOM_FHIR_SCPX": "1", "PORT": "1"}).node.port == 11112


def test_a_secret_may_come_from_its_variable_or_a_variable_it_names():
    direct = load_config(None, {"DICOM_FHIR_SCP_FHIR_URL": "https://f.example", "DICOM_FHIR_SCP_FHIR_AUTH": "bearer",
                                "DICOM_FHIR_SCP_FHIR_TOKEN": "s3cret"})
    named = load_config(None, {"DICOM_FHIR_SCP_FHIR_URL": "https://f.example", "DICOM_FHIR_SCP_FHIR_AUTH": "bearer",
                               "DICOM_FHIR_SCP_FHIR_TOKEN_ENV": "TOK", "TOK": "s3cret"})
    assert direct.fhir.token == named.fhir.token == "s3cret"
    assert "s3cret" not in repr(direct)


def default_as_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(value)
    if hasattr(value, "items"):  # a table: KEY=VALUE,KEY=VALUE
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def test_every_key_of_every_section_has_a_variable():
    """Generic over _SECTIONS: a section or key added there gets its variable without environment code."""
    environ = {variable_name(section, f.name): default_as_text(getattr(cls(), f.name))
               for section, cls in _SECTIONS.items() for f in fields(cls)}
    assert len(environ) == sum(len(fields(cls)) for cls in _SECTIONS.values())
    assert {(o.section, o.key) for o in environment_overrides(environ)} == {
        (section, f.name) for section, cls in _SECTIONS.items() for f in fields(cls)}
    assert load_config(None, environ) == Config()
