"""Who may talk to the node: allow-lists, the called AE title, DICOM TLS (with and without
peer verification), against the node started as a subprocess (tests/scp_node.py).

test_scp_node.py shows each allow-list refusing; here: the exact A-ASSOCIATE-RJ each
refusal puts on the wire (read by hand, tests/dicom_wire.py), that an allowed peer stores
a study while both lists are on, the called AE title check switched off, and TLS with
certificates made by the test (tests/tls_certs.py): pynetdicom and dcmtk storescu over
TLS, plain TCP refused on the TLS port, and, with peer verification, clients without a
certificate or with one from an unknown CA refused.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time

import pytest

from tests.clocks import wait_for
from tests.conftest import require_tool
from tests.dicom_wire import WireClient, associate_rq
from tests.dicomgen import GeneratedStudy, generate_study
from tests.scp_node import NodeProcess, instance_uids
from tests.scu import associate
from tests.tls_certs import Certificates, make_certificates

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("strict_pydicom")]

# A-ASSOCIATE-RJ: result 1 (rejected-permanent), source 1 (service user), diagnostic (PS3.8 9.3.4)
NO_REASON, CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED = 1, 3, 7


@pytest.fixture
def node(tmp_path):
    started: list[NodeProcess] = []

    def start(config: str = "", **kwargs) -> NodeProcess:
        process = NodeProcess(tmp_path / f"node{len(started)}", config=config or None, **kwargs).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


def send_study(node: NodeProcess, study: GeneratedStudy, **kwargs) -> None:
    assoc = associate(node.port, called=node.ae_title, **kwargs)
    assert assoc.is_established, "association refused"
    try:
        statuses = [assoc.send_c_store(path).Status for path in study.files]
    finally:
        assoc.release()
    assert statuses == [0x0000] * len(study.files)


def assert_delivered(node: NodeProcess, study: GeneratedStudy) -> None:
    node.wait_for_deliveries(study.study_uid)
    assert instance_uids(node.output_of(study.study_uid)) == set(study.sop_uids)


def rejection(node: NodeProcess, calling: str, called: str) -> str | tuple:
    client = WireClient.connect(node.port)
    try:
        return client.associate(calling=calling, called=called)
    finally:
        client.close()


# --- allow-lists and the called AE title --------------------------------------------------------


ALLOW_LISTS = '[security]\nallowed_calling_aets = ["MODALITY", "PACS"]\nallowed_addresses = ["127.0.0.0/8"]\n'


def test_a_peer_on_both_allow_lists_stores_a_study(node, tmp_path):
    scp = node(ALLOW_LISTS)
    study = generate_study(tmp_path / "study", 3, 1)
    send_study(scp, study, calling="PACS")
    assert_delivered(scp, study)


def test_a_refused_calling_ae_title_gets_an_a_associate_rj_saying_so_and_a_log_line(node):
    scp = node(ALLOW_LISTS)
    assert rejection(scp, "INTRUDER", "FHIRSCP") == ("rejected", 1, 1, CALLING_AE_NOT_RECOGNIZED)
    assert "association from INTRUDER at 127.0.0.1 (called FHIRSCP) rejected: calling AE title 'INTRUDER' " \
           "is not in security.allowed_calling_aets" in scp.log()


def test_a_wrong_called_ae_title_gets_an_a_associate_rj_saying_so(node):
    scp = node()
    assert rejection(scp, "MODALITY", "ELSEWHERE") == ("rejected", 1, 1, CALLED_AE_NOT_RECOGNIZED)
    assert "rejected: called AE title 'ELSEWHERE' is not this node's ('FHIRSCP'" in scp.log()


def test_an_address_off_the_allow_list_gets_an_a_associate_rj_and_a_log_line(node):
    scp = node('[security]\nallowed_addresses = ["192.0.2.0/24", "::1"]\n')
    assert rejection(scp, "MODALITY", "FHIRSCP") == ("rejected", 1, 1, NO_REASON)
    assert "rejected: peer address 127.0.0.1 is not in security.allowed_addresses" in scp.log()


def test_with_require_called_aet_off_any_called_ae_title_is_accepted(node, tmp_path):
    scp = node("[security]\nrequire_called_aet = false\n")
    assert rejection(scp, "MODALITY", "ANYTHING") == "accepted"
    study = generate_study(tmp_path / "study", 2, 1)
    assoc = associate(scp.port, calling="MODALITY", called="ANYTHING")
    assert [assoc.send_c_store(path).Status for path in study.files] == [0x0000, 0x0000]
    assoc.release()
    assert_delivered(scp, study)


# --- DICOM TLS --------------------------------------------------------------------------------------


def tls_config(certificates: Certificates, verify_peer: bool = False) -> str:
    config = (f'[security]\ntls_cert = "{certificates.server.cert}"\ntls_key = "{certificates.server.key}"\n'
              f'tls_ca = "{certificates.ca}"\n')
    return config + ("tls_verify_peer = true\n" if verify_peer else "")


def test_a_study_sent_over_tls_by_pynetdicom_is_stored(node, tmp_path, certificates):
    scp = node(tls_config(certificates))
    assert "(DICOM TLS)" in scp.log()
    study = generate_study(tmp_path / "study", 3, 1)
    send_study(scp, study, tls=certificates.client_context())
    assert_delivered(scp, study)


def test_a_study_sent_over_tls_by_dcmtk_storescu_is_stored(node, tmp_path, certificates):
    tool = require_tool("storescu")
    scp = node(tls_config(certificates, verify_peer=True))
    study = generate_study(tmp_path / "study", 3, 1)
    result = subprocess.run([tool, "+tls", str(certificates.client.key), str(certificates.client.cert),
                             "+cf", str(certificates.ca), "-aet", "MODALITY", "-aec", scp.ae_title,
                             "127.0.0.1", str(scp.port), *map(str, study.files)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_delivered(scp, study)
    assert "association from MODALITY at 127.0.0.1" in scp.log()


def test_plain_tcp_is_refused_on_the_tls_port_and_the_node_keeps_serving(node, tmp_path, certificates):
    scp = node(tls_config(certificates))
    client = WireClient.connect(scp.port, timeout=10)
    client.send(associate_rq("PLAIN", "FHIRSCP"))
    assert client.answer() != "A-ASSOCIATE-AC"
    client.close()
    assert not associate(scp.port, calling="PLAIN", timeout=5).is_established
    study = generate_study(tmp_path / "study", 2, 1)
    send_study(scp, study, tls=certificates.client_context())
    assert_delivered(scp, study)
    assert re.search(r"WARNING .*TLS handshake with 127\.0\.0\.1:\d+ failed", scp.log()), scp.log()


def test_a_silent_connection_on_the_tls_port_does_not_hold_up_other_senders(node, tmp_path, certificates):
    # The TLS handshake must happen on the connection's own thread, not where connections are
    # accepted: a peer that connects and says nothing (a stuck sender, a port scan) would
    # otherwise keep every other sender out.
    scp = node(tls_config(certificates))
    with socket.create_connection(("127.0.0.1", scp.port)):
        time.sleep(0.2)  # real time for the node to accept the silent connection before the sender comes
        study = generate_study(tmp_path / "study", 2, 1)
        send_study(scp, study, timeout=10, tls=certificates.client_context())
    assert_delivered(scp, study)


@pytest.mark.parametrize("who", ["no certificate", "a certificate from an unknown CA"])
def test_with_peer_verification_a_client_without_a_valid_certificate_is_refused(node, tmp_path, certificates, who):
    scp = node(tls_config(certificates, verify_peer=True))
    pair = None if who == "no certificate" else certificates.stranger
    refused = associate(scp.port, calling="MODALITY", timeout=5, tls=certificates.client_context(pair))
    assert not refused.is_established
    reason = "did not return a certificate" if pair is None else "certificate verify failed"
    wait_for(lambda: re.search(rf"WARNING .*TLS handshake with 127\.0\.0\.1:\d+ failed: .*{reason}", scp.log()),
             10, f"the refusal in the log:\n{scp.log()}")
    assert not list(scp.spool.glob("*/*.dcm"))
    study = generate_study(tmp_path / "study", 2, 1)
    send_study(scp, study, calling="MODALITY", tls=certificates.client_context(certificates.client))
    assert_delivered(scp, study)
