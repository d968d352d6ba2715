"""The node as the tests see it: `python -m scp serve` in a subprocess, on port 0 (the port it bound is read from its log)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clocks import wait_for
from tests.conftest import REPO

LISTENING = re.compile(r"listening on (\S+):(\d+) as ")
OPS_LISTENING = re.compile(r"operations endpoint on http://(\S+):(\d+) ")


def imaging_study(document: dict) -> dict:
    if document["resourceType"] == "ImagingStudy":
        return document
    return next(e["resource"] for e in document["entry"] if e["resource"]["resourceType"] == "ImagingStudy")


def instance_uids(document: dict) -> set[str]:
    return {i["uid"] for s in imaging_study(document).get("series", []) for i in s.get("instance", [])}


class NodeProcess:
    """One node with its own folders under `root`. Restartable (same folders, new process)."""

    def __init__(self, root: Path, *args: str, idle_timeout: float = 1.0, config: str | None = None,
                 ae_title: str = "FHIRSCP") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.spool = self.root / "spool"
        self.output = self.root / "out"
        self.dead_letter = self.root / "dead-letter"
        self.log_path = self.root / "node.log"
        self.args = list(args)
        self.idle_timeout = idle_timeout
        self.ae_title = ae_title
        self.config = None
        if config is not None:
            self.config = self.root / "node.toml"
            self.config.write_text(config)
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._started_at = 0  # offset in the log of the current process's first line

    def start(self, idle_timeout: float | None = None) -> "NodeProcess":
        """Start the node on port 0; `port` is then the one it bound (a restart gets a new one)."""
        command = [sys.executable, "-m", "scp", "serve", "--port", "0", "--bind", "127.0.0.1",
                   "-aet", self.ae_title, "--spool-dir", str(self.spool), "--output-dir", str(self.output),
                   "--dead-letter-dir", str(self.dead_letter),
                   "--idle-timeout", str(idle_timeout or self.idle_timeout), *self.args]
        if self.config is not None:
            command += ["--config", str(self.config)]
        offset = self._started_at = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                        stderr=open(self.log_path, "ab"))
        wait_for(lambda: " ready on " in self.log()[offset:] or self.process.poll() is not None, 30, "the node to start")
        if self.process.poll() is not None:
            raise AssertionError(f"the node exited with {self.process.returncode}:\n{self.log()[-3000:]}")
        listening = LISTENING.search(self.log()[offset:])
        assert listening, f"no 'listening on HOST:PORT' line in the node's log:\n{self.log()[offset:][-3000:]}"
        self.port = int(listening[2])
        return self

    def ops_port(self, timeout: float = 10) -> int:
        """The operations HTTP port this process bound (operations.http_port = 0), from its log."""
        found = wait_for(lambda: OPS_LISTENING.search(self.log()[self._started_at:]), timeout,
                         f"the operations endpoint's log line; node log:\n{self.log()[-2000:]}")
        return int(found[2])

    def stop(self) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def output_of(self, study_uid: str) -> dict | None:
        try:
            return json.loads((self.output / f"{study_uid}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def deliveries(self, study_uid: str | None = None) -> list[dict]:
        path = self.spool / "deliveries.jsonl"
        if not path.exists():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [line for line in lines if study_uid is None or line["study"] == study_uid]

    def wait_for_deliveries(self, study_uid: str, count: int = 1, timeout: float = 20) -> list[dict]:
        wait_for(lambda: len(self.deliveries(study_uid)) >= count, timeout,
                 f"{count} delivery(ies) of study {study_uid}; node log:\n{self.log()[-2000:]}")
        return self.deliveries(study_uid)

    def wait_for_deliveries_total(self, instances: int, studies: int, timeout: float = 30) -> list[dict]:
        """Until the journal holds deliveries of `studies` studies with `instances` instances in all."""
        def done() -> bool:
            latest = {d["study"]: d["instances"] for d in self.deliveries()}
            return len(latest) >= studies and sum(latest.values()) >= instances
        wait_for(done, timeout, f"{studies} studies, {instances} instances delivered; node log:\n{self.log()[-2000:]}")
        return self.deliveries()

    def spooled(self, study_uid: str) -> set[str]:
        folder = self.spool / study_uid
        return {p.stem for p in folder.glob("*.dcm")} if folder.is_dir() else set()


@pytest.fixture
def node(tmp_path):
    """start(*args, **kwargs) -> a NodeProcess in its own folder under tmp_path; all stopped at the end."""
    started: list[NodeProcess] = []

    def start(*args: str, **kwargs) -> NodeProcess:
        process = NodeProcess(tmp_path / f"node{len(started)}", *args, **kwargs).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
