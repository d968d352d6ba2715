"""A real DICOMweb server for the sync tests: Orthanc with Debian's orthanc-dicomweb plugin.

Orthanc cannot bind a single address, so it runs in a network namespace of its own
(`ip netns add`), joined to the test's namespace by a veth pair with a private /30:
Orthanc listens on every address of its namespace, which are loopback and its end of
the pair, so nothing outside this machine's test can reach it, and tests (and the sync
command they start) reach it at http://10.x.y.2:8042 like any remote server.
Needs root (CI and these machines have it).

    with OrthancDicomWeb(tmp_path) as orthanc:
        orthanc.upload(paths)
        orthanc.dicomweb_url   # QIDO-RS / WADO-RS root
        orthanc.stop(); orthanc.start()   # the source down mid-run, same storage
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.clocks import wait_for
from tests.conftest import IN_CI, require_tool

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
HTTP_PORT = 8042


def require_orthanc_dicomweb() -> None:
    """Orthanc, its DICOMweb plugin and root, or fail in CI / skip elsewhere."""
    require_tool("Orthanc")
    require_tool("ip")
    problem = ("a network namespace for Orthanc needs root" if os.geteuid() != 0 else
               f"{PLUGIN} missing (apt-get install orthanc-dicomweb)" if not PLUGIN.exists() else None)
    if problem:
        pytest.fail(problem) if IN_CI else pytest.skip(problem)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class OrthancDicomWeb:
    def __init__(self, workdir: Path, *, stable_age: int = 1) -> None:
        self.workdir = Path(workdir)
        self.stable_age = stable_age
        tag = secrets.token_hex(3)  # names and the subnet are per instance: tests run in parallel
        self.netns = f"dfs{tag}"
        self.veth = f"vd{tag}"
        self.peer = f"vp{tag}"
        a, b = 100 + secrets.randbelow(100), secrets.randbelow(64) * 4
        self.host_address, self.address = f"10.{a}.{b >> 0}.1", f"10.{a}.{b}.2"
        self.host_address = f"10.{a}.{b}.1"
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def rest_url(self) -> str:
        return f"http://{self.address}:{HTTP_PORT}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.rest_url}/dicom-web"

    def __enter__(self) -> OrthancDicomWeb:
        _ip("netns", "add", self.netns)
        try:
            _ip("link", "add", self.veth, "type", "veth", "peer", "name", self.peer)
            _ip("link", "set", self.peer, "netns", self.netns)
            _ip("addr", "add", f"{self.host_address}/30", "dev", self.veth)
            _ip("link", "set", self.veth, "up")
            _ip("netns", "exec", self.netns, "ip", "addr", "add", f"{self.address}/30", "dev", self.peer)
            _ip("netns", "exec", self.netns, "ip", "link", "set", self.peer, "up")
            _ip("netns", "exec", self.netns, "ip", "link", "set", "lo", "up")
            self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)

    def start(self) -> None:
        storage = self.workdir / "orthanc-db"
        config = {
            "Name": "SYNCSOURCE", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": HTTP_PORT, "DicomServerEnabled": False, "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False, "StableAge": self.stable_age, "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
            "HttpTimeout": 60,
        }
        path = self.workdir / "orthanc-dicomweb.json"
        path.write_text(json.dumps(config))
        self._log = open(self.workdir / "orthanc-dicomweb.log", "ab")
        self.process = subprocess.Popen(["ip", "netns", "exec", self.netns, "Orthanc", str(path)],
                                        stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self.process.poll() is not None or self.get("/system"), 30, "Orthanc's REST API",
                     ignore=(OSError,))
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 3000) -> str:
        path = self.workdir / "orthanc-dicomweb.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def request(self, method: str, path: str, body: bytes | None = None) -> object:
        request = urllib.request.Request(f"{self.rest_url}{path}", data=body, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def get(self, path: str) -> object:
        return self.request("GET", path)

    def upload(self, paths) -> list[dict]:
        """POST each file to /instances; Orthanc's replies (ID, ParentStudy, ParentSeries)."""
        return [self.request("POST", "/instances", Path(p).read_bytes()) for p in paths]

    def orthanc_id(self, level: str, uid: str) -> str:
        found = self.request("POST", "/tools/lookup", uid.encode())
        return next(item["ID"] for item in found if item["Type"].lower() == level)

    def delete_study(self, study_uid: str) -> None:
        self.request("DELETE", f"/studies/{self.orthanc_id('study', study_uid)}")

    def delete_series(self, series_uid: str) -> None:
        self.request("DELETE", f"/series/{self.orthanc_id('series', series_uid)}")
