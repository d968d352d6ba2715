"""`serve` settings: the config file, then command-line flags over it (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mapping.errors import ConfigurationError
from scp.cli import build_parser
from scp.commands.serve import load


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[node]\nport = 2000\nae_title = "FROMFILE"\nidle_timeout = 45\nspool_dir = "/var/spool/x"\n')
    args = build_parser().parse_args(["serve", "--config", str(config), "--port", "3000", "-aet", "FROMFLAG"])
    node = load(args).node
    assert (node.port, node.ae_title, node.idle_timeout, node.spool_dir) == (3000, "FROMFLAG", 45, Path("/var/spool/x"))


def test_defaults_without_a_config_file():
    node = load(build_parser().parse_args(["serve"])).node
    assert (node.port, node.ae_title, node.idle_timeout, node.output_dir, node.spool_dir) == (
        11112, "FHIRSCP", 30, Path("fhir-output"), Path("spool"))


def test_every_issue_3_flag_is_accepted():
    args = build_parser().parse_args(["serve", "--port", "104", "--ae-title", "X", "--bind", "127.0.0.1",
                                      "-od", "o", "--spool-dir", "s", "--idle-timeout", "5",
                                      "--fhir-url", "http://fhir.example/R4", "-v"])
    config = load(args)
    assert config.node.output_dir == Path("o") and config.fhir.url == "http://fhir.example/R4"


def test_the_documented_config_file_loads_and_equals_the_defaults():
    from scp.config import Config, load_config
    # No environment: CI sets DICOM_FHIR_SCP_NODE_WORKERS, which rightly overrides the file.
    documented = load_config(Path(__file__).resolve().parent.parent / "config" / "dicom-fhir-scp.toml", {})
    assert documented.node == Config().node
    assert documented.security == Config().security


def test_a_bad_flag_value_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="node.idle_timeout"):
        load(build_parser().parse_args(["serve", "--idle-timeout", "0"]))
