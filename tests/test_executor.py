"""The local executor: jobs that succeed, fail, get cancelled, and outlive their submitter."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from appliance.core.context import Appliance
from appliance.core.jobs import JobSpec, cancel_job, get_job, job_log, submit_job, wait_job
from appliance.core.runs import get_run, metric_history
from appliance.errors import Conflict, InvalidInput

REPORTING_JOB = """
import json, sys
print("hello from the job")
for step in range(1, 6):
    print(json.dumps({"type": "metric", "key": "loss", "value": 1.0 / step, "step": step}))
    print(json.dumps({"type": "progress", "current": step, "total": 5}))
print(json.dumps({"type": "param", "key": "lr", "value": 0.1}))
print(json.dumps({"type": "metric", "key": "broken"}))
print('{"type": "metric", "key": "nan", "value": NaN, "step": 1}')
print('{"type": "metric", "key": "far", "value": 1, "step": 1e300}')
print("{not json at all")
print("done", file=sys.stderr)
"""


def _running_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group; zombies wait on a reaping parent."""
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _live(pid: int) -> bool:
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _py(code: str) -> JobSpec:
    return JobSpec(kind="command", command=[sys.executable, "-c", code])


def test_job_that_succeeds_reports_metrics_progress_and_logs(app: Appliance) -> None:
    job = submit_job(app, _py(REPORTING_JOB), experiment="exec")
    done = wait_job(app, job["id"], timeout=60)
    assert done["state"] == "succeeded"
    assert done["exit_code"] == 0
    assert (done["progress_current"], done["progress_total"]) == (5, 5)
    history = metric_history(app, job["run_id"], "loss")
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert history[-1]["value"] == pytest.approx(0.2)
    run = get_run(app, job["run_id"])
    assert run["status"] == "finished"
    assert run["params"]["lr"] == 0.1
    log = job_log(app, job["id"])
    assert "hello from the job" in log
    assert "{not json at all" in log  # plain lines are logs, even when they look like JSON
    assert log.count("ignored malformed event") == 3  # bad events are reported, not fatal
    assert "finite" in log
    assert '"type": "metric", "key": "loss"' not in log  # protocol lines are not log noise


def test_job_that_fails_shows_its_error(app: Appliance) -> None:
    job = submit_job(app, _py("print('working'); raise ValueError('column xyz is missing')"))
    done = wait_job(app, job["id"], timeout=60)
    assert done["state"] == "failed"
    assert done["exit_code"] == 1
    assert "ValueError: column xyz is missing" in done["error"]
    assert "Traceback" in job_log(app, job["id"])
    assert get_run(app, job["run_id"])["status"] == "failed"


# A job whose process tree resists: the job ignores SIGTERM, has a child in its group that
# ignores SIGTERM too, and a grandchild that left the group for a session of its own.
STUBBORN_JOB = """
import os, pathlib, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
a = subprocess.Popen([sys.executable, "-c", stubborn])
b = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                     start_new_session=True)
pathlib.Path(sys.argv[1]).write_text(f"{a.pid} {b.pid}")
time.sleep(120)
"""


def test_job_that_is_cancelled_stops_its_whole_tree_within_2_s(app: Appliance, tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "started"
    job = submit_job(
        app, JobSpec(kind="command", command=[sys.executable, "-c", STUBBORN_JOB, str(marker)])
    )
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    running = get_job(app, job["id"])
    assert running["state"] == "running"
    tree = [running["child_pid"], *map(int, marker.read_text().split())]
    assert all(_live(pid) for pid in tree)
    started = time.monotonic()
    done = cancel_job(app, job["id"])
    took = time.monotonic() - started
    assert done["state"] == "cancelled" and done["error"] == "cancelled by request"
    assert took < 2.0, took
    assert [pid for pid in tree if _live(pid)] == []
    assert _running_in_group(running["child_pid"]) == []
    with pytest.raises(Conflict):
        cancel_job(app, job["id"])
    assert get_run(app, job["run_id"])["status"] == "cancelled"


def test_job_outlives_the_cli_that_submitted_it(app: Appliance) -> None:
    code = "import time; time.sleep(1.5); print('still here')"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "jobs",
            "run",
            "--home",
            str(app.settings.home),
            "--json",
            "--",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    submitted = json.loads(result.stdout)
    assert submitted["state"] in ("queued", "running")
    done = wait_job(app, submitted["id"], timeout=60)
    assert done["state"] == "succeeded"
    assert "still here" in job_log(app, submitted["id"])


def test_a_command_that_cannot_start_fails_cleanly(app: Appliance) -> None:
    job = submit_job(app, JobSpec(kind="command", command=["/nonexistent/binary"]))
    done = wait_job(app, job["id"], timeout=60)
    assert done["state"] == "failed"
    assert "could not start" in done["error"]


@pytest.mark.parametrize(
    "spec", [JobSpec(kind="command", command=[]), JobSpec(kind="train-pytorch-someday")]
)
def test_invalid_specs_are_refused_before_anything_is_stored(app: Appliance, spec: JobSpec) -> None:
    with pytest.raises(InvalidInput):
        submit_job(app, spec)
    assert app.db.scalar("SELECT count(*) FROM jobs") == 0


def test_training_on_a_tiny_split_fails_with_a_reason(app: Appliance, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from appliance.core.datasets import import_csv
    from appliance.core.training import submit_training

    csv = tmp_path / "tiny.csv"
    csv.write_text("x,y\n" + "".join(f"{i},{i % 2}\n" for i in range(20)))
    import_csv(app, csv, "tiny")
    job = submit_training(app, "tiny", "y", params={"valid_fraction": 0.001})
    done = wait_job(app, job["id"], timeout=60)
    assert done["state"] == "failed"
    assert "empty training or validation split" in done["error"]


def test_follow_streams_the_log_until_the_job_ends(app: Appliance) -> None:
    from appliance.core.jobs import follow_log

    code = "import time\nfor i in range(3):\n    print(f'line {i}', flush=True); time.sleep(0.3)"
    job = submit_job(app, _py(code))
    chunks = list(follow_log(app, job["id"], poll=0.05))
    assert len(chunks) >= 2  # arrived in pieces, while the job ran
    assert "".join(chunks).splitlines() == ["line 0", "line 1", "line 2"]
    assert get_job(app, job["id"])["state"] == "succeeded"
