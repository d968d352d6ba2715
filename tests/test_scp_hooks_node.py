"""The end-of-study hook in the node: `dicom-fhir-scp serve` in a subprocess, a pynetdicom sender,
and a hook that records what it was given (tests/test_scp_hooks.py has the rules in detail)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage

from tests.dicomgen import generate_study
from tests.scp_node import NodeProcess, instance_uids
from tests.scu import keep_responses
from tests.hook_scripts import record, write_hook

pytestmark = pytest.mark.interop


def send(node: NodeProcess, files: list[Path]) -> list[int]:
    ae = AE(ae_title="PYSCU")
    ae.requested_contexts = [build_context(CTImageStorage)]
    assoc = keep_responses(ae.associate("127.0.0.1", node.port, ae_title=node.ae_title))
    assert assoc.is_established, "association refused"
    try:
        return [assoc.send_c_store(pydicom.dcmread(path)).Status for path in files]
    finally:
        assoc.release()


def test_the_hook_sees_the_delivered_study_and_its_output_file(tmp_path):
    script = write_hook(tmp_path / "hook")
    # The hook copies nothing: it records whether the file it is given exists at that moment.
    config = f'[hooks]\non_delivered = ["{script}", "{{study_uid}}", "{{output}}", "{{instances}}", ' \
             f'"{{series}}", "{{fhir}}"]\ntimeout = 30\n'
    node = NodeProcess(tmp_path / "node", config=config, idle_timeout=0.5).start()
    try:
        study = generate_study(tmp_path / "study", n_instances=4, n_series=2)
        assert send(node, study.files) == [0] * 4
        seen = record(script, study.study_uid, timeout=30)
        output = node.output / f"{study.study_uid}.json"
        assert seen["argv"] == [study.study_uid, str(output.absolute()), "4", "2", ""]
        assert seen["output_exists"]
        assert instance_uids(json.loads(output.read_text())) == set(study.sop_uids)
        assert len(node.deliveries(study.study_uid)) == 1
    finally:
        assert node.stop() == 0
    assert f"study {study.study_uid}: hook {script} exited with 0" in node.log()


def test_a_node_with_a_hook_that_is_not_executable_refuses_to_start(tmp_path):
    plain = tmp_path / "hook.sh"
    plain.write_text("#!/bin/sh\n")
    node = NodeProcess(tmp_path / "node", config=f'[hooks]\non_delivered = ["{plain}"]\n')
    with pytest.raises(AssertionError, match="exited with 2"):
        node.start()
    assert f"hooks.on_delivered: program {plain} is not executable" in node.log()
