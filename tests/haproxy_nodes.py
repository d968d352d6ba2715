"""Three nodes behind HAProxy (TCP mode), one FHIR engine, inside a private network namespace.

Run as `unshare -n python -m tests.haproxy_nodes WORKDIR PARTS INSTANCES` from the repository
(root): the namespace holds only loopback, so HAProxy's fixed front port and the engine
are private to this run, and the engine runs inside it too (the nodes reach it on
127.0.0.1). Sends one generated study in PARTS parts, each over its own association
through HAProxy, and prints one JSON line: what each node received and delivered, what
HAProxy's health checks said, and the engine's ImagingStudy and Patient resources.
The pytest test (tests/test_haproxy_nodes.py) checks the result.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.clocks import wait_for
from tests.conftest import REPO
from tests.dicomgen import GeneratedStudy, generate_study
from tests.fhir_engine import FhirEngine
from tests.fhir_nodes import send
from tests.scp_node import NodeProcess, instance_uids

FRONT_PORT = 11112  # fixed: nothing else lives in the namespace
NODES = 3


def haproxy_config(nodes: list[tuple[int, int]], stats_socket: Path) -> str:
    """The README's configuration ("Running several nodes"), bound here, with these nodes' DICOM and ops ports.

    Taken from the README itself, so the configuration shown there is the one tested.
    """
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Running several nodes"):]
    block = section[section.index("```\n") + 4:]
    block = block[:block.index("```")]
    lines = [line for line in block.splitlines() if not line.strip().startswith("server ")]
    config = "\n".join(line.replace("bind :104", f"bind 127.0.0.1:{FRONT_PORT}") for line in lines)
    servers = "\n".join(f"    server node{n} 127.0.0.1:{dicom} check port {ops}" for n, (dicom, ops) in enumerate(nodes))
    return f"global\n    stats socket {stats_socket} mode 600 level admin\n\n{config.rstrip()}\n{servers}\n"


def servers(stats_socket: Path) -> dict[str, dict[str, str]]:
    """server name -> its row of HAProxy's own stats (`show stat`, CSV): status, check_status, ..."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
    return {row["svname"]: row for row in rows if row["pxname"] == "nodes" and row["svname"].startswith("node")}


def checked_up(stats_socket: Path) -> bool:
    """Every node UP after a passed health check (L7OK: /readyz answered 200), not by HAProxy's initial state."""
    rows = servers(stats_socket).values()
    return len(rows) == NODES and all(r["status"] == "UP" and r["check_status"] == "L7OK" for r in rows)


def main(workdir: Path, parts: int, instances: int) -> dict:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    engine = FhirEngine.start()
    nodes: list[NodeProcess] = []
    haproxy = None
    try:
        config = (f'[fhir]\nurl = "{engine.base_url}"\n'
                  "[operations]\nhttp_enabled = true\nhttp_bind = \"127.0.0.1\"\nhttp_port = 0\n")
        nodes = [NodeProcess(workdir / f"node{n}", config=config, idle_timeout=1.0).start() for n in range(NODES)]
        stats_socket = workdir / "haproxy.sock"
        (workdir / "haproxy.cfg").write_text(haproxy_config([(n.port, n.ops_port()) for n in nodes], stats_socket))
        haproxy = subprocess.Popen(["haproxy", "-f", str(workdir / "haproxy.cfg"), "-db"],
                                   stdout=open(workdir / "haproxy.log", "wb"), stderr=subprocess.STDOUT)
        wait_for(lambda: stats_socket.exists(), 20, "HAProxy's stats socket")
        # Every node passed a health check against its /readyz (not merely HAProxy's initial state).
        wait_for(lambda: checked_up(stats_socket), 30, "HAProxy to see every node UP by its health check",
                 ignore=(OSError,))
        health = {name: f"{row['status']} {row['check_status']}" for name, row in servers(stats_socket).items()}

        study = generate_study(workdir / "study", instances, 2, patient_id="HAPROXY-1")
        size = -(-instances // parts)
        for start in range(0, instances, size):  # one association per part: HAProxy balances associations
            part = GeneratedStudy(study.study_uid, study.series_uids, study.files[start:start + size])
            send(FRONT_PORT, part)

        def complete() -> bool:
            found = engine.resources("ImagingStudy")
            return len(found) >= 1 and sum(len(s.get("instance", [])) for s in found[0].get("series", [])) >= instances
        wait_for(complete, 60, "one ImagingStudy with every instance on the engine")

        def received(node: NodeProcess) -> set[str]:
            return node.spooled(study.study_uid) | _output_instances(node, study.study_uid)

        def journaled() -> bool:  # a node writes its journal line just after the server took the study
            # A node whose two associations came more than idle_timeout apart delivers two parts.
            return all(delivered_count(node.deliveries(study.study_uid)) == len(received(node)) for node in nodes)
        wait_for(journaled, 30, "each node's journal line for what it delivered")
        return {
            "study_uid": study.study_uid, "sop_uids": study.sop_uids, "health": health,
            "received": {f"node{n}": sorted(received(node)) for n, node in enumerate(nodes)},
            "delivered": {f"node{n}": node.deliveries(study.study_uid) for n, node in enumerate(nodes)},
            "imaging_studies": engine.resources("ImagingStudy"), "patients": engine.resources("Patient"),
        }
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(timeout=20)
        for node in nodes:
            node.stop()
        engine.stop()


def delivered_count(deliveries: list[dict]) -> int:
    """Instances in a node's delivered parts (each part's instances are new to that node)."""
    return sum(d["instances"] for d in deliveries if d["result"].startswith("delivered"))


def _output_instances(node: NodeProcess, study_uid: str) -> set[str]:
    document = node.output_of(study_uid)
    return instance_uids(document) if document else set()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
