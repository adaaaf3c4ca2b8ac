"""The agent: one long-lived scheduler per home that starts queued jobs as capacity allows.

The CLI and TUI only queue jobs; `ensure_agent` starts an agent in the background when none
answers, and a systemd unit can keep one running instead. One agent per home is guaranteed by
an exclusive lock on `agent.lock` (which holds its pid); a datagram socket `agent.sock` wakes it
when a job is queued, so a job starts within milliseconds without busy polling.

Each job runs under its own supervisor process (see `LocalExecutor`), so jobs outlive the agent:
stopping, restarting or kill -9 of the agent never stops a job. When an agent starts it
reconciles: a `running` job whose supervisor is gone is queued again while retries remain,
else failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Any, cast

from appliance.core.context import Appliance
from appliance.core.jobs import (
    ACTIVE_STATES,
    Request,
    claim_job,
    fail_or_retry,
    get_executor,
    parse_duration,
    reconcile_job,
    seconds_since,
    warm_jobs_enabled,
)
from appliance.core.processes import alive, identity
from appliance.errors import ApplianceError, Conflict, InvalidInput
from appliance.store.db import utcnow

IDLE_EXIT_ENV = "APPLIANCE_AGENT_IDLE_EXIT"
DEFAULT_IDLE_EXIT = 600.0  # an agent started on demand goes away after 10 idle minutes
POLL_SECONDS = 1.0
RECONCILE_SECONDS = 2.0
RESERVE_AFTER = 30.0  # a queued job that waited this long is not overtaken any more
REPROBE_SECONDS = 60.0
CLUSTER_REPROBE_SECONDS = 10.0  # nodes join and leave more often than RAM changes
# How often the agent ships prediction logs and checks monitors, and a k3s pod posts its
# logs: read when each starts, not at import (a test's setting must not outlive it).
SHIP_ENV = "APPLIANCE_SHIP_SECONDS"


def ship_seconds() -> float:
    """The interval in seconds; "inf": an agent that never ships or checks monitors on its
    own (tests that do both themselves), and a pod that posts hourly."""
    raw = os.environ.get(SHIP_ENV, "5")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise InvalidInput(f"{SHIP_ENV}={raw!r}: expected seconds, more than 0")
    return seconds


# A restarted deployment that stays up this long starts its backoff afresh, as Kubernetes
# does: a crash next week is not held back by this week's.
RESTARTS_FORGOTTEN = 600.0
WATCH_NICE = 10  # monitors: below serving, still prompt on a busy machine
SHIP_NICE = 19  # shipping prediction logs: whatever serving leaves


@dataclass(frozen=True)
class Capacity:
    """What the machine offers to jobs at once."""

    cpu: float
    memory: int
    gpu: int

    def check_fits(self, request: Request) -> None:
        """Refuse, at submit, a job that could never start here (it would queue forever)."""
        for key, asked, have, unit in (
            ("cpu", request.cpu, self.cpu, "cores"),
            ("memory", request.memory, self.memory, "bytes"),
            ("gpu", request.gpu, self.gpu, "GPUs"),
        ):
            if asked > have:
                raise InvalidInput(
                    f"resources.{key}: {asked:g} requested but this machine has {have:g} {unit}"
                )

    def as_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "memory": self.memory, "gpu": self.gpu}


def _cgroup_cpu_limit() -> float | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _memory_total() -> int:
    total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except OSError:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    except (OSError, ValueError):
        pass
    return total


def count_gpus() -> int:
    """NVIDIA GPUs visible to jobs (`nvidia-smi -L`), honouring CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    found = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    if visible is not None:
        found = min(found, len([v for v in visible.split(",") if v.strip()]))
    return found


@cache
def machine_capacity() -> Capacity:
    """Cores (affinity and cgroup quota), memory (RAM and cgroup limit) and GPUs."""
    cpu = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    quota = _cgroup_cpu_limit()
    if quota is not None:
        cpu = min(cpu, max(1.0, quota))
    return Capacity(cpu=cpu, memory=_memory_total(), gpu=count_gpus())


# ---- one agent per home -------------------------------------------------------------------


def _lock_path(app: Appliance) -> Path:
    return app.settings.home / "agent.lock"


def _socket_address(app: Appliance) -> str:
    path = str(app.settings.home / "agent.sock")
    if len(path.encode()) < 100:
        return path
    # Too long for a socket path: Linux's abstract namespace, named after the home.
    return "\0appliance-agent-" + hashlib.sha256(path.encode()).hexdigest()[:24]


def wake_agent(app: Appliance) -> bool:
    """Nudge the running agent to look at the queue now; False when no agent answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)  # a busy agent's full queue must never block the caller
        try:
            sock.sendto(b"wake", _socket_address(app))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except BlockingIOError:
            return True  # its queue of wake-ups is full: it is awake already
        except OSError:
            return False
    return True


def agent_status(app: Appliance) -> dict[str, Any]:
    """Whether an agent runs for this home, its pid, and the queue it sees."""
    pid = _locked_by(app)
    warm = False
    if pid is not None:
        with contextlib.suppress(OSError):
            warm = "warm" in _lock_path(app).read_text().split()[1:]
    counts = {f"jobs_{state}": 0 for state in ACTIVE_STATES}
    for row in app.db.rows(
        "SELECT state, count(*) AS n FROM jobs WHERE state IN ('queued', 'running') GROUP BY state"
    ):
        counts[f"jobs_{row['state']}"] = row["n"]
    return {
        "running": pid is not None,
        "pid": pid,
        "warm": warm,
        "home": str(app.settings.home),
        "executor": app.settings.executor,
        "capacity": _capacity_or_error(app),
        **counts,
    }


def _capacity_or_error(app: Appliance) -> dict[str, Any] | str:
    """What jobs may take at once: this machine's, or the cluster's Ready nodes together."""
    try:
        return dict(get_executor(app.settings.executor).capacity(app).as_dict())
    except ApplianceError as exc:
        return f"unknown: {exc.message}"


def _locked_by(app: Appliance) -> int | None:
    """The pid holding the agent lock, or None; probing never takes the lock itself."""
    path = _lock_path(app)
    try:
        words = path.read_text().split()
    except OSError:
        return None
    pid = int(words[0]) if words and words[0].isdigit() else None
    if pid is None or not alive(pid):
        return None
    if not wake_agent(app):
        return None
    return pid


_spawned: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
SPAWN_INTERVAL = 3.0  # at most one start per home per this many seconds, per process
LOCK_HELD_EXIT = 75  # an agent that found another one running (EX_TEMPFAIL): not an error


def ensure_agent(app: Appliance) -> None:
    """Start an agent in the background unless one answers (jobs outlive this process).

    Raises, with the agent's own last words, when the agent this process started just failed:
    a waiter must see why instead of waiting on a queue nobody serves."""
    if wake_agent(app):
        return
    home = str(app.settings.home)
    log = app.settings.logs_dir / "agent.log"
    if home in _spawned:
        proc, when = _spawned[home]
        code = proc.poll()
        age = time.monotonic() - when
        if code is not None and code > 0 and code != LOCK_HELD_EXIT and age < 15:
            del _spawned[home]  # it failed at start (a bad setting): say why, once
            raise ApplianceError(f"the job agent could not start (exit {code}): {_last_line(log)}")
        if code in (None, LOCK_HELD_EXIT) and age < SPAWN_INTERVAL:
            return  # ours is starting up, or another agent holds the home: no crowd
    idle = parse_duration(os.environ.get(IDLE_EXIT_ENV, DEFAULT_IDLE_EXIT), IDLE_EXIT_ENV)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "APPLIANCE_HOME": str(app.settings.home)}
    # The agent serves every later submitter: not this shell's GPU mask.
    env.pop("CUDA_VISIBLE_DEVICES", None)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.runner", "agent", "--idle-exit", str(idle)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
        )
    _spawned[home] = (proc, time.monotonic())


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no agent log"
    return lines[-1] if lines else "no output"


def agent_running(app: Appliance) -> bool:
    """Whether an agent holds this home now (a probe: it never takes the lock)."""
    return _locked_by(app) is not None


def stop_agent(app: Appliance, timeout: float = 5.0) -> dict[str, Any]:
    """Stop the agent (running jobs keep running under their supervisors)."""
    pid = _locked_by(app)
    if pid is None:
        return {"stopped": False, "pid": None}
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.05)
    if alive(pid):
        raise Conflict(f"agent {pid} did not stop within {timeout:g} s")
    return {"stopped": True, "pid": pid}


class Agent:
    """The scheduling loop. `run()` returns when stopped, or after `idle_exit` idle seconds."""

    def __init__(
        self, app: Appliance, idle_exit: float | None = None, capacity: Capacity | None = None
    ) -> None:
        self.app = app
        self.idle_exit = idle_exit
        self.executor = get_executor(app.settings.executor)
        self.capacity = capacity or self._probe()
        self.probe_capacity = capacity is None  # a given capacity (tests) stays as given
        self.restarts: dict[str, tuple[int, float]] = {}  # deployment -> (restarts, not before)
        self.children: set[int] = set()  # supervisors and servers it started, for _reap
        self.probed = time.monotonic()
        self.stopping = False
        self.ship_seconds = ship_seconds()
        self.watched = 0.0
        self.watcher: threading.Thread | None = None
        self.shipper: threading.Thread | None = None
        self.ship_error: str | None = None
        self.ship_errors: dict[str, str] = {}  # deployment: its last shipping error
        self._lock_file: IO[str] | None = None
        self._sock: socket.socket | None = None

    def acquire(self, wait: float | None = 0.5) -> bool:
        """Take the home's agent lock; False if another agent holds it after `wait` seconds
        (None: wait for it, as a service does while an on-demand agent finishes)."""
        path = _lock_path(self.app)
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = path.open("a+")
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    fh.close()
                    return False
                if self.stopping:
                    fh.close()
                    return False
                time.sleep(0.05 if deadline is not None else 0.5)
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock_file = fh
        self._open_socket()
        return True

    def _open_socket(self) -> None:
        address = _socket_address(self.app)
        if not address.startswith("\0"):
            Path(address).unlink(missing_ok=True)  # left by an agent that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(address)
        sock.setblocking(False)
        self._sock = sock

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            address = _socket_address(self.app)
            if not address.startswith("\0"):
                Path(address).unlink(missing_ok=True)
            self._sock = None

    def release(self) -> None:
        self._close_socket()
        if self._lock_file is not None:
            self._lock_file.seek(0)
            self._lock_file.truncate()
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def preload(self) -> None:
        """Import what built-in jobs import (numpy, DuckDB, LightGBM, the job bodies) once,
        here: every supervisor forked from the agent inherits them, so a training job started
        while no shipping or monitor pass runs starts warm. Their native helper threads are
        idle at a fork (the agent runs no queries, no training). Not torch: its CUDA state
        must not cross a fork."""
        if not warm_jobs_enabled():
            return
        started = time.monotonic()
        for module in (
            "numpy",
            "duckdb",
            "lightgbm",
            "appliance.core.training",
            "appliance.core.recipes",
        ):
            try:
                __import__(module)
            except ImportError:
                continue
        if self._lock_file is not None:
            self._lock_file.seek(0)
            self._lock_file.truncate()
            self._lock_file.write(f"{os.getpid()} warm")
            self._lock_file.flush()
        print(
            f"{utcnow()} preloaded job libraries in {time.monotonic() - started:.2f} s",
            file=sys.stderr,
            flush=True,
        )

    def reconcile(self) -> int:
        """Settle running jobs whose supervisor is gone; returns how many were settled."""
        settled = 0
        for job in self.app.db.rows("SELECT * FROM jobs WHERE state = 'running'"):
            if reconcile_job(self.app, job)["state"] != "running":
                settled += 1
        return settled

    def schedule(self) -> list[str]:
        """Start queued jobs, oldest first, while their requests fit in what is free.

        A job that does not fit now lets smaller ones behind it start (backfill), until it
        has waited RESERVE_AFTER seconds: from then on, a later job starts only if it takes
        nothing the reserved job is waiting for, so the reserved job cannot starve.
        """
        running = self.app.db.rows(
            "SELECT cpu, memory_bytes, gpu, gpu_ids FROM jobs WHERE state = 'running'"
        )
        free = {
            "cpu": self.capacity.cpu - sum(r["cpu"] for r in running),
            "memory": self.capacity.memory - sum(r["memory_bytes"] for r in running),
        }
        busy_gpus = {g for r in running for g in (r["gpu_ids"] or "").split(",") if g}
        free_gpus = [g for g in self.gpu_names() if g not in busy_gpus]
        free_gpus = free_gpus[: max(0, self.capacity.gpu - sum(r["gpu"] for r in running))]
        reserved: dict[str, float] = {}  # what the reserved job still needs, per resource
        started = []
        for job in self.app.db.rows(
            "SELECT id, cpu, memory_bytes, gpu, submitted_at, progress_message FROM jobs "
            "WHERE state = 'queued' ORDER BY submitted_at, rowid"
        ):
            need = {"cpu": job["cpu"], "memory": job["memory_bytes"], "gpu": job["gpu"]}
            have = {**free, "gpu": len(free_gpus)}
            try:
                self.capacity.check_fits(Request(job["cpu"], job["memory_bytes"], job["gpu"]))
            except InvalidInput as exc:  # this agent's machine can never run it (yet)
                self._say(job, f"waiting: {exc.message} (seen by the agent)")
                continue
            short = [k for k in need if need[k] > have[k] + (1e-9 if k == "cpu" else 0)]
            if short:
                if not reserved and seconds_since(job["submitted_at"]) > RESERVE_AFTER:
                    reserved = need
                    self._say(job, f"waiting for {', '.join(short)}; nothing may overtake it")
                continue
            if reserved and any(
                need[k] > 0 and have[k] - need[k] < reserved[k] - (1e-9 if k == "cpu" else 0)
                for k in need
            ):
                continue  # it would take what the reserved job waits for
            gpu_ids = None
            # jobs see only the GPUs they were given (maybe none); on k3s the device plugin
            # gives each pod its own
            if self.capacity.gpu > 0 and self.executor.name == "local":
                gpu_ids = ",".join(free_gpus[: job["gpu"]])
            if not claim_job(self.app, job["id"], gpu_ids=gpu_ids):
                continue  # cancelled meanwhile
            try:
                pid = self.executor.start(self.app, job["id"])
            except OSError as exc:
                fail_or_retry(self.app, job["id"], None, f"could not start: {exc}")
                continue
            self.children.add(pid)
            self.app.db.execute(
                "UPDATE jobs SET pid = coalesce(pid, ?), pid_identity = coalesce(pid_identity, ?) "
                "WHERE id = ? AND state = 'running'",
                (pid, identity(pid), job["id"]),
            )
            free["cpu"] -= job["cpu"]
            free["memory"] -= job["memory_bytes"]
            free_gpus = free_gpus[job["gpu"] :]
            started.append(job["id"])
        return started

    def drive_pipelines(self) -> bool:
        """Fire due pipeline triggers and move pipeline runs on (their next steps are queued
        here, then started by `schedule` in the same pass). True while a run is active or a
        trigger exists: an agent with schedules to keep does not go idle."""
        from appliance.core.pipeline_runs import advance_pipelines
        from appliance.core.pipeline_triggers import fire_triggers, has_triggers

        try:
            fire_triggers(self.app)
            active = advance_pipelines(self.app)
        except (sqlite3.Error, OSError):
            raise  # the pass is retried, as for jobs
        except Exception:  # pipelines must never take the agent (and every job) down
            traceback.print_exc()
            active = True
        return active or has_triggers(self.app)

    def watch_deployments(self) -> bool:
        """Every few seconds, each in a thread of its own (a slow object store never holds up
        scheduling): ship the deployments' spooled prediction logs to the object store (a
        failure leaves them spooled, tried again), and evaluate the monitors that are due
        (alerts, and their actions). True while any monitor exists."""
        now = time.monotonic()
        # monitors are checked by this agent: while any exists it does not go idle
        watching = bool(self.app.db.scalar("SELECT count(*) FROM monitors"))
        if now - self.watched < self.ship_seconds:
            return watching
        self.watched = now
        if self.shipper is None or not self.shipper.is_alive():
            self.shipper = threading.Thread(target=self._ship, name="ship", daemon=True)
            self.shipper.start()
        if self.watcher is None or not self.watcher.is_alive():
            self.watcher = threading.Thread(target=self._watch, name="watch", daemon=True)
            self.watcher.start()
        return watching

    def _ship(self) -> None:
        """At the lowest CPU priority (nice 19): serving comes first, and a waking serving
        thread preempts this one. Not SCHED_IDLE: a starved thread could sit for seconds
        inside an SQLite write and hold up every other writer. Readers wait for it at most
        FRESH_WAIT; on a machine saturated for long the spool fills and samples are
        dropped, counted, never requests."""
        from appliance.core.k3s_serving import republish_logging
        from appliance.core.prediction_log import ship_logs

        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread's own nice
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHIP_NICE)
        app = Appliance(self.app.settings)  # its own connection: this is another thread
        try:
            shipped = ship_logs(app, wait=0)  # a deployment someone else ships: next pass
            if shipped["error"] and shipped["error"] != self.ship_error:
                print(f"{utcnow()} prediction logs: {shipped['error']}", file=sys.stderr)
            self.ship_error = shipped["error"]
            # what each deployment's monitors quote; one another shipper held keeps its last
            kept = {d: e for d, e in self.ship_errors.items() if d in shipped["held"]}
            self.ship_errors = {**kept, **shipped["errors"]}
            republish_logging(app)  # what k3s pods read, as the registry holds it
        except Exception:  # shipping must never take the agent down
            traceback.print_exc()
        finally:
            app.close()

    def _watch(self) -> None:
        """Monitors, beside shipping and never shipping themselves: a slow shipping pass (a
        large spool, a store that is down) does not hold up a monitor that should roll
        back; they judge the logs shipped so far, seconds old."""
        from appliance.core.monitors import UNSHIPPED_AFTER, check_monitors

        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread's own nice
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WATCH_NICE)
        app = Appliance(self.app.settings)
        try:
            # the ship thread keeps the logs fresh; its last error says why any wait
            check_monitors(
                app,
                fresh=False,
                ship_errors=self.ship_errors,
                unshipped_after=max(UNSHIPPED_AFTER, 3 * self.ship_seconds),
            )
        except Exception:  # monitoring must never take the agent down
            traceback.print_exc()
        finally:
            app.close()

    def supervise_deployments(self) -> bool:
        """Restart deployment servers that died (crash, reboot), backing off 1 s, 2 s, 4 s...
        up to a minute per deployment; one that then stays up for RESTARTS_FORGOTTEN starts
        afresh at 1 s. True while any deployment is meant to serve."""
        from appliance.core.deployments import crashed_deployments, restart_deployment

        now = time.monotonic()
        crashed = crashed_deployments(self.app)
        down = {dep["name"] for dep in crashed}
        for name, (_, not_before) in list(self.restarts.items()):
            if name not in down and now - not_before > RESTARTS_FORGOTTEN:
                del self.restarts[name]
        for dep in crashed:
            failures, not_before = self.restarts.get(dep["name"], (0, 0.0))
            if now < not_before:
                continue
            try:
                served = restart_deployment(self.app, dep["name"], dep["host"], dep["port"])
                if served is None:  # stopped meanwhile, or someone else brought it back
                    continue
                if served.get("pid"):
                    self.children.add(int(served["pid"]))
                print(f"{utcnow()} restarted deployment {dep['name']}", file=sys.stderr, flush=True)
                self.restarts[dep["name"]] = (failures + 1, now + min(60.0, 2.0**failures))
            except Exception as exc:  # any failure backs off: not a restart every pass
                self.restarts[dep["name"]] = (failures + 1, now + min(60.0, 2.0**failures))
                if not isinstance(exc, ApplianceError):
                    raise  # handled by the pass as before (a database or system error: logged)
                print(
                    f"{utcnow()} deployment {dep['name']} did not restart: {exc.message}",
                    file=sys.stderr,
                    flush=True,
                )
        # k3s deployments are the cluster's to keep up: they keep no agent alive
        return bool(
            self.app.db.scalar(
                "SELECT count(*) FROM deployments WHERE status = 'serving' AND backend = 'local'"
            )
        )

    def _say(self, job: dict[str, Any], message: str) -> None:
        """Why a queued job waits, where `jobs show` and the Jobs screen show it."""
        if job.get("progress_message") != message:
            self.app.db.execute(
                "UPDATE jobs SET progress_message = ? WHERE id = ? AND state = 'queued'",
                (message, job["id"]),
            )

    def reprobe(self) -> None:
        """Look at the machine again (a GPU driver that came up after boot, a new limit), or
        at the cluster (a node that joined or left)."""
        if self.executor.name == "local":
            machine_capacity.cache_clear()
        self.capacity = self._probe()

    def _probe(self) -> Capacity:
        try:
            return cast(Capacity, self.executor.capacity(self.app))
        except ApplianceError as exc:  # the cluster is unreachable: start nothing, look again
            print(f"{utcnow()} capacity unknown: {exc.message}", file=sys.stderr, flush=True)
            return Capacity(0.0, 0, 0)

    def gpu_names(self) -> list[str]:
        """What CUDA_VISIBLE_DEVICES values mean here: the agent's own list, else 0..n-1."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            return [v.strip() for v in visible.split(",") if v.strip()][: self.capacity.gpu]
        return [str(i) for i in range(self.capacity.gpu)]

    def _reap(self) -> None:
        """Reap the supervisors and servers started here once they exit. Only those: a
        thread's subprocess (a monitor's command, kubectl) waits for its own child, and a
        waitpid(-1) here could take that child's exit status first (a failed command then
        reads as exit 0)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped already (by a liveness check), or not ours
                done = pid
            if done:
                self.children.discard(pid)

    def _active(self) -> int:
        return int(
            self.app.db.scalar("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
        )

    def _wait(self, seconds: float) -> None:
        if self._sock is None:
            time.sleep(seconds)
            return
        try:
            ready, _, _ = select.select([self._sock], [], [], seconds)
        except InterruptedError:
            return
        if ready:
            while True:
                try:
                    self._sock.recv(64)
                except (BlockingIOError, OSError):
                    break

    def run(self) -> None:
        """Reconcile, then schedule on every wake-up until stopped or idle."""
        previous = {s: signal.signal(s, self._on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._step(first=True)
            self.preload()
            last_reconcile = idle_since = time.monotonic()
            while not self.stopping:
                now = time.monotonic()
                reconcile = now - last_reconcile >= RECONCILE_SECONDS
                if reconcile:
                    last_reconcile = now
                if self._step(reconcile=reconcile):
                    idle_since = now
                elif self.idle_exit is not None and now - idle_since >= self.idle_exit:
                    # Stop answering first, then look once more: a job queued in between
                    # either sees no agent (and starts one) or is seen here.
                    self._close_socket()
                    if not self._safe_active():
                        break
                    self._open_socket()
                    idle_since = now
                self._wait(POLL_SECONDS)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _step(self, first: bool = False, reconcile: bool = False) -> bool:
        """One pass: reap, reconcile (when due), schedule. True while jobs are queued or running.
        A failing pass (the disk full, the database busy) is logged and retried, never fatal."""
        try:
            self._reap()
            if first or reconcile:
                self.reconcile()
            every = REPROBE_SECONDS if self.executor.name == "local" else CLUSTER_REPROBE_SECONDS
            if self.probe_capacity and time.monotonic() - self.probed > every:
                self.reprobe()
                self.probed = time.monotonic()
            pipelines = self.drive_pipelines()
            self.schedule()
            serving = self.supervise_deployments()
            watching = self.watch_deployments()
            return self._active() > 0 or serving or pipelines or watching
        except (sqlite3.Error, OSError, ApplianceError) as exc:
            print(f"{utcnow()} agent pass failed, retrying: {exc}", file=sys.stderr, flush=True)
            self.app.close()  # a fresh connection next time
            return True

    def _safe_active(self) -> bool:
        try:
            return self._active() > 0
        except sqlite3.Error:
            return True

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True


def _inherit_nothing() -> None:
    """Descriptors the agent itself inherited (a foreground agent under a shell that leaks
    some) stay out of the supervisors it spawns, as forked ones close them: close-on-exec.
    Its own files are close-on-exec already."""
    with contextlib.suppress(OSError):  # no procfs: nothing to list
        for name in os.listdir("/proc/self/fd"):
            if int(name) > 2:
                with contextlib.suppress(OSError):  # the listing's own descriptor, closed
                    os.set_inheritable(int(name), False)


def run_agent(app: Appliance, idle_exit: float | None = None, wait_lock: bool = False) -> int:
    """`appliance agent`: run the scheduler in the foreground (what systemd and on-demand
    starts both run). Returns 1 at once, with a message, if another agent holds this home;
    with `wait_lock` (the service), it waits for that agent to exit instead."""
    _inherit_nothing()
    agent = Agent(app, idle_exit=idle_exit)
    if wait_lock:
        signal.signal(signal.SIGTERM, agent._on_stop)
    if not agent.acquire(wait=None if wait_lock else 0.5):
        if agent.stopping:
            return 0
        holder = (_lock_path(app).read_text().split() or ["?"])[0]
        print(
            f"appliance agent: another agent (pid {holder}) already runs for {app.settings.home}",
            file=sys.stderr,
        )
        return LOCK_HELD_EXIT
    try:
        print(
            f"{utcnow()} agent {os.getpid()} started for {app.settings.home}; "
            f"capacity {agent.capacity.as_dict()}",
            file=sys.stderr,
            flush=True,
        )
        agent.run()
    except ApplianceError as exc:
        print(f"appliance agent: {exc.message}", file=sys.stderr)
        return 1
    finally:
        agent.release()
    print(f"{utcnow()} agent {os.getpid()} stopped", file=sys.stderr, flush=True)
    return 0


def systemd_unit(app: Appliance, user: str | None = None) -> str:
    """A unit file that keeps the agent running for this home across reboots.

    KillMode=process: stopping or restarting the agent must not kill running jobs, which
    live in the same cgroup; the restarted agent adopts or reconciles them.
    """
    exe = Path(sys.executable).parent / "appliance"
    command = (
        f"{exe} agent --wait-lock"
        if exe.exists()
        else f"{sys.executable} -m appliance.runner agent --wait-lock"
    )
    lines = [
        "[Unit]",
        "Description=appliance job agent",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        *([f"User={user}"] if user else []),
        f"Environment=APPLIANCE_HOME={app.settings.home}",
        f"ExecStart={command}",
        "KillMode=process",
        "Restart=on-failure",
        "RestartSec=2",
        "NoNewPrivileges=true",
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if user else 'default.target'}",
    ]
    return "\n".join(lines) + "\n"
