"""Jobs: one spec, one executor interface, and the JSON-lines protocol jobs speak on stdout.

A job process prints JSON objects, one per line, to report progress, params, metrics and
artifacts; every other line is a log line. The executor's supervisor parses those lines into
the metadata store, so job code never touches SQLite and runs unchanged in a k3s pod.

    {"type": "progress", "done": 10, "total": 200, "message": "boosting"}
    {"type": "metric", "name": "valid_auc", "value": 0.91, "step": 10}
    {"type": "param", "name": "num_leaves", "value": 31}
    {"type": "tag", "name": "engine", "value": "lightgbm"}
    {"type": "input", "ref": "churn@2"}           (a dataset version the job read: lineage)
    {"type": "status", "message": "waiting for data"}
    {"type": "artifact", "name": "model", "sha256": "…", "size": 1234, "uri": "…",
     "media_type": "text/plain", "meta": {…}}

"key" is accepted for "name", and "current" for "done" (what the first SDK wrote).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from appliance.core.context import Appliance
from appliance.core.lineage import Node, record_execution, set_execution_state
from appliance.core.processes import identity, is_ours, is_same, kill_tree, signal_ours
from appliance.core.runs import MetricRow, create_run, log_metrics, new_id, set_params, set_tags
from appliance.errors import ApplianceError, Conflict, InvalidInput, NotFound
from appliance.store.db import parse_utc, utcnow

BUILTIN_KINDS = (
    "train-lightgbm",
    "train-mlp",
    "recipe",
    "evaluate",
    "tune-function",
    "pipeline-step",
)
EXECUTION_TYPES = {
    "train-lightgbm": "Train",
    "train-mlp": "Train",
    "recipe": "Recipe",
    "evaluate": "Evaluate",
    "tune-function": "Trial",
    "pipeline-step": "Step",
    "command": "Run",
}
ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("succeeded", "failed", "cancelled", "timed_out")
SPEC_ENV = "APPLIANCE_JOB_SPEC"
KILL_GRACE = 1.0  # SIGTERM -> SIGKILL: cancel and timeout end the whole tree within 2 s
NON_FINITE_TAG = "non_finite."  # + a metric's name: its first NaN or infinity, and the step
SUPERVISOR_GONE = "the job's supervisor process disappeared (killed, or the machine restarted)"
CLAIM_GRACE = 30.0  # a claimed job whose supervisor never reported a pid is gone after this
MAX_RETRIES = 10
RESOURCE_KEYS = ("cpu", "memory", "gpu")
_MEMORY_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_memory(value: Any, field_name: str = "resources.memory") -> int:
    """Bytes from a Kubernetes quantity ("512Mi", "2Gi", "1G") or a plain number of bytes."""
    if isinstance(value, bool):
        raise InvalidInput(f"{field_name}: expected a size like '2Gi', got {value!r}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    else:
        text = str(value).strip()
        digits = text.rstrip("kKMGTi")
        number_text, unit = digits, text[len(digits) :]
        try:
            number = float(number_text)
        except ValueError:
            number = -1.0
        if unit not in _MEMORY_UNITS:
            number = -1.0
    if not math.isfinite(number) or number < 0:
        raise InvalidInput(f"{field_name}: expected a size like '512Mi' or '2Gi', got {value!r}")
    return int(number * _MEMORY_UNITS[unit])


def parse_duration(value: Any, field_name: str = "timeout") -> float:
    """Seconds from a number or a string like '90s', '30m', '2h'."""
    factors = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        factor = factors.get(text[-1], 0) if not text[-1].isdigit() else 1
        try:
            seconds = float(text[:-1] if not text[-1].isdigit() else text) * factor
        except ValueError:
            seconds = None
        if factor == 0:
            seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise InvalidInput(f"{field_name}: expected seconds or '30m'/'2h', got {value!r}")
    return seconds


@dataclass(frozen=True)
class Request:
    """What one job takes from the machine while it runs."""

    cpu: float
    memory: int
    gpu: int


@dataclass
class JobSpec:
    """What to run. The same spec means the same thing on every executor.

    kind: a built-in entry ("train-lightgbm") or "command" (run `command` as given).
    inputs: resolved references the job reads (e.g. a dataset version's sha256 and schema).
    params: the job's parameters. resources: cpu, memory, gpu requests (as a Kubernetes pod's).
    timeout: seconds per attempt before the job is killed and ends 'timed_out'.
    retries: how many times a failed attempt (non-zero exit, vanished process) runs again.
    env: variables set for the job, over the agent's environment (as a pod's env is).
    """

    kind: str
    command: list[str] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=lambda: {"cpu": 1, "memory": "2Gi", "gpu": 0})
    workdir: str | None = None  # where a command runs (local executor); None: the home
    timeout: float | None = None
    retries: int = 0
    experiment: str = "default"
    env: dict[str, str] = field(default_factory=dict)

    def validate(self) -> JobSpec:
        if self.kind == "command":
            if not self.command or not all(isinstance(c, str) for c in self.command):
                raise InvalidInput("job spec command: a non-empty list of strings is required")
        elif self.kind not in BUILTIN_KINDS:
            raise InvalidInput(
                f"job spec kind {self.kind!r}: expected 'command' or one of {list(BUILTIN_KINDS)}"
            )
        self.request()
        if self.timeout is not None:
            self.timeout = parse_duration(self.timeout)
        if isinstance(self.retries, bool) or not isinstance(self.retries, int):
            raise InvalidInput(f"retries: expected an integer, got {self.retries!r}")
        if not 0 <= self.retries <= MAX_RETRIES:
            raise InvalidInput(f"retries: expected 0 to {MAX_RETRIES}, got {self.retries}")
        if not isinstance(self.env, dict):
            raise InvalidInput(f"env: expected a mapping of NAME: value, got {self.env!r}")
        for name, value in self.env.items():
            if (
                not isinstance(name, str)
                or not name.replace("_", "a").isalnum()
                or name[0].isdigit()
            ):
                raise InvalidInput(f"env.{name}: not a valid variable name")
            if name.startswith("APPLIANCE_") or name == "CUDA_VISIBLE_DEVICES":
                raise InvalidInput(f"env.{name}: set by the platform, not by a job spec")
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise InvalidInput(f"env.{name}: expected a string, got {value!r}")
            if "\0" in str(value):
                raise InvalidInput(f"env.{name}: contains a NUL byte")
            self.env[name] = str(value)
        return self

    def request(self) -> Request:
        """The resources as numbers; names the offending key when one is wrong."""
        if not isinstance(self.resources, dict):
            raise InvalidInput(f"resources: expected a mapping, got {self.resources!r}")
        unknown = sorted(set(self.resources) - set(RESOURCE_KEYS))
        if unknown:
            raise InvalidInput(f"resources.{unknown[0]}: unknown key (expected cpu, memory, gpu)")
        cpu = self.resources.get("cpu", 1)
        if isinstance(cpu, str) and cpu.endswith("m") and cpu[:-1].isdigit():
            cpu = int(cpu[:-1]) / 1000  # Kubernetes millicores
        # a pipeline's control step mostly waits on other jobs (a study's trials): it takes
        # no core, or it would hold back the very jobs it waits for
        low = 0 if self.kind == "pipeline-step" else 1e-12
        if isinstance(cpu, bool) or not isinstance(cpu, int | float) or not low <= cpu < 4096:
            raise InvalidInput(f"resources.cpu: expected a positive number of cores, got {cpu!r}")
        gpu = self.resources.get("gpu", 0)
        if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
            raise InvalidInput(f"resources.gpu: expected a whole number of GPUs, got {gpu!r}")
        return Request(float(cpu), parse_memory(self.resources.get("memory", 0)), gpu)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        data = json.loads(text)
        return cls(**data).validate()


class Executor(Protocol):
    """Starts and stops job processes; the supervisor it starts records what they report.

    `child` is what the supervisor watches: None for a local process it starts itself, or
    an object shaped like one (stdout lines, wait(), halt()) for a job run elsewhere."""

    name: str

    def start(self, app: Appliance, job_id: str) -> int: ...

    def cancel(self, job: dict[str, Any]) -> None: ...

    def is_alive(self, job: dict[str, Any]) -> bool: ...

    def child(self, app: Appliance, job_id: str, spec: JobSpec) -> Any: ...

    def orphaned(self, app: Appliance, job: dict[str, Any]) -> None: ...

    def capacity(self, app: Appliance) -> Any: ...

    def check_fits(self, app: Appliance, request: Request) -> None: ...

    def prepare(self, app: Appliance, spec: JobSpec) -> JobSpec: ...


class LocalExecutor:
    """Each job is supervised by a process of its own session, forked from the agent while
    the agent runs no other thread, else started as a fresh interpreter.

    Forking skips an interpreter start and, for built-in jobs, the imports the agent preloaded;
    the supervisor survives the agent's exit or kill -9, and records the job's end itself.
    """

    name = "local"

    def start(self, app: Appliance, job_id: str) -> int:
        log_path = app.settings.logs_dir / "jobs" / f"{job_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if not _fork_safe():
            return self._spawn(app, job_id, log_path)
        sys.stdout.flush()
        sys.stderr.flush()
        # SQLite keeps per-process lock state that a forked child must not inherit: close the
        # connection first (the parent reopens it on next use; about a millisecond).
        app.close()
        # A cancel may arrive the moment the agent records the pid: the child holds it until
        # its own handler is in place, so it is never killed half-started.
        stops = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
            raise
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
            return pid
        code = 1
        try:  # the child: never return into the caller's loop
            for signum in stops:
                signal.signal(signum, _early_stop)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
            os.setsid()
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            null_fd = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null_fd, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.closerange(3, 65536)  # the agent's lock, socket and database stay with it
            child_app = Appliance(app.settings)  # a fresh SQLite connection: never share one
            code = 0 if supervise(child_app, job_id) in ("succeeded", "queued") else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)

    def _spawn(self, app: Appliance, job_id: str, log_path: Path) -> int:
        """The supervisor in a fresh interpreter, when another thread runs (the agent's
        shipping or monitor pass): a fork would copy that thread's open SQLite connection
        without the files behind it, or a module it is importing half-done, and the child's
        first read fails or its import hangs. It starts slower: no warm imports.

        No Popen: only the agent's `_reap` waits for it, as for a forked one. It starts with
        SIGTERM and SIGINT blocked, so a cancel waits until the supervisor listens (it
        unblocks them then). The agent's own files are all close-on-exec."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        log = os.open(log_path, flags, 0o644)
        try:
            return os.posix_spawn(
                sys.executable,
                [sys.executable, "-m", "appliance.runner", "supervise", job_id],
                {**os.environ, "APPLIANCE_HOME": str(app.settings.home)},
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log, 1),
                    (os.POSIX_SPAWN_DUP2, log, 2),
                ],
                setsid=True,
                setsigmask={signal.SIGTERM, signal.SIGINT},
                setsigdef={signal.SIGPIPE, signal.SIGXFSZ},  # as Popen restores them
            )
        finally:
            os.close(log)

    def cancel(self, job: dict[str, Any]) -> None:
        if self.is_alive(job):
            signal_ours(job.get("pid"), signal.SIGTERM)

    def is_alive(self, job: dict[str, Any]) -> bool:
        return is_ours(job.get("pid")) and is_same(job.get("pid"), job.get("pid_identity"))

    def child(self, app: Appliance, job_id: str, spec: JobSpec) -> Any:
        return None  # the supervisor starts the job's process itself

    def orphaned(self, app: Appliance, job: dict[str, Any]) -> None:
        """The job process of a vanished supervisor, if it still runs (checked by identity)."""
        child, known = job.get("child_pid"), job.get("child_identity")
        if child and known and is_same(child, known):
            kill_tree(child, grace=0.2)

    def capacity(self, app: Appliance) -> Any:
        from appliance.core.agent import machine_capacity

        return machine_capacity()

    def check_fits(self, app: Appliance, request: Request) -> None:
        self.capacity(app).check_fits(request)

    def prepare(self, app: Appliance, spec: JobSpec) -> JobSpec:
        return spec  # the job runs here, among its own files


_STOP_REQUESTED = threading.Event()  # a stop signal that came before supervise() listened


def _early_stop(signum: int, frame: object) -> None:
    _STOP_REQUESTED.set()


def get_executor(name: str) -> Executor:
    if name == "local":
        return LocalExecutor()
    if name == "k3s":
        from appliance.core.k3s_jobs import K3sExecutor

        return K3sExecutor()
    raise InvalidInput(f"executor {name!r}: expected 'local' or 'k3s'")


def submit_job(
    app: Appliance,
    spec: JobSpec,
    experiment: str | None = None,
    run_name: str | None = None,
    inputs: list[Node] | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    record: Callable[[sqlite3.Connection, str, str], None] | None = None,
    executor_name: str | None = None,
) -> dict[str, Any]:
    """Queue a job and its run; the agent (started here if it is not running) starts it.

    `record(conn, job_id, run_id)` writes the caller's own row in the same transaction (a
    tuning trial), so a crash never leaves a job its owner does not know about.
    `executor_name` overrides the home's executor: a pipeline's control steps act on this
    home's registry, so they run here whatever executes the compute."""
    from appliance.core.agent import ensure_agent

    if experiment is not None:
        spec.experiment = experiment
    spec.validate()
    request = spec.request()
    executor = get_executor(executor_name or app.settings.executor)
    executor.check_fits(app, request)
    spec = executor.prepare(app, spec)
    job_id = new_id()
    log_path = app.settings.logs_dir / "jobs" / f"{job_id}.log"
    with app.db.transaction() as conn:
        conn.execute(
            "INSERT INTO jobs (id, kind, spec_json, state, executor, log_path, submitted_at, "
            "retries, timeout_s, cpu, memory_bytes, gpu) "
            "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                spec.kind,
                spec.to_json(),
                executor.name,
                str(log_path),
                utcnow(),
                spec.retries,
                spec.timeout,
                request.cpu,
                request.memory,
                request.gpu,
            ),
        )
        run_id = create_run(
            conn,
            spec.experiment,
            run_name or spec.kind,
            {k: v for k, v in spec.params.items() if k != "sql"},
            job_id,
            inputs or [],
            execution_type=EXECUTION_TYPES[spec.kind],
            parent_run_id=parent_run_id,
        )
        if tags:
            set_tags(conn, run_id, tags)
        if record is not None:
            record(conn, job_id, run_id)
    ensure_agent(app)
    return {**get_job(app, job_id), "run_id": run_id}


def _job_row(app: Appliance, job_id: str) -> dict[str, Any] | None:
    return app.db.one(
        "SELECT j.*, r.id AS run_id FROM jobs j LEFT JOIN runs r ON r.job_id = j.id WHERE j.id = ?",
        (job_id,),
    )


def seconds_since(timestamp: str | None) -> float:
    if not timestamp:
        return 0.0
    return time.time() - parse_utc(timestamp)


def supervisor_gone(app: Appliance, job: dict[str, Any]) -> bool:
    """True when a running job has no supervisor left to report its end."""
    if job["state"] != "running":
        return False
    if not job.get("pid"):
        return seconds_since(job.get("started_at")) > CLAIM_GRACE
    return not get_executor(job["executor"]).is_alive(job)


def reconcile_job(app: Appliance, job: dict[str, Any]) -> dict[str, Any]:
    """Settle a running job whose supervisor vanished (OOM kill, reboot, kill -9): kill what is
    left of its process, then queue it again while retries remain, else fail it."""
    if not supervisor_gone(app, job):
        return job
    get_executor(job["executor"]).orphaned(app, job)
    fail_or_retry(
        app,
        job["id"],
        None,
        SUPERVISOR_GONE,
        expect_pid=job.get("pid"),
    )
    return _job_row(app, job["id"]) or job


def get_job(app: Appliance, job_id: str) -> dict[str, Any]:
    job = _job_row(app, job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    job = reconcile_job(app, job)
    job.pop("spec_json", None)
    return job


def list_jobs(app: Appliance) -> list[dict[str, Any]]:
    rows = app.db.rows(
        "SELECT j.id, j.kind, j.state, j.pid, j.pid_identity, j.child_pid, j.child_identity, "
        "j.executor, j.progress_current, "
        "j.progress_total, j.progress_message, j.submitted_at, j.started_at, j.finished_at, "
        "j.exit_code, j.error, j.attempt, j.retries, r.id AS run_id, r.name AS run_name "
        "FROM jobs j LEFT JOIN runs r ON r.job_id = j.id ORDER BY j.submitted_at DESC"
    )
    if any(r["state"] == "queued" for r in rows):
        from appliance.core.agent import ensure_agent

        ensure_agent(app)
    out = []
    for row in rows:
        if row["state"] == "running":
            row = {**row, **reconcile_job(app, row)}
        total = row.get("progress_total")
        fraction = (row["progress_current"] or 0) / total if total else None
        row["progress"] = f"{100 * fraction:.0f}%" if fraction is not None else ""
        row["fraction"] = fraction
        out.append(row)
    return out


def poll_job(app: Appliance, job_id: str) -> dict[str, Any]:
    """`get_job` for whoever waits on a job: a queued job with no agent (it was killed, or
    exited idle at the wrong moment) gets one, so no wait can hang on an empty scheduler."""
    job = get_job(app, job_id)
    if job["state"] == "queued":
        from appliance.core.agent import ensure_agent

        ensure_agent(app)
    return job


def wait_job(app: Appliance, job_id: str, timeout: float | None = None) -> dict[str, Any]:
    """Block until the job reaches a final state (or the timeout passes)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = poll_job(app, job_id)
        if job["state"] in FINAL_STATES:
            return job
        if deadline is not None and time.monotonic() > deadline:
            return job
        time.sleep(0.02)


def request_cancel(app: Appliance, job_id: str) -> None:
    """Cancel without waiting for the end (a tuning driver stopping trials): the request is
    stored and the supervisor signalled; it records `cancelled` itself."""
    job = get_job(app, job_id)
    if job["state"] in FINAL_STATES:
        return
    with app.db.transaction() as conn:
        conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        state, pid = conn.execute("SELECT state, pid FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if state == "queued" or (state == "running" and pid is None):
            _finish_in(conn, job_id, "cancelled", None, "cancelled before it started")
            return
    get_executor(job["executor"]).cancel(job)


def cancel_job(app: Appliance, job_id: str) -> dict[str, Any]:
    """Stop a queued or running job and its whole process tree; it ends 'cancelled'.

    The request is stored first, so a retry, a claim or a supervisor registering at this
    moment honours it instead of racing the signal."""
    job = get_job(app, job_id)
    if job["state"] in FINAL_STATES:
        raise Conflict(f"job {job_id} already {job['state']}; nothing to cancel")
    with app.db.transaction() as conn:
        conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        # Queued, or claimed with no supervisor registered yet: nothing runs, and the request
        # stops a claim or a registration from now on; end it here.
        state, pid = conn.execute("SELECT state, pid FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if state == "queued" or (state == "running" and pid is None):
            _finish_in(conn, job_id, "cancelled", None, "cancelled before it started")
    job = get_job(app, job_id)
    if job["state"] in FINAL_STATES:
        return job
    get_executor(job["executor"]).cancel(job)  # the supervisor kills the tree, records the end
    job = wait_job(app, job_id, timeout=KILL_GRACE + 0.8)
    if job["state"] not in FINAL_STATES:  # a supervisor that does not answer: do it from here
        if get_executor(job["executor"]).is_alive(job):
            signal_ours(job.get("pid"), signal.SIGKILL)  # first: it must not see a failure
        get_executor(job["executor"]).orphaned(app, job)
        _finish(app, job_id, "cancelled", None, "cancelled (the supervisor did not answer)")
    return get_job(app, job_id)


def job_log(app: Appliance, job_id: str) -> str:
    job = get_job(app, job_id)
    path = Path(job["log_path"])
    return path.read_text(errors="replace") if path.exists() else ""


def log_tail(app: Appliance, job_id: str, max_bytes: int = 16_384) -> str:
    """The end of a job's log (the TUI's following view reads this every refresh)."""
    job = _job_row(app, job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    path = Path(job["log_path"])
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return text if size <= max_bytes else text.split("\n", 1)[-1]


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
        if poll_job(app, job_id)["state"] in FINAL_STATES:
            if path.exists() and path.stat().st_size > offset:
                continue
            return
        time.sleep(poll)


_RUN_STATUS = {
    "succeeded": "finished",
    "failed": "failed",
    "cancelled": "cancelled",
    "timed_out": "timed_out",
}
_EXEC_STATE = {
    "succeeded": "COMPLETE",
    "failed": "FAILED",
    "cancelled": "CANCELED",
    "timed_out": "FAILED",
}


def _finish(
    app: Appliance,
    job_id: str,
    state: str,
    exit_code: int | None,
    error: str | None,
    only: tuple[str, ...] = ACTIVE_STATES,
) -> bool:
    """Move a job (and its run) to a final state, unless it already left `only`; the agent
    is nudged, so what waited for this job (capacity, a pipeline's next step) goes on now."""
    with app.db.transaction() as conn:
        done = _finish_in(conn, job_id, state, exit_code, error, only)
    if done:
        from appliance.core.agent import wake_agent

        wake_agent(app)
    return done


def _finish_in(
    conn: sqlite3.Connection,
    job_id: str,
    state: str,
    exit_code: int | None,
    error: str | None,
    only: tuple[str, ...] = ACTIVE_STATES,
) -> bool:
    now = utcnow()
    marks = ", ".join("?" for _ in only)
    cur = conn.execute(
        "UPDATE jobs SET state = ?, exit_code = ?, error = ?, finished_at = ? "
        f"WHERE id = ? AND state IN ({marks})",
        (state, exit_code, error, now, job_id, *only),
    )
    if cur.rowcount == 0:
        return False
    run = conn.execute("SELECT id FROM runs WHERE job_id = ?", (job_id,)).fetchone()
    if run is not None:
        conn.execute(
            "UPDATE runs SET status = ?, finished_at = ? WHERE id = ?",
            (_RUN_STATUS[state], now, run[0]),
        )
        set_execution_state(conn, f"run:{run[0]}", _EXEC_STATE[state])
    return True


_ANY_PID = object()


def fail_or_retry(
    app: Appliance,
    job_id: str,
    exit_code: int | None,
    error: str,
    expect_pid: int | None | object = _ANY_PID,
) -> str:
    """A failed attempt: queue the job again while retries remain, else end it 'failed'.

    `expect_pid` guards reconciliation: only the observer that saw this supervisor vanish
    settles it, so an agent and a CLI looking at once cannot both act.
    """
    with app.db.transaction() as conn:
        row = conn.execute(
            "SELECT state, attempt, retries, pid, cancel_requested FROM jobs WHERE id = ?",
            (job_id,),
        ).fetchone()
        if row is None or row["state"] != "running":
            return row["state"] if row else "failed"
        if expect_pid is not _ANY_PID and row["pid"] != expect_pid:
            return "running"  # someone else's observation: the supervisor registered since
        if row["cancel_requested"]:
            _finish_in(conn, job_id, "cancelled", exit_code, "cancelled by request", ("running",))
            return "cancelled"
        if row["attempt"] <= row["retries"]:
            conn.execute(
                "UPDATE jobs SET state = 'queued', attempt = attempt + 1, pid = NULL, "
                "pid_identity = NULL, child_pid = NULL, child_identity = NULL, gpu_ids = NULL, "
                "started_at = NULL, exit_code = ?, error = ?, "
                "progress_current = NULL, progress_total = NULL WHERE id = ?",
                (exit_code, f"attempt {row['attempt']} failed: {error}", job_id),
            )
            conn.execute("UPDATE runs SET status = 'queued' WHERE job_id = ?", (job_id,))
            retry = True
        else:
            retry = False
    if retry:
        _append_log(
            app,
            job_id,
            f"[appliance] attempt {row['attempt']} of {row['retries'] + 1} failed ({error}); "
            "queued again",
        )
        from appliance.core.agent import ensure_agent

        ensure_agent(app)
        return "queued"
    _finish(app, job_id, "failed", exit_code, error, only=("running",))
    return "failed"


def _append_log(app: Appliance, job_id: str, line: str) -> None:
    path = app.settings.logs_dir / "jobs" / f"{job_id}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def claim_job(app: Appliance, job_id: str, gpu_ids: str | None = None) -> bool:
    """The agent takes a queued job: it counts against capacity from this moment.
    `gpu_ids`: the GPUs it may use (CUDA_VISIBLE_DEVICES); None leaves that unset."""
    with app.db.transaction() as conn:
        cur = conn.execute(
            "UPDATE jobs SET state = 'running', pid = NULL, pid_identity = NULL, "
            "child_pid = NULL, child_identity = NULL, gpu_ids = ?, started_at = ?, "
            "error = CASE WHEN attempt > 1 THEN error END "
            "WHERE id = ? AND state = 'queued' AND cancel_requested = 0",
            (gpu_ids, utcnow(), job_id),
        )
        if cur.rowcount == 0:
            return False
        conn.execute("UPDATE runs SET status = 'running' WHERE job_id = ?", (job_id,))
        run = conn.execute("SELECT id FROM runs WHERE job_id = ?", (job_id,)).fetchone()
        if run is not None:
            set_execution_state(conn, f"run:{run[0]}", "RUNNING")
    return True


def _either(event: dict[str, Any], name: str, alias: str) -> Any:
    """A field under its protocol name or its alias ("name"/"key", "done"/"current")."""
    if name in event:
        return event[name]
    return event[alias]  # KeyError: reported as a malformed event


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
        self.lock = threading.RLock()  # the stdout pump and the periodic flush share the batch
        self.metrics: list[MetricRow] = []
        self.progress: tuple[float, float | None, str | None] | None = None
        self.last_flush = time.monotonic()
        self.error: str | None = None  # the first thing that could not be kept
        self.non_finite: set[str] = set()  # metrics already tagged as having had a NaN/inf

    def note_error(self, message: str) -> None:
        if self.error is None:
            self.error = message

    def write_log(self, text: str) -> None:
        with self.log_lock:
            try:
                self.log.write(text if text.endswith("\n") else text + "\n")
                self.log.flush()
            except OSError as exc:  # disk full: keep the job's pipes draining, fail it at the end
                self.note_error(f"could not write the job log: {exc.strerror or exc}")

    def handle(self, line: str) -> None:
        stripped = line.strip()
        event = None
        if stripped.startswith("{"):
            try:
                event = json.loads(stripped)
            except (json.JSONDecodeError, RecursionError):
                event = None
        if isinstance(event, dict) and isinstance(event.get("type"), str):
            try:
                with self.lock:
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
            name = str(_either(event, "name", "key"))
            value = float(event["value"])
            step = int(event.get("step", 0))
            timestamp = float(event.get("timestamp", time.time()))
            if not math.isfinite(value) and name not in self.non_finite:
                # kept as a tag: the store holds numbers, but a tuner (or a person) must
                # see that the metric went NaN rather than that it was never reported
                self.non_finite.add(name)
                with self.app.db.transaction() as conn:
                    set_tags(
                        conn, self.run_id, {f"{NON_FINITE_TAG}{name}": f"{value} at step {step}"}
                    )
            if not math.isfinite(value) or not math.isfinite(timestamp):
                raise ValueError(f"metric {name!r}: value must be a finite number")
            if not 0 <= step < 2**63:
                raise ValueError(f"metric {name!r}: step must be a non-negative integer")
            self.metrics.append((name, value, step, timestamp))
        elif kind == "progress":
            total = event.get("total")
            self.progress = (
                float(_either(event, "done", "current")),
                float(total) if total is not None else None,
                event.get("message"),
            )
        elif kind in ("param", "tag"):
            with self.app.db.transaction() as conn:
                setter = set_params if kind == "param" else set_tags
                setter(conn, self.run_id, {str(_either(event, "name", "key")): event["value"]})
        elif kind == "artifact":
            self._record_artifact(event)
        elif kind == "input":
            self._record_input(str(event["ref"]))
        elif kind == "status":
            if self.progress is not None:  # an older progress message must not overwrite it
                self.progress = (self.progress[0], self.progress[1], None)
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
        with self.lock:
            metrics, self.metrics = self.metrics, []
            progress, self.progress = self.progress, None
            self.last_flush = time.monotonic()
            try:
                log_metrics(self.app, self.run_id, metrics)
            except sqlite3.Error as exc:  # a bad batch must not take the supervisor down
                self.write_log(f"[appliance] could not record {len(metrics)} metric rows: {exc}")
                self.note_error(f"could not record {len(metrics)} metric rows: {exc}")
            if progress is None:
                return
            current, total, message = progress
            try:
                self.app.db.execute(
                    "UPDATE jobs SET progress_current = ?, progress_total = ?, "
                    "progress_message = coalesce(?, progress_message) WHERE id = ?",
                    (current, total, message, self.job_id),
                )
            except sqlite3.Error as exc:
                self.write_log(f"[appliance] could not record progress: {exc}")


WARM_ENV = "APPLIANCE_WARM_JOBS"  # "0": no preloading in the agent, every job body exec'd


def warm_jobs_enabled() -> bool:
    return os.environ.get(WARM_ENV, "1") != "0"


class ForkedBody:
    """A built-in job body forked from its supervisor instead of exec'd: the agent imported
    the heavy libraries (numpy, LightGBM) once, so a job skips the interpreter start and
    about 0.6 s of imports. It runs the same `runner run` code with the same environment,
    stdout protocol and process group as `python -m appliance.runner run` would."""

    def __init__(self, env: dict[str, str], cwd: str | Path) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_forked_body(env, cwd, out_w, err_w)  # never returns
        os.close(out_w)
        os.close(err_w)
        self.pid = pid
        self.returncode: int | None = None
        self.stdout = open(out_r, encoding="utf-8", errors="replace")  # noqa: SIM115
        self.stderr = open(err_r, encoding="utf-8", errors="replace")  # noqa: SIM115

    def wait(self) -> int:
        if self.returncode is None:
            while True:
                try:
                    _, status = os.waitpid(self.pid, 0)
                    break
                except InterruptedError:
                    continue
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _run_forked_body(env: dict[str, str], cwd: str | Path, out_w: int, err_w: int) -> None:
    code: Any = 1
    try:
        os.setsid()  # its own process group: what cancel and timeout kill
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 65536)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
        code = run_body()
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


CODE_KEY = "code"  # spec.inputs: the job's own files, shipped through the object store


def fetch_code(spec: JobSpec) -> None:
    """In a pod: the job's own files (its working directory's code), which the k3s executor
    put in the object store as one tar, fetched by sha256 (verified on read) and unpacked
    into a fresh working directory that becomes the current one. Only plain files and
    directories inside it are unpacked."""
    code = spec.inputs.get(CODE_KEY)
    if not code:
        return
    import tarfile
    from pathlib import PurePosixPath

    from appliance.config import load_settings
    from appliance.store.objects import open_object_store

    store = open_object_store(load_settings(os.environ.get("APPLIANCE_HOME")))
    work = Path.cwd() / "job"
    work.mkdir(exist_ok=True)
    with tarfile.open(store.get_file(code["tar"])) as tar:
        for member in tar:
            rel = PurePosixPath(member.name)
            if rel.is_absolute() or ".." in rel.parts or not (member.isfile() or member.isdir()):
                raise InvalidInput(f"inputs.code: {member.name!r} is not a file of the job")
            dest = work / rel
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            with source, dest.open("wb") as out:
                shutil.copyfileobj(source, out)
            dest.chmod(member.mode & 0o755)
    os.chdir(work)


def exec_command(argv: list[str]) -> int:
    """A command job in a pod: its files fetched, then the command itself (exec: its exit
    code and its stdout are the job's)."""
    spec = JobSpec.from_json(os.environ[SPEC_ENV])
    try:
        fetch_code(spec)
    except ApplianceError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"could not start {argv[0]}: {exc}", file=sys.stderr)
    return 127


def run_body() -> int:
    """A built-in job's body (the spec is in APPLIANCE_JOB_SPEC); its exit code.

    Bodies print protocol lines and never open SQLite, so they run unchanged in a pod."""
    spec = JobSpec.from_json(os.environ[SPEC_ENV])
    try:
        fetch_code(spec)
        if spec.kind == "train-lightgbm":
            from appliance.core.training import train_lightgbm

            train_lightgbm(spec, emit)
        elif spec.kind == "train-mlp":
            from appliance.core.training import train_mlp

            train_mlp(spec, emit)
        elif spec.kind == "recipe":
            from appliance.core.recipes import recipe_job

            recipe_job(spec, emit)
        elif spec.kind == "evaluate":
            from appliance.core.promotion import evaluate_job

            evaluate_job(spec, emit)
        elif spec.kind == "tune-function":
            from appliance.core.studies import function_trial_job

            function_trial_job(spec, emit)
        elif spec.kind == "pipeline-step":
            from appliance.core.pipeline_steps import step_job

            step_job(spec, emit)
        else:
            print(f"no built-in job body for kind {spec.kind!r}", file=sys.stderr)
            return 2
    except ApplianceError as exc:  # a user-facing reason, not a traceback, as the error
        print(exc.message.replace("\n", " | "), file=sys.stderr)
        return 1
    return 0


def _fork_safe() -> bool:
    """Whether this process may fork a child that goes on in Python: only with no other
    thread, whose locks, imports and SQLite connections a child would copy half-done (the
    agent while no shipping or monitor pass runs; a supervisor until its pumps start)."""
    return threading.active_count() == 1


def _job_command(spec: JobSpec) -> list[str]:
    if spec.kind == "command":
        return list(spec.command)
    return [sys.executable, "-m", "appliance.runner", "run"]


def supervise(app: Appliance, job_id: str, grace: float = KILL_GRACE) -> str:
    """Run one attempt of a job: start its process in a process group of its own, record its
    lines, enforce its timeout, and set its end state (or queue it again to retry)."""
    stop_reason: list[str] = []
    started: list[Any] = []
    stop_lock = threading.RLock()  # re-entrant: the signal handler may run inside it

    def stop(reason: str) -> None:
        with stop_lock:
            if stop_reason:
                return
            stop_reason.append(reason)
            for child in started:
                threading.Thread(target=_halt, args=(child, grace), daemon=True).start()

    # Listening before the pid is registered: a cancel can never find a deaf supervisor.
    signal.signal(signal.SIGTERM, lambda signum, frame: stop("cancelled"))
    signal.signal(signal.SIGINT, lambda signum, frame: stop("cancelled"))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})  # see _spawn
    if _STOP_REQUESTED.is_set():
        stop("cancelled")

    row = _job_row(app, job_id)
    if row is None:
        raise NotFound(f"job {job_id!r} not found")
    if row["state"] == "queued" and not claim_job(app, job_id):  # run by hand, not the agent
        return str(get_job(app, job_id)["state"])
    spec = JobSpec.from_json(row["spec_json"])
    run_id = row["run_id"]
    me = os.getpid()
    with app.db.transaction() as conn:
        cur = conn.execute(
            "UPDATE jobs SET pid = ?, pid_identity = ? WHERE id = ? AND state = 'running' "
            "AND (pid IS NULL OR pid = ?) AND cancel_requested = 0",
            (me, identity(me), job_id, me),
        )
    if cur.rowcount == 0:  # cancelled between the claim and now
        _finish(app, job_id, "cancelled", None, "cancelled before it started", ("running",))
        return str(get_job(app, job_id)["state"])
    if stop_reason:
        _finish(app, job_id, "cancelled", None, "cancelled before it started")
        return "cancelled"

    log_path = Path(row["log_path"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **spec.env,
        SPEC_ENV: spec.to_json(),
        "APPLIANCE_JOB_ID": job_id,
        "APPLIANCE_RUN_ID": run_id,
        "APPLIANCE_HOME": str(app.settings.home),
        "APPLIANCE_ATTEMPT": str(row["attempt"]),
        "PYTHONUNBUFFERED": "1",
    }
    if row.get("gpu_ids") is not None:  # the agent's assignment: only these GPUs are its
        env["CUDA_VISIBLE_DEVICES"] = row["gpu_ids"]
    log, log_error = _open_log(log_path)
    recorder = LineRecorder(app, job_id, run_id, log)
    if log_error:
        recorder.note_error(log_error)
    if row["attempt"] > 1:
        recorder.write_log(f"[appliance] attempt {row['attempt']} of {row['retries'] + 1}")
    executor = get_executor(row["executor"])
    try:
        child: Any = executor.child(app, job_id, spec)
        if child is not None:
            pass  # run elsewhere (a pod): the executor started it
        elif spec.kind != "command" and warm_jobs_enabled() and _fork_safe():
            app.close()  # no SQLite state may cross a fork; reopened on next use
            child = ForkedBody(env, spec.workdir or app.settings.home)
        else:
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
                start_new_session=True,  # its group is what cancel and timeout kill
            )
    except (OSError, ValueError) as exc:  # ValueError: e.g. a NUL byte in an argument
        _close_log(log)
        return fail_or_retry(app, job_id, None, f"could not start {spec.command[:1]}: {exc}")
    except ApplianceError as exc:  # the cluster refused the Job, or is unreachable
        _close_log(log)
        return fail_or_retry(app, job_id, None, f"could not start: {exc.message}")
    if child.pid is not None:
        app.db.execute(
            "UPDATE jobs SET child_pid = ?, child_identity = ? WHERE id = ?",
            (child.pid, identity(child.pid), job_id),
        )
    with stop_lock:
        started.append(child)
        if stop_reason:
            threading.Thread(target=_halt, args=(child, grace), daemon=True).start()
    timer = None
    # A pod keeps its own deadline (activeDeadlineSeconds): its child has none here.
    limit = getattr(child, "deadline", spec.timeout)
    if limit:
        timer = threading.Timer(limit, stop, args=("timed_out",))
        timer.daemon = True
        timer.start()
    stderr_tail: deque[str] = deque(maxlen=20)

    def pump_stdout() -> None:
        for line in child.stdout:
            try:
                recorder.handle(line)
            except Exception as exc:  # keep draining: a stalled pipe would hang the job
                recorder.note_error(f"could not record a line: {exc}")

    def pump_stderr() -> None:
        for line in child.stderr:
            stderr_tail.append(line.rstrip("\n"))
            recorder.write_log(line)

    finished = threading.Event()

    def flush_periodically() -> None:  # a quiet job's last metrics must not wait for its next line
        while not finished.wait(LineRecorder.FLUSH_SECONDS):
            recorder.flush()

    threads = [
        threading.Thread(target=f, daemon=True)
        for f in (pump_stdout, pump_stderr, flush_periodically)
    ]
    for thread in threads:
        thread.start()
    exit_code = child.wait()
    if timer is not None:
        timer.cancel()
    pumps = threads[:2]
    for pump in pumps:
        pump.join(timeout=2)
    if any(p.is_alive() for p in pumps):  # something the job left behind holds its pipes
        _halt(child, 0.2)
        for pump in pumps:
            pump.join(timeout=2)
    finished.set()
    threads[2].join(timeout=5)
    recorder.flush()
    _close_log(log)

    if not stop_reason and getattr(child, "timed_out", False):  # a pod past its deadline
        stop_reason.append("timed_out")
    if stop_reason and stop_reason[0] == "cancelled":
        _finish(app, job_id, "cancelled", exit_code, "cancelled by request")
        return "cancelled"
    if stop_reason:
        _finish(app, job_id, "timed_out", exit_code, f"timed out after {spec.timeout:g} s")
        return "timed_out"
    # The job's own outcome decides its state (a retry would meet the same full disk); what
    # could not be kept of its output is said next to it.
    warning = f"; warning: {recorder.error}" if recorder.error else ""
    if exit_code == 0:
        _finish(app, job_id, "succeeded", 0, f"warning: {recorder.error}" if warning else None)
        return "succeeded"
    if getattr(child, "retried_by_cluster", False):  # Kubernetes ran the retries (backoffLimit)
        reason = getattr(child, "reason", "") or "failed"
        _finish(app, job_id, "failed", exit_code, f"{reason}{warning}")
        return "failed"
    last = [ln for ln in stderr_tail if ln.strip()]
    reason = last[-1] if last else "no error output"
    return fail_or_retry(app, job_id, exit_code, f"exit code {exit_code}: {reason}{warning}")


def _halt(child: Any, grace: float) -> None:
    """Stop a job: its process tree here, or what its executor runs elsewhere (a pod)."""
    if child.pid is None:
        child.halt()
    else:
        kill_tree(child.pid, grace)


def _open_log(path: Path) -> tuple[TextIO, str | None]:
    try:
        return path.open("a", encoding="utf-8"), None
    except OSError as exc:
        sink = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
        return sink, f"could not open the job log {path.name}: {exc.strerror or exc}"


def _close_log(log: TextIO) -> None:
    with contextlib.suppress(OSError):
        log.close()


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
    timeout: float | str | None = None,
    retries: int = 0,
    resources: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    **submit: Any,
) -> dict[str, Any]:
    """Run a user's Python file as a tracked job (it may use `appliance.sdk`); `submit`
    passes on to `submit_job` (a pipeline step's own row and tags)."""
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
        timeout=timeout,  # type: ignore[arg-type]  # validate() turns '30m' into seconds
        retries=retries,
        env=dict(env or {}),
        **({"resources": resources} if resources is not None else {}),
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
        tags={**tags, **submit.pop("tags", {})},
        **submit,
    )


SPEC_KEYS = {
    "env",
    "kind",
    "entry",
    "command",
    "workdir",
    "inputs",
    "params",
    "resources",
    "timeout",
    "retries",
    "experiment",
    "name",
}
TRAIN_SPEC_KEYS = {
    "kind",
    "resources",
    "timeout",
    "retries",
    "experiment",
    "name",
    "trainer",
    "env",
}


def load_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML (or JSON) file holding one mapping; errors name the option and the file."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise InvalidInput(f"{what} {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{path}: invalid YAML/JSON: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise InvalidInput(f"{path}: expected a mapping of keys")
    return data


def load_job_spec(path: str | Path) -> dict[str, Any]:
    """Read a job spec file (YAML or JSON)."""
    return load_yaml_mapping(path, "spec")


def submit_spec(app: Appliance, data: dict[str, Any], source: str = "spec") -> dict[str, Any]:
    """`appliance jobs submit FILE`: kind 'command' (entry: a command line or a Python file)
    or 'train' (the keys of `appliance train --config`), plus resources, timeout, retries,
    experiment and name."""
    import shlex

    kind = data.get("kind")
    if kind == "train":
        from appliance.core.training import check_train_config, submit_train_config

        config = check_train_config(data, source, extra=TRAIN_SPEC_KEYS)
        if "resources" in config:  # a spec's cpu request is the trainer's thread count
            resources = config["resources"]
            request = JobSpec("train-lightgbm", resources=resources).request()
            if "cpu" in resources:
                if request.cpu != int(request.cpu):
                    raise InvalidInput(f"{source}: resources.cpu: a training job takes whole cores")
                config = {**config, "cpus": int(request.cpu)}
            if "memory" in resources:
                config["memory"] = resources["memory"]
            if "gpu" in resources:
                config["gpu"] = request.gpu
        config.pop("resources", None)
        return submit_train_config(app, config)
    if kind != "command":
        raise InvalidInput(f"{source}: kind {kind!r}: expected 'command' or 'train'")
    unknown = sorted(set(data) - SPEC_KEYS)
    if unknown:
        raise InvalidInput(f"{source}: unknown key {unknown[0]!r}; known: {sorted(SPEC_KEYS)}")
    entry = data.get("entry", data.get("command"))
    if isinstance(entry, str):
        entry = shlex.split(entry)
    if not isinstance(entry, list) or not entry or not all(isinstance(e, str) for e in entry):
        raise InvalidInput(f"{source}: entry: a command line or a list of strings is required")
    inputs = data.get("inputs") or []
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise InvalidInput(f"{source}: inputs: a list of dataset refs (NAME@V) is expected")
    for key in ("params", "resources"):
        if key in data and not isinstance(data[key], dict):
            raise InvalidInput(f"{source}: {key}: a mapping is expected")
    common = {
        "timeout": data.get("timeout"),
        "retries": data.get("retries", 0),
        "resources": data.get("resources"),
        "env": data.get("env") or {},
    }
    if entry[0].endswith(".py"):  # a Python file: tracked like `appliance run`
        script = Path(entry[0])
        if data.get("workdir") and not script.is_absolute():
            script = Path(data["workdir"]) / script
        return submit_script(
            app,
            script,
            entry[1:],
            experiment=data.get("experiment", "default"),
            name=data.get("name"),
            inputs=inputs,
            **common,
        )
    from appliance.core.datasets import get_dataset_version

    declared = {}
    for ref in inputs:
        version = get_dataset_version(app, ref)
        declared[ref] = {"ref": version["ref"], "sha256": version["sha256"]}
    spec = JobSpec(
        kind="command",
        command=entry,
        inputs={"datasets": declared},
        params=data.get("params") or {},
        workdir=data.get("workdir"),
        timeout=common["timeout"],
        retries=common["retries"],
        env=common["env"],
        experiment=data.get("experiment", "default"),
        **({"resources": common["resources"]} if common["resources"] is not None else {}),
    )
    return submit_job(
        app,
        spec,
        run_name=data.get("name") or Path(entry[0]).name,
        inputs=[("DatasetVersion", f"dataset:{v['ref']}") for v in declared.values()],
    )
