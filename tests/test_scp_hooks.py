"""The end-of-study hook ([hooks] on_delivered, scp.pipeline.hooks): what it is given, and that
it never stops or delays a delivery.

The hooks are real programs (a Python script each test writes, recording its argv to a
file); the deliveries run on an in-memory spool with a fake clock. No sleeps: the tests wait
on the files the hooks write and on the hook thread's end.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from mapping.errors import ConfigurationError
from mapping.options import MappingOptions
from scp.cli import main as cli_main
from scp.config import Config, HooksConfig, NodeConfig, config_from_mapping
from scp.errors import DeliveryRejected
from scp.node import Node
from scp.pipeline.delivery import DeliveryReport
from scp.pipeline.hooks import BackgroundHooks, Delivered, HookRunner, delivered_from_report, hook_runner
from scp.pipeline.retry import RetryPolicy
from scp.pipeline.worker import DeliveryWorker
from scp.store.dead_letter import DeadLetterBox
from scp.store.journal import Journal
from scp.store.spool import FileSpool, MemorySpool
from tests.clocks import FakeClock, wait_for
from tests.hook_scripts import record, write_hook
from tests.spooled import spool_instance

ALL = ("{study_uid}", "{output}", "{instances}", "{series}", "{fhir}")


class Sink:
    name = "disk"

    def deliver(self, resources) -> str:
        return f"wrote out/{resources.study_uid}.json"


def make_worker(tmp_path: Path, spool, on_delivered, sinks=None) -> DeliveryWorker:
    return DeliveryWorker(spool, sinks or [Sink()], MappingOptions(), dead_letters=DeadLetterBox(tmp_path / "dead"),
                          journal=Journal(tmp_path / "deliveries.jsonl", wall_clock=lambda: 0.0),
                          clock=FakeClock(), rand=lambda: 1.0, retry=RetryPolicy(max_backoff=60),
                          on_delivered=on_delivered)


def journal(tmp_path: Path) -> list[str]:
    path = tmp_path / "deliveries.jsonl"
    return [json.loads(line)["study"] for line in path.read_text().splitlines()] if path.exists() else []


def deliver(worker: DeliveryWorker, spool, study_uid: str) -> None:
    worker.submit(study_uid, {spool_instance(spool, study_uid)})
    assert worker.run_once()


def hooks_for(tmp_path: Path, script: Path, *args: str, timeout: float = 20) -> BackgroundHooks:
    hooks = BackgroundHooks(HookRunner((str(script), *args), timeout), max_pending=10)
    hooks.start()
    return hooks


def node_hook(hooks: BackgroundHooks, output_dir: Path | None):
    """What scp.node.Node hands the worker."""
    return lambda report: hooks.submit(delivered_from_report(report, output_dir))


# --- what the hook is given ---------------------------------------------------------------------


def test_the_hook_runs_with_the_placeholders_filled_in(tmp_path, caplog):
    script = write_hook(tmp_path)
    runner = HookRunner((str(script), *ALL, "--study={study_uid}", "{{literal}}"), timeout=20)
    with caplog.at_level(logging.DEBUG, logger="scp.pipeline.hooks"):
        assert runner.run(Delivered("1.2.3", 12, 3, "/data/out/1.2.3.json", "ImagingStudy/17")) == 0
    assert record(script, "1.2.3")["argv"] == ["1.2.3", "/data/out/1.2.3.json", "12", "3", "ImagingStudy/17",
                                               "--study=1.2.3", "{literal}"]
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("DEBUG", f"study 1.2.3: hook {script} stdout: hello from the hook") in messages
    assert ("DEBUG", f"study 1.2.3: hook {script} stderr: a complaint") in messages
    assert ("INFO", f"study 1.2.3: hook {script} exited with 0") in messages


def test_output_and_fhir_come_from_the_sinks_that_took_the_study(tmp_path):
    report = DeliveryReport("1.2.3", instances=4, series=2,
                            sinks={"disk": "wrote out/1.2.3.json",
                                   "fhir": "ImagingStudy/17 updated at https://fhir.example/r4 (3 requests)"})
    delivered = delivered_from_report(report, Path("out"))
    assert delivered == Delivered("1.2.3", 4, 2, str(Path("out/1.2.3.json").absolute()), "ImagingStudy/17")
    # Neither sink configured (or it did not take the study): empty, never a made-up value.
    assert delivered_from_report(DeliveryReport("1.2.3", 4, 2, sinks={"rec": "x"}), None).values() == {
        "study_uid": "1.2.3", "output": "", "instances": "4", "series": "2", "fhir": ""}
    assert delivered_from_report(DeliveryReport("1.2.3", 4, 2, sinks={}), Path("out")).output == ""


def test_the_worker_runs_the_hook_after_the_journal_line(tmp_path):
    script = write_hook(tmp_path)
    hooks = hooks_for(tmp_path, script, *ALL)
    spool = MemorySpool()
    deliver(make_worker(tmp_path, spool, node_hook(hooks, tmp_path / "out")), spool, "1.2.3")
    assert record(script, "1.2.3")["argv"] == ["1.2.3", str((tmp_path / "out" / "1.2.3.json").absolute()),
                                               "1", "1", ""]
    hooks.stop(20)
    assert journal(tmp_path) == ["1.2.3"]


# --- a hook never stops or delays a delivery ----------------------------------------------------


def test_a_failing_hook_is_logged_and_the_next_study_is_delivered(tmp_path, caplog):
    script = write_hook(tmp_path, then="sys.exit(1)")
    hooks = hooks_for(tmp_path, script, "{study_uid}")
    spool = MemorySpool()
    worker = make_worker(tmp_path, spool, node_hook(hooks, None))
    with caplog.at_level(logging.INFO, logger="scp.pipeline.hooks"):
        deliver(worker, spool, "1.2.3")
        deliver(worker, spool, "1.2.4")
        record(script, "1.2.4")
        hooks.stop(20)  # the hook thread finishes the running hook: its log line is written
    assert journal(tmp_path) == ["1.2.3", "1.2.4"] and spool.depth() == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"study 1.2.3: hook {script} failed with exit status 1",
                        f"study 1.2.4: hook {script} failed with exit status 1"]


def test_a_program_gone_since_start_up_is_logged_and_deliveries_go_on(tmp_path, caplog):
    missing = tmp_path / "removed-hook"
    hooks = hooks_for(tmp_path, missing, "{study_uid}")
    spool = MemorySpool()
    worker = make_worker(tmp_path, spool, node_hook(hooks, None))
    with caplog.at_level(logging.WARNING, logger="scp.pipeline.hooks"):
        deliver(worker, spool, "1.2.3")
        deliver(worker, spool, "1.2.4")
        wait_for(lambda: len(caplog.records) == 2, 20, "both hooks to be tried")
        hooks.stop(20)
    assert journal(tmp_path) == ["1.2.3", "1.2.4"]
    for record_, uid in zip(caplog.records, ["1.2.3", "1.2.4"]):
        assert record_.getMessage().startswith(f"study {uid}: hook {missing} could not be started: ")


def test_a_hanging_hook_is_killed_at_the_timeout_and_never_delays_the_next_delivery(tmp_path, caplog):
    script = write_hook(tmp_path, then="time.sleep(600)")
    hooks = hooks_for(tmp_path, script, "{study_uid}", timeout=2)
    spool = MemorySpool()
    worker = make_worker(tmp_path, spool, node_hook(hooks, None))
    with caplog.at_level(logging.WARNING, logger="scp.pipeline.hooks"):
        deliver(worker, spool, "1.2.3")
        hanging = record(script, "1.2.3")["pid"]
        deliver(worker, spool, "1.2.4")  # while 1.2.3's hook still runs
        assert journal(tmp_path) == ["1.2.3", "1.2.4"]
        assert _alive(hanging), "the first hook ended before the second delivery: nothing was shown"
        record(script, "1.2.4")  # the second hook ran: the first was killed at its timeout
        assert not _alive(hanging)
        hooks.runner.kill()  # the second hangs too; the test need not wait for its timeout
        hooks.stop(20)
    assert f"study 1.2.3: hook {script} still running after 2 s (hooks.timeout): killed" in [
        r.getMessage() for r in caplog.records]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_observer_that_raises_never_undoes_the_delivery(tmp_path, caplog):
    def broken(report):
        raise RuntimeError("bug")

    spool = MemorySpool()
    worker = make_worker(tmp_path, spool, broken)
    deliver(worker, spool, "1.2.3")
    assert journal(tmp_path) == ["1.2.3"] and spool.depth() == 0
    assert not worker.run_once()  # not queued for another attempt
    assert "study 1.2.3: delivered, but telling the end-of-study hook failed" in caplog.text


def test_a_full_backlog_drops_the_hook_with_a_warning(tmp_path, caplog):
    hooks = BackgroundHooks(HookRunner(("/bin/true",), 20), max_pending=1)  # not started: nothing drains
    assert hooks.submit(Delivered("1.2.3", 1, 1, "", ""))
    assert not hooks.submit(Delivered("1.2.4", 1, 1, "", ""))
    assert "study 1.2.4: hook /bin/true not run: 1 hook(s) already waiting (hooks.max_pending" in caplog.text


# --- refused at start-up ------------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["/bin/echo", "{patient_name}"], "hooks.on_delivered: unknown placeholder(s) ['patient_name']"),
    (["/bin/echo", "{study}"], "hooks.on_delivered: unknown placeholder(s) ['study']"),
    (["/bin/echo", "{series:>4}"], "hooks.on_delivered: '{series:>4}': placeholders take no format spec"),
    (["/bin/echo", "{study_uid"], "hooks.on_delivered: '{study_uid'"),
    ([], "hooks.on_delivered: expected [\"/absolute/path/to/program\""),
    ([""], "hooks.on_delivered: expected [\"/absolute/path/to/program\""),
    (["echo", "{study_uid}"], "hooks.on_delivered: the program must be an absolute path, got 'echo'"),
    (["/opt/{study_uid}/hook"], "hooks.on_delivered: the program '/opt/{study_uid}/hook' cannot contain"),
])
def test_a_bad_hook_argv_is_refused_naming_the_key(argv, expected):
    with pytest.raises(ConfigurationError) as error:
        config_from_mapping({"hooks": {"on_delivered": argv}}, environ={})
    assert str(error.value).startswith(expected), str(error.value)


@pytest.mark.parametrize("key, value", [("timeout", 0), ("max_pending", 0)])
def test_hook_limits_must_be_positive(key, value):
    with pytest.raises(ConfigurationError, match=f"hooks.{key}"):
        config_from_mapping({"hooks": {key: value}}, environ={})


def test_a_missing_or_non_executable_program_stops_the_node_at_start_up(tmp_path):
    plain = tmp_path / "not-executable.sh"
    plain.write_text("#!/bin/sh\n")
    for program, expected in [(tmp_path / "missing", "not found"), (plain, "is not executable")]:
        config = Config(node=NodeConfig(spool_dir=tmp_path / "spool", output_dir=None,
                                        dead_letter_dir=tmp_path / "dead"),
                        hooks=HooksConfig(on_delivered=(str(program), "{study_uid}")))
        with pytest.raises(ConfigurationError, match=f"hooks.on_delivered: program {program} {expected}"):
            Node(config)
        assert not (tmp_path / "spool").exists()  # refused before anything was set up
    assert hook_runner(HooksConfig()) is None


# --- retry --------------------------------------------------------------------------------------


def test_retry_runs_the_hook_for_the_study_it_delivers(tmp_path):
    script = write_hook(tmp_path)
    spool = FileSpool(tmp_path / "spool")

    class Refusing:
        name = "disk"

        def deliver(self, resources):
            raise DeliveryRejected("not now")

    worker = DeliveryWorker(spool, [Refusing()], MappingOptions(), dead_letters=DeadLetterBox(tmp_path / "dead"),
                            journal=None, clock=FakeClock())
    worker.submit("1.2.3", {spool_instance(spool, "1.2.3")})
    worker.run_once()
    assert (tmp_path / "dead" / "1.2.3").is_dir()
    config = tmp_path / "node.toml"
    config.write_text(f"""[node]
spool_dir = "{tmp_path / 'spool'}"
output_dir = "{tmp_path / 'out'}"
dead_letter_dir = "{tmp_path / 'dead'}"
[hooks]
on_delivered = ["{script}", "{{study_uid}}", "{{output}}", "{{instances}}", "{{fhir}}"]
""")
    assert cli_main(["retry", "-c", str(config), "1.2.3"]) == 0
    # No waiting: retry returns once its hooks have run.
    seen = json.loads((script.parent / "records" / "1.2.3.json").read_text())
    assert seen == {"argv": ["1.2.3", str(tmp_path / "out" / "1.2.3.json"), "1", ""], "output_exists": True,
                    "pid": seen["pid"]}
