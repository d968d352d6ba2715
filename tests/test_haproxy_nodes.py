"""Several nodes behind HAProxy (Debian's package, TCP mode), one FHIR server as the single truth.

Three nodes, each with its own spool and output, behind one HAProxy with the README's
configuration: associations balanced by least connections (round-robin among equals), each
node health-checked on /readyz on its operations port.
One study is sent in six parts, six associations: its instances land on different nodes,
each node delivers what it received, and the validating FHIR engine ends with one
ImagingStudy holding every instance and one Patient (conditional create + If-Match).
The whole run lives in a private network namespace (tests/haproxy_nodes.py under
`unshare -n`, root), with the engine inside it. README: "Running several nodes".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import IN_CI, REPO, require_tool
from tests.haproxy_nodes import delivered_count

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("strict_pydicom")]

PARTS, INSTANCES = 6, 12


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    require_tool("haproxy")
    require_tool("unshare")
    if os.geteuid() != 0:
        message = "a private network namespace for HAProxy and the nodes needs root"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    workdir = tmp_path_factory.mktemp("haproxy")
    result = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.haproxy_nodes", str(workdir),
                             str(PARTS), str(INSTANCES)], capture_output=True, text=True, timeout=240, cwd=REPO)
    if result.returncode != 0:
        logs = "\n".join(f"--- {path.relative_to(workdir)}\n{path.read_text(errors='replace')[-2000:]}"
                         for path in sorted(workdir.rglob("*.log")))
        pytest.fail(f"the HAProxy run failed:\n{result.stderr[-3000:]}\n{logs}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_haproxy_health_checks_see_every_node_ready_on_its_ops_endpoint(report):
    assert report["health"] == {f"node{n}": "UP L7OK" for n in range(3)}


def test_associations_of_one_study_land_on_different_nodes(report):
    received = report["received"]
    assert all(received.values()), f"a node received nothing: {received}"  # six associations one after another: two per node
    every = [uid for uids in received.values() for uid in uids]
    assert sorted(every) == sorted(report["sop_uids"])  # each instance on exactly one node


def test_each_node_delivers_what_it_received(report):
    for name, deliveries in report["delivered"].items():
        assert delivered_count(deliveries) == len(report["received"][name]), (name, deliveries)


def test_the_fhir_server_holds_one_imaging_study_with_every_instance_and_one_patient(report):
    [study] = report["imaging_studies"]
    assert {i["uid"] for s in study["series"] for i in s["instance"]} == set(report["sop_uids"])
    assert study["numberOfInstances"] == INSTANCES
    assert len(report["patients"]) == 1
