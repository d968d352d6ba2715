"""The node (a `serve` subprocess) with a FHIR destination that never answers: the disk output of
other studies keeps flowing (node.delivery_workers), and `stop` still stops."""

from __future__ import annotations

import threading

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.clocks import wait_for
from tests.fhir_standin import Handler, stand_in  # noqa: F401 (fixture)
from tests.scp_node import NodeProcess, node  # noqa: F401 (fixture)
from tests.scu import keep_responses

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("strict_pydicom")]

FIRST = "1.2.826.0.1.3680043.8.498.7101"
SECOND = "1.2.826.0.1.3680043.8.498.7102"


def send_one(scp: NodeProcess, study_uid: str) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = study_uid + ".1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = study_uid + ".1.1"
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = keep_responses(ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title))
    assert assoc.is_established, "association refused"
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


def test_a_stuck_fhir_server_does_not_hold_up_the_disk_output_of_the_next_study(node, stand_in):
    release = threading.Event()
    held: list[str] = []

    def stuck(handler: Handler) -> None:
        if handler.path.endswith("/metadata"):  # a start-up or readiness check gets its answer
            handler.send_json(200, {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"})
            return
        held.append(handler.path)
        release.wait(60)  # bounded: released by the test
        handler.send_json(503, {"resourceType": "OperationOutcome", "issue": []})

    server = stand_in(stuck)
    scp = node(config=f'[fhir]\nurl = "{server.base}"\ntimeout = 60\nrequest_deadline = 60\n\n'
                      f'[node]\ndelivery_workers = 2\n')
    try:
        send_one(scp, FIRST)
        wait_for(lambda: held, 30, "the first study's FHIR request to be held by the stuck server")
        send_one(scp, SECOND)
        wait_for(lambda: scp.output_of(SECOND), 30, "the second study's disk output while the first is stuck")
        assert not release.is_set() and scp.output_of(FIRST) is not None
    finally:
        release.set()
    assert scp.stop() == 0
    assert scp.spooled(FIRST) and scp.spooled(SECOND)  # FHIR never took them: both stay in the spool
