"""Drive a real Orthanc pushing a study to the node, inside a private network namespace.

Run as `unshare -n python -m tests.orthanc_push WORKDIR FILE...` from the repository (root): Orthanc cannot
bind a single address, so it gets a network namespace of its own, shared with the node,
where only loopback exists. Prints one JSON line: what Orthanc reported and where the
node's output went. The pytest test (tests/test_orthanc.py) checks the result.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.clocks import wait_for

NODE_PORT = 11112
ORTHANC_HTTP = 18042
ORTHANC_DICOM = 14242


def http(method: str, path: str, body: bytes | None = None) -> object:
    request = urllib.request.Request(f"http://127.0.0.1:{ORTHANC_HTTP}{path}", data=body, method=method)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")


def main(workdir: Path, files: list[Path]) -> dict:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    config = {
        "Name": "TESTPACS", "StorageDirectory": str(workdir / "orthanc-db"),
        "IndexDirectory": str(workdir / "orthanc-db"), "HttpPort": ORTHANC_HTTP,
        "DicomPort": ORTHANC_DICOM, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [],
        "DicomModalities": {"scp": ["FHIRSCP", "127.0.0.1", NODE_PORT]},
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    output = workdir / "fhir-output"
    node = subprocess.Popen(
        [sys.executable, "-m", "scp", "serve", "--port", str(NODE_PORT), "--bind", "127.0.0.1",
         "--spool-dir", str(workdir / "spool"), "--output-dir", str(output), "--idle-timeout", "1"],
        stdout=open(workdir / "node.log", "wb"), stderr=subprocess.STDOUT)
    orthanc = subprocess.Popen(["Orthanc", str(workdir / "orthanc.json")],
                               stdout=open(workdir / "orthanc.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: http("GET", "/system"), 30, "Orthanc's REST API", ignore=(OSError,))
        uploaded = [http("POST", "/instances", path.read_bytes()) for path in files]
        studies = sorted({item["ParentStudy"] for item in uploaded})
        # Orthanc opens its own associations (one per SOP class / transfer syntax) to the node.
        wait_for(lambda: http("POST", "/modalities/scp/echo", b"{}") is not None, 30, "the node's C-ECHO",
                 ignore=(OSError,))
        push = http("POST", "/modalities/scp/store",
                    json.dumps({"Resources": studies, "Synchronous": True}).encode())
        study_uids = [http("GET", f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"] for s in studies]
        wait_for(lambda: all((output / f"{uid}.json").exists() for uid in study_uids), 30, "the node's output")
        return {"push": push, "study_uids": study_uids, "uploaded": len(uploaded),
                "outputs": {uid: json.loads((output / f"{uid}.json").read_text()) for uid in study_uids}}
    finally:
        for process in (orthanc, node):
            process.send_signal(signal.SIGTERM)
        for process in (orthanc, node):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    result = main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
    print(json.dumps(result))
