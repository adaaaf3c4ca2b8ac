"""Storage faults during a job: a write that cannot complete fails the run cleanly."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance.core.context import Appliance
from appliance.core.jobs import submit_script, wait_job
from appliance.core.runs import get_run

# Writes a big artifact, then (only if that raised) proves the store still takes small ones.
ARTIFACT_SCRIPT = """
import os, resource, sys
from appliance import sdk

big = "big.bin"
with open(big, "wb") as fh:
    fh.write(os.urandom(512 * 1024))
limit = int(sys.argv[1])
if limit:  # the kernel refuses writes past this size: EFBIG, as a full disk refuses with ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
sdk.log_param("size", 512 * 1024)
sdk.log_artifact(big, name="model")
"""


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[None]:
    """A real, tiny filesystem at `path`: writes past `size` fail with ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root: " + mounted.stderr.decode().strip())
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _objects(app: Appliance) -> list[Path]:
    return [p for p in app.settings.objects_dir.rglob("*") if p.is_file()]


def _assert_failed_cleanly(app: Appliance, job: dict, reason: str) -> None:  # type: ignore[type-arg]
    done = wait_job(app, job["id"], timeout=60)
    assert done["state"] == "failed", done
    assert reason in done["error"] and "nothing was stored" in done["error"]
    run = get_run(app, job["run_id"])
    assert run["status"] == "failed"
    assert run["outputs"] == []
    assert app.db.scalar("SELECT count(*) FROM artifacts") == 0
    assert _objects(app) == []  # no half-written object, no temp file


def test_a_write_the_kernel_refuses_fails_the_run_without_a_half_artifact(
    app: Appliance, tmp_path: Path
) -> None:
    script = tmp_path / "log_big.py"
    script.write_text(ARTIFACT_SCRIPT)
    # The store's copy of big.bin goes past the limit halfway.
    job = submit_script(app, script, [str(256 * 1024)], experiment="faults")
    _assert_failed_cleanly(app, job, "File too large")


def test_disk_full_while_writing_an_artifact_fails_the_run_cleanly(
    app: Appliance, tmp_path: Path
) -> None:
    with small_tmpfs(app.settings.objects_dir, "256k"):
        script = tmp_path / "log_big.py"
        script.write_text(ARTIFACT_SCRIPT)
        job = submit_script(app, script, ["0"], experiment="faults")
        _assert_failed_cleanly(app, job, "No space left on device")
        # The store is still usable once the job is gone.
        small = tmp_path / "small.py"
        small.write_text(
            "import pathlib\nfrom appliance import sdk\n"
            "pathlib.Path('s.txt').write_text('ok')\nsdk.log_artifact('s.txt')\n"
        )
        ok = wait_job(app, submit_script(app, small, [])["id"], timeout=60)
        assert ok["state"] == "succeeded"


def test_a_full_disk_under_the_job_logs_never_hangs_a_job(app: Appliance) -> None:
    """The job's pipes keep draining; its own exit decides the state (a retry would meet the
    same full disk), and the lost log is said next to it."""
    from appliance.core.jobs import JobSpec, submit_job

    with small_tmpfs(app.settings.logs_dir / "jobs", "64k"):
        chatty = (
            "import sys\nfor i in range(20000):\n    print('x' * 100)\nsys.exit(int(sys.argv[1]))"
        )
        ok = submit_job(
            app, JobSpec(kind="command", command=[sys.executable, "-c", chatty, "0"], retries=2)
        )
        done = wait_job(app, ok["id"], timeout=60)  # it drains, so it ends
        assert done["state"] == "succeeded" and done["attempt"] == 1
        assert done["error"].startswith("warning: could not write the job log")
        assert "No space left on device" in done["error"]
        bad = submit_job(app, JobSpec(kind="command", command=[sys.executable, "-c", chatty, "3"]))
        done = wait_job(app, bad["id"], timeout=60)
        assert done["state"] == "failed" and done["exit_code"] == 3
        assert "warning: could not write the job log" in done["error"]
