"""Jobs: one spec, one executor interface, and the JSON-lines protocol jobs speak on stdout.

A job process prints JSON objects, one per line, to report progress, params, metrics and
artifacts; every other line is a log line. The executor's supervisor parses those lines into
the metadata store, so job code never touches SQLite and runs unchanged in a k3s pod.

    {"type": "progress", "current": 10, "total": 200, "message": "boosting"}
    {"type": "metric", "key": "valid_auc", "value": 0.91, "step": 10}
    {"type": "param", "key": "num_leaves", "value": 31}
    {"type": "tag", "key": "engine", "value": "lightgbm"}
    {"type": "input", "ref": "churn@2"}           (a dataset version the job read: lineage)
    {"type": "status", "message": "waiting for data"}
    {"type": "artifact", "name": "model", "sha256": "…", "size": 1234, "uri": "…",
     "media_type": "text/plain", "meta": {…}}
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from appliance.core.context import Appliance
from appliance.core.lineage import Node, record_execution, set_execution_state
from appliance.core.processes import alive, signal_ours
from appliance.core.runs import MetricRow, create_run, log_metrics, new_id, set_params, set_tags
from appliance.errors import ApplianceError, Conflict, InvalidInput, NotFound
from appliance.store.db import utcnow

BUILTIN_KINDS = ("train-lightgbm", "train-mlp", "recipe")
EXECUTION_TYPES = {
    "train-lightgbm": "Train",
    "train-mlp": "Train",
    "recipe": "Recipe",
    "command": "Run",
}
FINAL_STATES = ("succeeded", "failed", "cancelled", "lost")
SPEC_ENV = "APPLIANCE_JOB_SPEC"


@dataclass
class JobSpec:
    """What to run. The same spec means the same thing on every executor.

    kind: a built-in entry ("train-lightgbm") or "command" (run `command` as given).
    inputs: resolved references the job reads (e.g. a dataset version's sha256 and schema).
    params: the job's parameters. resources: cpu, memory, gpu requests.
    """

    kind: str
    command: list[str] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=lambda: {"cpu": 1, "memory": "2Gi", "gpu": 0})
    workdir: str | None = None  # where a command runs (local executor); None: the home

    def validate(self) -> JobSpec:
        if self.kind == "command":
            if not self.command or not all(isinstance(c, str) for c in self.command):
                raise InvalidInput("job spec command: a non-empty list of strings is required")
        elif self.kind not in BUILTIN_KINDS:
            raise InvalidInput(
                f"job spec kind {self.kind!r}: expected 'command' or one of {list(BUILTIN_KINDS)}"
            )
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        data = json.loads(text)
        return cls(**data).validate()


class Executor(Protocol):
    """Starts and stops job processes; the supervisor it starts records what they report."""

    name: str

    def start(self, app: Appliance, job_id: str) -> int: ...

    def cancel(self, job: dict[str, Any]) -> None: ...

    def is_alive(self, job: dict[str, Any]) -> bool: ...


class LocalExecutor:
    """Each job is a detached `python -m appliance.runner supervise JOB` process group."""

    name = "local"

    def start(self, app: Appliance, job_id: str) -> int:
        log_path = app.settings.logs_dir / "jobs" / f"{job_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "APPLIANCE_HOME": str(app.settings.home)}
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.runner", "supervise", job_id],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
                start_new_session=True,  # outlives the CLI; cancel signals the whole group
            )
        return proc.pid

    def cancel(self, job: dict[str, Any]) -> None:
        signal_ours(job.get("pid"), signal.SIGTERM, group=True)

    def is_alive(self, job: dict[str, Any]) -> bool:
        return alive(job.get("pid"))


def get_executor(name: str) -> Executor:
    if name == "local":
        return LocalExecutor()
    raise InvalidInput(f"executor {name!r}: only 'local' is available")


def submit_job(
    app: Appliance,
    spec: JobSpec,
    experiment: str = "default",
    run_name: str | None = None,
    inputs: list[Node] | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Record a job and its run, then start it on the configured executor."""
    spec.validate()
    executor = get_executor(app.settings.executor)
    job_id = new_id()
    log_path = app.settings.logs_dir / "jobs" / f"{job_id}.log"
    with app.db.transaction() as conn:
        conn.execute(
            "INSERT INTO jobs (id, kind, spec_json, state, executor, log_path, submitted_at) "
            "VALUES (?, ?, ?, 'queued', ?, ?, ?)",
            (job_id, spec.kind, spec.to_json(), executor.name, str(log_path), utcnow()),
        )
        run_id = create_run(
            conn,
            experiment,
            run_name or spec.kind,
            {k: v for k, v in spec.params.items() if k != "sql"},
            job_id,
            inputs or [],
            execution_type=EXECUTION_TYPES[spec.kind],
        )
        if tags:
            set_tags(conn, run_id, tags)
    try:
        pid = executor.start(app, job_id)
    except OSError as exc:
        _finish(
            app, job_id, "failed", None, f"the {executor.name} executor could not start it: {exc}"
        )
        raise ApplianceError(f"job {job_id}: could not start ({exc})") from exc
    app.db.execute("UPDATE jobs SET pid = coalesce(pid, ?) WHERE id = ?", (pid, job_id))
    return {**get_job(app, job_id), "run_id": run_id}


def _job_row(app: Appliance, job_id: str) -> dict[str, Any] | None:
    return app.db.one(
        "SELECT j.*, r.id AS run_id FROM jobs j LEFT JOIN runs r ON r.job_id = j.id WHERE j.id = ?",
        (job_id,),
    )


def _mark_lost_if_dead(app: Appliance, job: dict[str, Any]) -> dict[str, Any]:
    # A supervisor killed by the OS (OOM, reboot) cannot report; don't show it running forever.
    if job["state"] in ("queued", "running") and job.get("pid"):
        if not get_executor(job["executor"]).is_alive(job):
            fresh = _job_row(app, job["id"])
            if fresh and fresh["state"] in ("queued", "running"):
                _finish(app, job["id"], "lost", None, "the job's supervisor process disappeared")
            return _job_row(app, job["id"]) or job
    return job


def get_job(app: Appliance, job_id: str) -> dict[str, Any]:
    job = _job_row(app, job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    job = _mark_lost_if_dead(app, job)
    job.pop("spec_json", None)
    return job


def list_jobs(app: Appliance) -> list[dict[str, Any]]:
    rows = app.db.rows(
        "SELECT j.id, j.kind, j.state, j.pid, j.executor, j.progress_current, j.progress_total, "
        "j.submitted_at, j.finished_at, j.exit_code, j.error, r.id AS run_id "
        "FROM jobs j LEFT JOIN runs r ON r.job_id = j.id ORDER BY j.submitted_at DESC"
    )
    out = []
    for row in rows:
        row = _mark_lost_if_dead(app, row)
        total = row.get("progress_total")
        row["progress"] = f"{100 * (row['progress_current'] or 0) / total:.0f}%" if total else ""
        out.append(
            {
                k: row.get(k)
                for k in ("id", "kind", "state", "progress", "run_id", "submitted_at", "error")
            }
        )
    return out


def wait_job(app: Appliance, job_id: str, timeout: float | None = None) -> dict[str, Any]:
    """Block until the job reaches a final state (or the timeout passes)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = get_job(app, job_id)
        if job["state"] in FINAL_STATES:
            return job
        if deadline is not None and time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def cancel_job(app: Appliance, job_id: str, grace: float = 10.0) -> dict[str, Any]:
    """Stop a queued or running job; it ends in state 'cancelled'."""
    job = get_job(app, job_id)
    if job["state"] in FINAL_STATES:
        raise Conflict(f"job {job_id} already {job['state']}; nothing to cancel")
    executor = get_executor(job["executor"])
    executor.cancel(job)
    job = wait_job(app, job_id, timeout=grace)
    if job["state"] not in FINAL_STATES:
        signal_ours(job.get("pid"), signal.SIGKILL, group=True)
        _finish(app, job_id, "cancelled", None, "cancelled (killed after grace period)")
    elif job["state"] == "lost":
        _finish(app, job_id, "cancelled", None, "cancelled", force=True)
    return get_job(app, job_id)


def job_log(app: Appliance, job_id: str) -> str:
    job = get_job(app, job_id)
    path = Path(job["log_path"])
    return path.read_text(errors="replace") if path.exists() else ""


def follow_log(app: Appliance, job_id: str, poll: float = 0.2) -> Iterator[str]:
    """Yield log text as it is written, until the job ends."""
    job = get_job(app, job_id)
    path = Path(job["log_path"])
    offset = 0
    while True:
        if path.exists():
            with path.open("r", errors="replace") as fh:
                fh.seek(offset)
                chunk = fh.read()
                offset = fh.tell()
            if chunk:
                yield chunk
        if get_job(app, job_id)["state"] in FINAL_STATES:
            if path.exists() and path.stat().st_size > offset:
                continue
            return
        time.sleep(poll)


_RUN_STATUS = {
    "succeeded": "finished",
    "failed": "failed",
    "cancelled": "cancelled",
    "lost": "lost",
}
_EXEC_STATE = {
    "succeeded": "COMPLETE",
    "failed": "FAILED",
    "cancelled": "CANCELED",
    "lost": "FAILED",
}


def _finish(
    app: Appliance,
    job_id: str,
    state: str,
    exit_code: int | None,
    error: str | None,
    force: bool = False,
) -> None:
    now = utcnow()
    guard = "" if force else " AND state IN ('queued', 'running')"
    with app.db.transaction() as conn:
        cur = conn.execute(
            "UPDATE jobs SET state = ?, exit_code = ?, error = ?, finished_at = ? WHERE id = ?"
            + guard,
            (state, exit_code, error, now, job_id),
        )
        if cur.rowcount == 0:
            return
        run = conn.execute("SELECT id FROM runs WHERE job_id = ?", (job_id,)).fetchone()
        if run is not None:
            conn.execute(
                "UPDATE runs SET status = ?, finished_at = ? WHERE id = ?",
                (_RUN_STATUS[state], now, run[0]),
            )
            set_execution_state(conn, f"run:{run[0]}", _EXEC_STATE[state])


class LineRecorder:
    """Turns a job's stdout into store writes; metric rows are batched into few transactions."""

    FLUSH_ROWS = 500
    FLUSH_SECONDS = 0.5

    def __init__(self, app: Appliance, job_id: str, run_id: str, log: TextIO) -> None:
        self.app = app
        self.job_id = job_id
        self.run_id = run_id
        self.log = log
        self.log_lock = threading.Lock()
        self.metrics: list[MetricRow] = []
        self.progress: tuple[float, float | None, str | None] | None = None
        self.last_flush = time.monotonic()

    def write_log(self, text: str) -> None:
        with self.log_lock:
            self.log.write(text if text.endswith("\n") else text + "\n")
            self.log.flush()

    def handle(self, line: str) -> None:
        stripped = line.strip()
        event = None
        if stripped.startswith("{"):
            try:
                event = json.loads(stripped)
            except json.JSONDecodeError:
                event = None
        if isinstance(event, dict) and isinstance(event.get("type"), str):
            try:
                self._handle_event(event)
            except (
                KeyError,
                TypeError,
                ValueError,
                OverflowError,
                sqlite3.Error,
                ApplianceError,
            ) as exc:
                self.write_log(f"[appliance] ignored malformed event ({exc}): {stripped}")
        else:
            self.write_log(line)
        if (
            len(self.metrics) >= self.FLUSH_ROWS
            or time.monotonic() - self.last_flush > self.FLUSH_SECONDS
        ):
            self.flush()

    def _handle_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "metric":
            value = float(event["value"])
            step = int(event.get("step", 0))
            timestamp = float(event.get("timestamp", time.time()))
            if not math.isfinite(value) or not math.isfinite(timestamp):
                raise ValueError(f"metric {event['key']!r}: value must be a finite number")
            if not 0 <= step < 2**63:
                raise ValueError(f"metric {event['key']!r}: step must be a non-negative integer")
            self.metrics.append((str(event["key"]), value, step, timestamp))
        elif kind == "progress":
            total = event.get("total")
            self.progress = (
                float(event["current"]),
                float(total) if total is not None else None,
                event.get("message"),
            )
        elif kind in ("param", "tag"):
            with self.app.db.transaction() as conn:
                setter = set_params if kind == "param" else set_tags
                setter(conn, self.run_id, {str(event["key"]): event["value"]})
        elif kind == "artifact":
            self._record_artifact(event)
        elif kind == "input":
            self._record_input(str(event["ref"]))
        elif kind == "status":
            self.app.db.execute(
                "UPDATE jobs SET progress_message = ? WHERE id = ?",
                (str(event["message"])[:500], self.job_id),
            )
        else:
            raise ValueError(f"unknown event type {kind!r}")

    def _record_input(self, ref: str) -> None:
        from appliance.core.datasets import get_dataset_version

        version = get_dataset_version(self.app, ref)  # NotFound is reported as a bad event
        with self.app.db.transaction() as conn:
            record_execution(
                conn,
                "Run",
                f"run:{self.run_id}",
                inputs=[("DatasetVersion", f"dataset:{version['ref']}")],
                state="RUNNING",
            )

    def _record_artifact(self, event: dict[str, Any]) -> None:
        sha = str(event["sha256"])
        if not self.app.objects.exists(sha):
            raise ValueError(f"artifact {sha[:12]} is not in the object store")
        with self.app.db.transaction() as conn:
            conn.execute(
                "INSERT INTO artifacts (sha256, uri, size, media_type, created_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                (
                    sha,
                    str(event["uri"]),
                    int(event["size"]),
                    str(event.get("media_type", "application/octet-stream")),
                    utcnow(),
                ),
            )
            artifact_id = conn.execute(
                "SELECT id FROM artifacts WHERE sha256 = ?", (sha,)
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO run_outputs (run_id, name, artifact_id, meta_json) "
                "VALUES (?, ?, ?, ?) "
                "ON CONFLICT (run_id, name) DO UPDATE SET artifact_id = excluded.artifact_id, "
                "meta_json = excluded.meta_json",
                (self.run_id, str(event["name"]), artifact_id, json.dumps(event.get("meta", {}))),
            )
            meta = event.get("meta") or {}
            if "dataset_version" not in meta:  # a dataset output is recorded as a version below
                record_execution(
                    conn,
                    "Run",
                    f"run:{self.run_id}",
                    outputs=[("ModelFile" if event["name"] == "model" else "File", f"blob:{sha}")],
                    state="RUNNING",
                )
        if "dataset_version" in (event.get("meta") or {}):
            from appliance.core.recipes import record_output

            record_output(self.app, self.run_id, event)

    def flush(self) -> None:
        metrics, self.metrics = self.metrics, []
        try:
            log_metrics(self.app, self.run_id, metrics)
        except sqlite3.Error as exc:  # a bad batch must not take the supervisor down
            self.write_log(f"[appliance] could not record {len(metrics)} metric rows: {exc}")
        if self.progress is not None:
            current, total, message = self.progress
            self.progress = None
            self.app.db.execute(
                "UPDATE jobs SET progress_current = ?, progress_total = ?, progress_message = ? "
                "WHERE id = ?",
                (current, total, message, self.job_id),
            )
        self.last_flush = time.monotonic()


def _job_command(spec: JobSpec) -> list[str]:
    if spec.kind == "command":
        return list(spec.command)
    return [sys.executable, "-m", "appliance.runner", "run"]


def supervise(app: Appliance, job_id: str, kill_after: float = 10.0) -> str:
    """Run one job to its end: start its process, record its lines, set its final state."""
    row = _job_row(app, job_id)
    if row is None:
        raise NotFound(f"job {job_id!r} not found")
    spec = JobSpec.from_json(row["spec_json"])
    run_id = row["run_id"]
    with app.db.transaction() as conn:
        conn.execute(
            "UPDATE jobs SET state = 'running', pid = ?, started_at = ? WHERE id = ?",
            (os.getpid(), utcnow(), job_id),
        )
        conn.execute("UPDATE runs SET status = 'running' WHERE id = ?", (run_id,))
        set_execution_state(conn, f"run:{run_id}", "RUNNING")

    cancelled = threading.Event()
    log_path = Path(row["log_path"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        SPEC_ENV: spec.to_json(),
        "APPLIANCE_JOB_ID": job_id,
        "APPLIANCE_RUN_ID": run_id,
        "APPLIANCE_HOME": str(app.settings.home),
        "PYTHONUNBUFFERED": "1",
    }
    started: list[subprocess.Popen[str]] = []

    def on_term(signum: int, frame: object) -> None:
        cancelled.set()
        for child in started:
            child.terminate()
            killer = threading.Timer(kill_after, lambda c=child: c.poll() is None and c.kill())
            killer.daemon = True  # must not hold the supervisor open once the child is gone
            killer.start()

    # Installed before the child starts: a cancel that arrives early still ends as 'cancelled'.
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    with log_path.open("a", encoding="utf-8") as log:
        recorder = LineRecorder(app, job_id, run_id, log)
        try:
            child = subprocess.Popen(
                _job_command(spec),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                bufsize=1,
                env=env,
                cwd=spec.workdir or app.settings.home,
            )
        except OSError as exc:
            _finish(app, job_id, "failed", None, f"could not start {spec.command[:1]}: {exc}")
            return "failed"
        started.append(child)
        if cancelled.is_set():
            child.terminate()
        stderr_tail: deque[str] = deque(maxlen=20)

        def pump_stderr() -> None:
            assert child.stderr is not None
            for line in child.stderr:
                stderr_tail.append(line.rstrip("\n"))
                recorder.write_log(line)

        err_thread = threading.Thread(target=pump_stderr, daemon=True)
        err_thread.start()
        assert child.stdout is not None
        for line in child.stdout:
            recorder.handle(line)
        exit_code = child.wait()
        err_thread.join(timeout=5)
        recorder.flush()

    if cancelled.is_set():
        state, error = "cancelled", "cancelled by request"
    elif exit_code == 0:
        state, error = "succeeded", None
    else:
        last = [ln for ln in stderr_tail if ln.strip()]
        reason = last[-1] if last else "no error output"
        state, error = "failed", f"exit code {exit_code}: {reason}"
    _finish(app, job_id, state, exit_code, error)
    return state


def emit(event: dict[str, Any]) -> None:
    """Print one protocol line (used by built-in jobs and any Python job script)."""
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def environment_tags() -> dict[str, str]:
    """The versions a run ran with, recorded as tags so runs can be compared later."""
    import platform
    from importlib import metadata

    tags = {"env.python": platform.python_version()}
    for package in ("lightgbm", "torch", "duckdb", "numpy"):
        try:
            tags[f"env.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return tags


def git_commit(script: Path) -> str | None:
    """The commit a script is at: '+dirty' when it or tracked files changed, 'untracked' when
    git does not track the script itself; None outside a git checkout."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(script.parent), *args], capture_output=True, text=True, timeout=10
        )

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        if git("ls-files", "--error-unmatch", script.name).returncode != 0:
            return f"{head.stdout.strip()}+untracked"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def submit_script(
    app: Appliance,
    script: str | Path,
    args: list[str],
    experiment: str = "default",
    name: str | None = None,
    inputs: list[str] | None = None,
) -> dict[str, Any]:
    """Run a user's Python file as a tracked job (it may use `appliance.sdk`)."""
    from appliance.core.datasets import get_dataset_version

    path = Path(script).expanduser()
    if not path.is_file():
        raise InvalidInput(f"{script}: no such script")
    declared = {}
    for ref in inputs or []:
        version = get_dataset_version(app, ref)
        declared[ref] = {"ref": version["ref"], "sha256": version["sha256"]}
    spec = JobSpec(
        kind="command",
        command=[sys.executable, str(path.resolve()), *args],
        inputs={"datasets": declared},
        workdir=str(path.resolve().parent),
    )
    tags = environment_tags()
    commit = git_commit(path.resolve())
    if commit:
        tags["git.commit"] = commit
    tags["script"] = str(path.resolve())
    return submit_job(
        app,
        spec,
        experiment=experiment,
        run_name=name or path.name,
        inputs=[("DatasetVersion", f"dataset:{v['ref']}") for v in declared.values()],
        tags=tags,
    )
