"""The pure and local parts of `sync`: windows, the checkpoint, the rate limit, the bounded client,
polling's change detection and deletes (a scripted source stands in for the server)."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from mapping import MappingOptions
from scp.config import SyncConfig
from scp.sinks.disk import DiskSink
from scp.sources.dicomweb.backfill import Syncer, orthanc_id
from scp.sources.dicomweb.checkpoint import Checkpoint, read_state
from scp.sources.dicomweb.client import DicomWebClient, RateLimiter, SourceRefused, SourceUnavailable
from scp.sources.dicomweb.follow import poll
from scp.sources.dicomweb.windows import Window, parse_date, windows
from scp.store.dead_letter import DeadLetterBox
from tests.clocks import FakeClock

D = dt.date


# --- windows ----------------------------------------------------------------------------------

def test_windows_cover_the_range_without_gaps_or_overlaps():
    cut = windows(D(2020, 1, 1), D(2020, 3, 5), 30)
    assert cut[0].first == D(2020, 1, 1) and cut[-1].last == D(2020, 3, 5)
    assert all(b.first == a.last + dt.timedelta(days=1) for a, b in zip(cut, cut[1:]))
    assert [w.days for w in cut] == [30, 30, 5]


def test_a_window_splits_into_two_halves_and_a_single_day_does_not():
    first, second = Window(D(2020, 1, 1), D(2020, 1, 10)).split()
    assert (first.first, first.last, second.first, second.last) == (D(2020, 1, 1), D(2020, 1, 5),
                                                                    D(2020, 1, 6), D(2020, 1, 10))
    assert Window(D(2020, 1, 1), D(2020, 1, 2)).split() == (Window(D(2020, 1, 1), D(2020, 1, 1)),
                                                            Window(D(2020, 1, 2), D(2020, 1, 2)))
    assert Window(D(2020, 1, 1), D(2020, 1, 1)).split() is None


def test_window_query_is_a_dicom_date_range_and_its_key_round_trips():
    window = Window(D(2020, 1, 1), D(2020, 1, 31))
    assert window.query == "20200101-20200131"
    assert Window(D(2020, 1, 1), D(2020, 1, 1)).query == "20200101"
    assert Window.from_key(window.key) == window


def test_dates_are_yyyymmdd_or_iso():
    assert parse_date("20200131") == parse_date("2020-01-31") == D(2020, 1, 31)
    with pytest.raises(ValueError, match="2020-13-01"):
        parse_date("2020-13-01")


def test_sync_since_must_be_a_date():
    from mapping.errors import ConfigurationError
    with pytest.raises(ConfigurationError, match="sync.since"):
        SyncConfig(since="last year")


# --- the checkpoint ---------------------------------------------------------------------------

def test_the_checkpoint_is_written_atomically_and_reads_back(tmp_path):
    checkpoint = Checkpoint.load(tmp_path, "http://pacs/dicom-web/")
    checkpoint.state.windows_done.append("20200101-20200131")
    checkpoint.state.studies["1.2.3"] = "1/2"
    checkpoint.save(now=5.0)
    assert not list(checkpoint.path.parent.glob("*.tmp*"))
    again = Checkpoint.load(tmp_path, "http://pacs/dicom-web")  # the same source, trailing slash or not
    assert again.state.windows_done == ["20200101-20200131"] and again.state.studies == {"1.2.3": "1/2"}
    assert Checkpoint.load(tmp_path, "http://other/dicom-web").state.windows_done == []


def test_an_unreadable_checkpoint_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "checkpoint.json"
    path.write_text("{")
    with pytest.raises(ValueError, match="checkpoint.json"):
        read_state(path)


def test_orthanc_ids_are_computed_as_orthanc_does():
    # The IDs Orthanc 1.10 gave CT_small.dcm (PatientID 1CT1) when uploaded (tests/orthanc_dicomweb.py).
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    assert orthanc_id(ds.PatientID, ds.StudyInstanceUID) == "8a8cf898-ca27c490-d0c7058c-929d0581-2bbf104d"
    assert orthanc_id(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == \
        "93034833-163e42c3-bc9a428b-194620cf-2c5799e5"


# --- the rate limit and the bounded client ----------------------------------------------------

def test_the_rate_limit_spaces_requests():
    clock = FakeClock(0.0)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds
    limiter = RateLimiter(4.0, clock=clock, sleep=sleep)
    for _ in range(5):
        limiter.wait()
    assert slept == [0.25, 0.25, 0.25, 0.25]


class _Server:
    """A local HTTP server answering from a script of (status, body) replies."""

    def __init__(self, replies: list[tuple[int, bytes]]) -> None:
        replies = list(replies)
        seen = self.authorization = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                seen.append(self.headers.get("Authorization"))
                status, body = replies.pop(0) if replies else (500, b"")
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args) -> None:
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *_exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _client(url: str, **settings) -> DicomWebClient:
    return DicomWebClient(url, SyncConfig(dicomweb_url=url, **settings), sleep=lambda _s: None)


def test_a_retryable_failure_is_retried_and_then_the_reply_is_used():
    with _Server([(503, b""), (429, b""), (200, b"[1]")]) as url:
        client = _client(url, retries=3)
        assert client.get_json("studies") == [1]
    assert client.stats.retries == 2


def test_a_server_that_stays_down_is_source_unavailable_after_the_attempts():
    with _Server([(503, b"")] * 3) as url:
        with pytest.raises(SourceUnavailable, match="3 attempts"):
            _client(url, retries=3).get_json("studies")


def test_a_reply_larger_than_the_cap_is_refused():
    with _Server([(200, b"[" + b"1," * 5000 + b"1]")]) as url:
        with pytest.raises(SourceRefused, match="max_response_bytes"):
            _client(url, max_response_bytes=4096).get_json("studies")


def test_bearer_and_basic_credentials_are_sent_with_the_fhir_auth_code():
    server = _Server([(200, b"[]"), (200, b"[]")])
    with server as url:
        _client(url, auth="bearer", token="t0k3n").get_json("studies")
        _client(url, auth="basic", username="u", password="p").get_json("studies")
    assert server.authorization == ["Bearer t0k3n", "Basic dTpw"]


def test_a_refusal_is_not_retried():
    with _Server([(403, b"no"), (200, b"[]")]) as url:
        with pytest.raises(SourceRefused, match="HTTP 403"):
            _client(url).get_json("studies")


# --- polling: change detection and deletes ----------------------------------------------------

class ScriptedSource:
    """Stands in for DicomWebClient.get_json (a unit test of the polling logic only)."""

    def __init__(self) -> None:
        self.studies: dict[str, list[dict]] = {}
        self.down = False
        self.stats = type("S", (), {"requests": 0})()
        self.auth = None

    def add(self, path: str, study_uid: str | None = None, series_uid: str | None = None) -> str:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if study_uid:
            ds.StudyInstanceUID = study_uid
        if series_uid:
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = series_uid + ".1"
        ds.StudyDate = "20261201"
        self.studies.setdefault(ds.StudyInstanceUID, []).append(ds.to_json_dict())
        return ds.StudyInstanceUID

    def get_json(self, path: str, params=None, *, context: str = "", missing_ok: bool = False):
        if self.down:
            raise SourceUnavailable(f"{context}: down")
        if path == "studies":
            return [{"0020000D": {"vr": "UI", "Value": [uid]}, "00080020": {"vr": "DA", "Value": ["20261201"]},
                     "00201206": {"vr": "IS", "Value": [len({o["0020000E"]["Value"][0] for o in objs})]},
                     "00201208": {"vr": "IS", "Value": [len(objs)]}} for uid, objs in self.studies.items()]
        uid = path.split("/")[1]
        return self.studies.get(uid)


def _syncer(tmp_path: Path, source: ScriptedSource, clock: FakeClock, **settings) -> Syncer:
    sync = SyncConfig(**{"dicomweb_url": "http://pacs/dicom-web", "stable_age": 30, **settings})
    return Syncer(source, [DiskSink(tmp_path / "out")], Checkpoint.load(tmp_path / "spool", sync.dicomweb_url),
                  DeadLetterBox(tmp_path / "dead"), MappingOptions(), sync, wall_clock=clock)


def _study(tmp_path: Path, uid: str) -> dict | None:
    path = tmp_path / "out" / f"{uid}.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return next(e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "ImagingStudy")


CT = get_testdata_file("CT_small.dcm")
TODAY = D(2026, 12, 1)


def test_polling_delivers_a_new_study_once_it_stayed_unchanged_for_stable_age(tmp_path):
    source, clock = ScriptedSource(), FakeClock()
    uid = source.add(CT)
    syncer, pending = _syncer(tmp_path, source, clock), {}
    poll(syncer, TODAY, pending)
    assert _study(tmp_path, uid) is None  # seen once: maybe still arriving
    clock.now += 10
    poll(syncer, TODAY, pending)
    assert _study(tmp_path, uid) is None
    clock.now += 25
    poll(syncer, TODAY, pending)
    assert _study(tmp_path, uid)["numberOfInstances"] == 1


def test_polling_fetches_again_a_study_whose_series_set_changed_and_merges_it(tmp_path):
    source, clock = ScriptedSource(), FakeClock()
    uid = source.add(CT)
    syncer, pending = _syncer(tmp_path, source, clock, stable_age=0), {}
    poll(syncer, TODAY, pending)
    poll(syncer, TODAY, pending)
    source.add(CT, study_uid=uid, series_uid="1.2.826.0.1.3680043.8.498.77")
    poll(syncer, TODAY, pending)
    poll(syncer, TODAY, pending)
    assert _study(tmp_path, uid)["numberOfSeries"] == 2


def test_a_study_gone_from_a_fully_listed_window_is_marked_entered_in_error(tmp_path):
    source, clock = ScriptedSource(), FakeClock()
    uid = source.add(CT)
    syncer, pending = _syncer(tmp_path, source, clock, stable_age=0), {}
    poll(syncer, TODAY, pending)
    poll(syncer, TODAY, pending)
    del source.studies[uid]
    poll(syncer, TODAY, pending)
    assert _study(tmp_path, uid)["status"] == "entered-in-error"


def test_with_on_delete_delete_the_output_file_goes(tmp_path):
    source, clock = ScriptedSource(), FakeClock()
    uid = source.add(CT)
    syncer, pending = _syncer(tmp_path, source, clock, stable_age=0, on_delete="delete"), {}
    poll(syncer, TODAY, pending)
    poll(syncer, TODAY, pending)
    del source.studies[uid]
    poll(syncer, TODAY, pending)
    assert not (tmp_path / "out" / f"{uid}.json").exists()


def test_a_failed_listing_deletes_nothing(tmp_path):
    source, clock = ScriptedSource(), FakeClock()
    uid = source.add(CT)
    syncer, pending = _syncer(tmp_path, source, clock, stable_age=0), {}
    poll(syncer, TODAY, pending)
    poll(syncer, TODAY, pending)
    source.down = True
    with pytest.raises(SourceUnavailable):
        poll(syncer, TODAY, pending)
    assert _study(tmp_path, uid)["status"] != "entered-in-error"


# --- the command's user errors: one line, exit 2 ----------------------------------------------

def _run_cli(tmp_path: Path, *args: str):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "scp", "sync", "--spool-dir", str(tmp_path / "spool"),
                           "--dead-letter-dir", str(tmp_path / "dead"), "-od", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)


def test_sync_without_a_dicomweb_url_is_a_user_error(tmp_path):
    result = _run_cli(tmp_path)
    assert result.returncode == 2
    assert "--dicomweb-url" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_since_date_is_a_user_error_naming_the_key(tmp_path):
    result = _run_cli(tmp_path, "--dicomweb-url", "http://127.0.0.1:9/dicom-web", "--since", "yesterday")
    assert result.returncode == 2
    assert "sync.since" in result.stderr and "Traceback" not in result.stderr


def test_a_secret_variable_that_is_not_set_is_a_user_error(tmp_path):
    result = _run_cli(tmp_path, "--dicomweb-url", "http://127.0.0.1:9/dicom-web", "--auth", "bearer",
                      "--token-env", "NO_SUCH_VARIABLE_FOR_SYNC")
    assert result.returncode == 2
    assert "NO_SUCH_VARIABLE_FOR_SYNC" in result.stderr and "Traceback" not in result.stderr
