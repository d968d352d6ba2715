"""Hook programs the hook tests run: a script that records how it was called."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.clocks import wait_for


def write_hook(folder: Path, then: str = "") -> Path:
    """An executable script recording {"argv", "output_exists", "pid"} to <records>/<argv[1]>.json, then `then`."""
    records = folder / "records"
    records.mkdir(parents=True, exist_ok=True)
    script = folder / "hook.py"
    script.write_text(f"""#!{sys.executable}
import json, os, sys, time
output = sys.argv[2] if len(sys.argv) > 2 else ""
record = {{"argv": sys.argv[1:], "output_exists": bool(output) and os.path.isfile(output), "pid": os.getpid()}}
path = os.path.join({str(records)!r}, sys.argv[1] + ".json")
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(path + ".tmp", path)  # whole, or not there: the test waits for it
print("hello from the hook")
print("a complaint", file=sys.stderr)
sys.stdout.flush()
{then}
""")
    script.chmod(0o755)
    return script


def record(script: Path, study_uid: str, timeout: float = 20) -> dict:
    path = script.parent / "records" / f"{study_uid}.json"
    wait_for(path.exists, timeout, f"the hook's record of study {study_uid}")
    return json.loads(path.read_text())
