"""A job spec as a Kubernetes Job: the k3s executor's half of "the same spec means the same
thing on both executors".

The Job runs the appliance runtime image with the spec in `APPLIANCE_JOB_SPEC`, exactly as
the local supervisor's child gets it; the job reads and writes the object store (S3
credentials from a Secret, never in the manifest) and reports through stdout, which the
executor will read from the pod's log with the same line parser. Resources become requests
and limits, a GPU request becomes an `nvidia.com/gpu` limit on the `nvidia` RuntimeClass, the
timeout becomes `activeDeadlineSeconds` and retries `backoffLimit`.

The executor keeps the local one's supervisor: the agent starts it, it records what the job
prints and ends the job. Only its child differs: a `KubeJob` applies the Job, follows each
pod's log in turn (every pod is one attempt), and ends with the Job's outcome.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.config import Settings
from appliance.core.agent import Capacity
from appliance.core.context import Appliance
from appliance.core.jobs import CODE_KEY, SPEC_ENV, JobSpec, LocalExecutor, Request
from appliance.core.kube import ClusterUnavailable, Kube
from appliance.core.processes import signal_ours
from appliance.errors import ApplianceError, InvalidInput

NAMESPACE = "appliance"
S3_SECRET = "appliance-s3"  # keys: access_key, secret_key (written by install.sh --server)
JOB_LABEL = "appliance.dev/job-id"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
RUNTIME_IMAGE = "appliance-runtime:0.1.0"  # imported from the bundle: never pulled
UID_LABEL = "batch.kubernetes.io/controller-uid"  # on every pod of one Job object
POLL_SECONDS = 2.0  # APPLIANCE_K3S_POLL and _GIVE_UP override (a fake cluster is quick)
GIVE_UP_AFTER = 120.0  # seconds of kubectl failing in a row before the job is given up
# kubectl --timestamps: RFC 3339 with nanoseconds, in the node's own offset (Z on UTC nodes)
_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")


def _stamp_key(stamp: str) -> tuple[int, int] | None:
    """A log timestamp as (seconds since the epoch, nanoseconds): comparable whatever the
    offset. None: not kubectl's prefix."""
    found = _TIMESTAMP.fullmatch(stamp)
    if found is None:
        return None
    base, fraction, offset = found.groups()
    moment = datetime.fromisoformat(base + ("+00:00" if offset == "Z" else offset))
    return int(moment.timestamp()), int((fraction or "").ljust(9, "0"))


# A pod that waits for one of these will wait forever: the job fails at once, saying why.
STUCK_REASONS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
)


def _quantity_memory(value: int) -> str:
    """Bytes as a Kubernetes quantity, in whole MiB when exact (readable in `kubectl get`)."""
    return f"{value // 2**20}Mi" if value % 2**20 == 0 else str(value)


def pod_resources(request: Request) -> dict[str, dict[str, Any]]:
    """A container's requests and limits, as jobs and model servers both ask: cpu requested;
    memory requested and a hard limit (past it the pod is OOM-killed; locally memory is only
    counted when jobs are placed, but one pod must never overcommit a node); GPUs as
    `nvidia.com/gpu` limits (the pod also needs `runtimeClassName: nvidia`)."""
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": f"{math.ceil(request.cpu * 1000)}m"},
        "limits": {},
    }
    if request.memory:
        memory = _quantity_memory(request.memory)
        resources["requests"]["memory"] = memory
        resources["limits"]["memory"] = memory
    if request.gpu:
        resources["limits"]["nvidia.com/gpu"] = request.gpu
    if not resources["limits"]:
        del resources["limits"]
    return resources


def pod_store_env(settings: Settings, home: str, store: str | None = None) -> list[dict[str, Any]]:
    """What a pod needs to reach the object store: the S3 settings as values, the keys from
    the Secret (never in a manifest), and a home of its own (no metadata database there)."""
    s3 = settings.s3
    return [
        {"name": "APPLIANCE_HOME", "value": home},
        {"name": "APPLIANCE_STORE", "value": store or settings.store},
        {"name": "APPLIANCE_S3_ENDPOINT", "value": s3.endpoint},
        {"name": "APPLIANCE_S3_BUCKET", "value": s3.bucket},
        {"name": "APPLIANCE_S3_SECURE", "value": "true" if s3.secure else "false"},
        {"name": "APPLIANCE_S3_REGION", "value": s3.region},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *(
            {
                "name": f"APPLIANCE_S3_{key.upper()}",
                "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": key}},
            }
            for key in ("access_key", "secret_key")
        ),
    ]


def job_manifest(
    job_id: str,
    spec: JobSpec,
    settings: Settings,
    image: str = RUNTIME_IMAGE,
    run_id: str | None = None,
) -> dict[str, Any]:
    """The Job for one attempt-set of a job spec (Kubernetes retries it `retries` times)."""
    if not _DNS_LABEL.fullmatch(job_id) or len(job_id) > 59:  # "job-" + id: a DNS label
        raise InvalidInput(f"job id {job_id!r}: lowercase letters, digits and '-' (at most 59)")
    spec.validate()
    request = spec.request()
    resources = pod_resources(request)
    env = [
        {"name": SPEC_ENV, "value": spec.to_json()},
        {"name": "APPLIANCE_JOB_ID", "value": job_id},
        *([{"name": "APPLIANCE_RUN_ID", "value": run_id}] if run_id else []),
        *pod_store_env(settings, "/var/lib/appliance"),
        *({"name": k, "value": v} for k, v in sorted(spec.env.items())),
    ]
    command = list(spec.command) if spec.kind == "command" else None
    if command is not None and spec.inputs.get(CODE_KEY):
        command = ["python", "-m", "appliance.runner", "exec", "--", *command]
    container: dict[str, Any] = {
        "name": "job",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "resources": resources,
    }
    if command is not None:
        container["command"] = command
        if spec.workdir:
            container["workingDir"] = spec.workdir
    else:
        container["command"] = ["python", "-m", "appliance.runner", "run"]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
    }
    if request.gpu:
        pod["runtimeClassName"] = "nvidia"
    labels = {JOB_LABEL: job_id, "app.kubernetes.io/managed-by": "appliance"}
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"job-{job_id}", "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "backoffLimit": spec.retries,
            "ttlSecondsAfterFinished": 86_400,  # the metadata store keeps the record
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
    if spec.timeout is not None:
        # Per attempt, from the pod's start, as locally from the process's: waiting to be
        # scheduled is like waiting in the queue, and the retry back-off does not count.
        pod["activeDeadlineSeconds"] = max(1, math.ceil(spec.timeout))
    return job


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        c.get("type", ""): c
        for c in (obj.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }


def _container(pod: dict[str, Any], state: str) -> dict[str, Any] | None:
    """The job container's `terminated` or `waiting` state, if it is in that one."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        found = (status.get("state") or {}).get(state)
        if found:
            return dict(found)
    return None


def _has_ended(pod: dict[str, Any]) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return _container(pod, "terminated") is not None or phase in ("Succeeded", "Failed")


def _status_line(message: str) -> str:
    """A line in the job protocol: the supervisor shows it as the job's progress message."""
    return json.dumps({"type": "status", "message": message})


class KubeJob:
    """One job on the cluster, shaped as the local child process its supervisor watches:
    `stdout` yields the pods' log lines (attempts in order), `wait()` gives the outcome as an
    exit code, `halt()` deletes the Job. Kubernetes retries (`backoffLimit`), so a failure
    here is final; a pod over its deadline ends the job `timed_out`, as locally."""

    pid = None  # no local process: cancel and timeout go through halt()
    retried_by_cluster = True

    def __init__(
        self, app: Appliance, job_id: str, spec: JobSpec, poll: float = POLL_SECONDS
    ) -> None:
        settings = app.settings
        self.kube = Kube.for_settings(settings)
        self.namespace = settings.k3s.namespace
        self.name = f"job-{job_id}"
        self.poll = float(os.environ.get("APPLIANCE_K3S_POLL", poll))
        self.give_up = float(os.environ.get("APPLIANCE_K3S_GIVE_UP", GIVE_UP_AFTER))
        self.reason = ""
        self.timed_out = False
        self.log_lost = False  # a pod's log not read to its end: lines (artifacts) may be lost
        self.attempts = 0
        self.deadline = None  # each pod has its own (activeDeadlineSeconds): no backstop here
        run_id = app.db.scalar("SELECT id FROM runs WHERE job_id = ?", [job_id])
        manifest = job_manifest(job_id, spec, settings, image=settings.k3s.image, run_id=run_id)
        manifest["metadata"]["namespace"] = self.namespace
        stored = self.kube.apply(manifest)
        self.uid = (stored.get("metadata") or {}).get("uid", "")
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: Iterator[str] = iter(self._lines.get, None)
        self.stderr: Iterator[str] = iter(())  # a pod's log holds both streams
        self._halted = threading.Event()
        self._logs: subprocess.Popen[bytes] | None = None
        self._code = 1
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    # ---- what the supervisor calls -----------------------------------------------------

    def wait(self) -> int:
        self._thread.join()
        return self._code

    def halt(self) -> None:
        """Cancel or timeout: delete the Job (its pods go with it) and stop following."""
        self._halted.set()
        try:
            self.kube.delete(self.namespace, f"job/{self.name}")
        except ClusterUnavailable as exc:
            self._lines.put(f"[appliance] could not delete job/{self.name}: {exc.message}")
        logs = self._logs
        if logs is not None and logs.poll() is None:
            logs.terminate()

    # ---- following the Job -------------------------------------------------------------

    def _follow(self) -> None:
        followed: set[str] = set()
        failing_since: float | None = None
        try:
            while not self._halted.is_set():
                try:
                    job, pods = self._read()
                    failing_since = None
                except ClusterUnavailable as exc:
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > self.give_up:
                        self.reason = f"lost the cluster: {exc.message}"
                        self.halt()  # best effort: a job recorded failed must not run on
                        return
                    self._lines.put(_status_line(f"retrying kubectl: {exc.message}"))
                    self._halted.wait(self.poll)
                    continue
                if job is None:  # deleted by someone else (or by halt)
                    self.reason = f"job/{self.name} was deleted"
                    return
                if self._attend(pods, followed):
                    return
                ended = _conditions(job)
                if "Complete" in ended and all(p in followed for p in self._names(pods)):
                    if self.log_lost:  # its metrics or artifacts may be missing: not a success
                        self.reason = "the job completed, but its log could not be read to the end"
                        return
                    self._code = 0
                    return
                if "Failed" in ended and all(p in followed for p in self._names(pods)):
                    failed = ended["Failed"]
                    if failed.get("reason") == "DeadlineExceeded":
                        self.timed_out = True
                    self.reason = self.reason or (
                        f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}".strip()
                    )
                    return
                self._halted.wait(self.poll)
        finally:
            self._lines.put(None)

    def _read(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        jobs = self.kube.get("jobs", "-n", self.namespace, "-l", f"{JOB_LABEL}={self.name[4:]}")
        mine = [j for j in jobs.get("items", []) if j["metadata"].get("uid") == self.uid]
        if not mine:
            return None, []
        pods = self.kube.get("pods", "-n", self.namespace, "-l", f"{UID_LABEL}={self.uid}")
        items = sorted(
            pods.get("items", []),
            key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]),
        )
        return mine[0], items

    @staticmethod
    def _names(pods: list[dict[str, Any]]) -> list[str]:
        return [p["metadata"]["name"] for p in pods]

    def _attend(self, pods: list[dict[str, Any]], followed: set[str]) -> bool:
        """Follow every pod that has started, in order; True when the job must end now."""
        for pod in pods:
            name = pod["metadata"]["name"]
            if name in followed:
                continue
            phase = (pod.get("status") or {}).get("phase")
            if phase == "Pending":
                waiting = _container(pod, "waiting")
                if waiting and waiting.get("reason") in STUCK_REASONS:
                    self.reason = (
                        f"pod {name}: {waiting['reason']}: {waiting.get('message', '')}".strip()
                    )
                    self.halt()
                    return True
                self._lines.put(_status_line(self._pending_message(pod, waiting)))
                return False  # attempts are followed in order
            followed.add(name)
            self.attempts += 1
            node = (pod.get("spec") or {}).get("nodeName", "?")
            self._lines.put(f"[appliance] attempt {self.attempts}: pod {name} on node {node}")
            ended = self._stream(name)
            if self._halted.is_set():
                return True
            if ended is not None:
                pod = ended
            if (pod.get("status") or {}).get("reason") == "DeadlineExceeded":
                self.timed_out = True  # over its time: no retry, as locally
                self.reason = f"pod {name} ran past its deadline"
                self.halt()
                return True
            done = _container(pod, "terminated")
            if done and done.get("exitCode", 0) != 0:
                self.reason = f"exit code {done['exitCode']}: {done.get('reason', 'Error')}" + (
                    f" ({done['message'].strip()})" if done.get("message") else ""
                )
        return False

    @staticmethod
    def _pending_message(pod: dict[str, Any], waiting: dict[str, Any] | None) -> str:
        """Why a pod has not started: unschedulable (no node with the GPU), or pulling."""
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return f"pending: {cond.get('reason', '')} {cond.get('message', '')}".strip()
        return f"pending: {waiting.get('reason', 'waiting')}" if waiting else "pending"

    def _stream(self, pod: str) -> dict[str, Any] | None:
        """The pod's whole log, once: `kubectl logs -f --timestamps`, resumed after the last
        whole line seen when the stream breaks off (an API server restart, a network blip) or
        ends while the container still runs (the kubelet closes idle streams), until the
        container has ended. A line cut in the middle is read again whole. It gives up only
        after `give_up` seconds without a new line, as the Job's status does. Returns the
        ended pod as last read (None: not known)."""
        since: str | None = None
        last: tuple[int, int] | None = None
        stalled_since: float | None = None
        pause = 0.0
        while True:
            args = ["logs", "-f", "--timestamps", f"pod/{pod}", "-n", self.namespace]
            if since is not None:
                args.append(f"--since-time={since}")
            progressed = False
            cut = None  # the last chunk, when it has no newline: maybe half a line
            try:
                self._logs = logs = self.kube.stream(*args)
            except ClusterUnavailable as exc:
                returncode, why = -1, exc.message
            else:
                assert logs.stdout is not None and logs.stderr is not None
                for chunk in logs.stdout:
                    raw = chunk.decode("utf-8", errors="replace")
                    if not raw.endswith("\n"):
                        cut = raw
                        continue
                    stamp, _, line = raw.partition(" ")
                    key = _stamp_key(stamp)
                    if key is None:  # not kubectl's prefix: keep it whole
                        self._lines.put(raw)
                        continue
                    if last is not None and key <= last:
                        continue  # seen before the stream broke (--since-time is inclusive)
                    since, last, progressed = stamp, key, True
                    self._lines.put(line)
                logs.wait()
                said = logs.stderr.read().decode("utf-8", errors="replace").strip().splitlines()
                self._logs = None
                returncode, why = logs.returncode, (said[-1] if said else "")
            if self._halted.is_set():
                return None
            if returncode == 0:
                found = self._read_pod(pod)
                if found is None or _has_ended(found):  # unknown: kubectl said it is complete
                    if cut is not None:  # the container's last line, without a newline
                        stamp, _, line = cut.partition(" ")
                        self._lines.put(line if _stamp_key(stamp) else cut)
                    return found
                why = "the stream ended while the container runs"
            now = time.monotonic()
            if progressed or stalled_since is None:
                stalled_since, pause = now, 0.0
            elif now - stalled_since > self.give_up:
                break
            self._lines.put(
                f"[appliance] kubectl logs pod/{pod} broke off ({why or 'no reason given'}); "
                "resuming"
            )
            pause = min(5.0, max(pause * 2, self.poll))  # 0.1 s, 0.2 s, ... up to 5 s
            self._halted.wait(pause)
        self.log_lost = True
        self._lines.put(f"[appliance] could not read pod/{pod}'s log to its end")
        return None

    def _read_pod(self, pod: str) -> dict[str, Any] | None:
        """The pod as the API server has it now (None: not reachable)."""
        try:
            return dict(self.kube.get(f"pod/{pod}", "-n", self.namespace))
        except ClusterUnavailable:
            return None


CODE_LIMIT = 16 * 2**20  # the job's own files travel through the object store; data does not
CODE_FILES = 5000  # more files than this in a working directory: not a code directory
_PYTHON = re.compile(r"python(\d+(\.\d+)*)?")
_NOT_CODE = {"__pycache__", "node_modules"}  # + dot-directories and virtual environments


def _skipped(directory: Path) -> bool:
    return (
        directory.name.startswith(".")
        or directory.name in _NOT_CODE
        or (directory / "pyvenv.cfg").exists()  # a virtual environment, whatever its name
    )


def _tree(base: Path) -> dict[str, Path] | None:
    """The files of a job's working directory, by relative path (links by their own name),
    without version control, caches and virtual environments; None once they pass
    CODE_LIMIT or CODE_FILES (a home directory, a data folder: walking on is pointless)."""
    found: dict[str, Path] = {}
    total = 0
    for root, dirs, names in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not _skipped(Path(root) / d))
        for name in sorted(names):
            path = Path(root) / name
            if name.startswith(".") or not path.is_file():
                continue
            found[path.relative_to(base).as_posix()] = path
            total += path.stat().st_size
            if total > CODE_LIMIT or len(found) > CODE_FILES:
                return None
    return found


def _beside(script: Path, base: Path) -> dict[str, Path]:
    """A script and what it imports from beside it: its sibling modules and packages."""
    found = {script.relative_to(base).as_posix(): script}
    for sibling in sorted(script.parent.iterdir()):
        if sibling.suffix == ".py" and sibling.is_file():
            found[sibling.relative_to(base).as_posix()] = sibling
        elif (sibling / "__init__.py").is_file() and not _skipped(sibling):
            package = _tree(sibling) or {}
            prefix = sibling.relative_to(base).as_posix()
            found.update({f"{prefix}/{rel}": path for rel, path in package.items()})
    return found


def _archive(files: dict[str, Path], dest: Path) -> None:
    """The job's files as one tar (the same bytes for the same files: no times, no owners),
    so a spec names one object however many files travel."""
    with tarfile.open(dest, "w") as tar:
        for rel, path in sorted(files.items()):
            info = tarfile.TarInfo(rel)
            info.size = path.stat().st_size
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            with path.open("rb") as fh:
                tar.addfile(info, fh)


def ship_code(app: Appliance, spec: JobSpec) -> JobSpec:
    """Make a job that runs in a working directory of this machine runnable in a pod, which
    has none of its files: the directory's code (without version control, caches or
    virtual environments) goes to the object store as one tar named in `inputs.code`; the
    pod unpacks it into a directory of its own and runs there (`fetch_code`). A directory
    over CODE_LIMIT or CODE_FILES sends only the script the job names and the modules and
    packages beside it. Without a working directory, a Python script named by its absolute
    path travels the same way, from its own directory. Paths into the directory become
    relative; other absolute paths (`/bin/sh`) are the image's, and this machine's Python
    becomes the image's `python`."""
    is_command = spec.kind == "command" and bool(spec.command)
    head = Path(spec.command[0]) if is_command else None
    if head is not None and head.is_absolute() and _PYTHON.fullmatch(head.name):
        spec.command = ["python", *spec.command[1:]]
    if spec.workdir:
        base = Path(os.path.normpath(Path(spec.workdir).absolute()))
        whole = True
    else:
        scripts = [
            Path(a)
            for a in (spec.command[1:] if is_command else [])
            if a.endswith(".py") and Path(a).is_absolute() and Path(a).is_file()
        ]
        if (
            spec.kind == "tune-function"
            and Path(str(spec.inputs["function"]["script"])).is_absolute()
        ):
            scripts = [Path(str(spec.inputs["function"]["script"]))]
        if not scripts:
            return spec
        base = Path(os.path.normpath(scripts[0].parent))
        whole = False  # a script's own directory: only it and what is beside it

    def inside(arg: str) -> Path | None:
        given = Path(arg)
        path = Path(os.path.normpath(given if given.is_absolute() else base / given))
        return path if path.is_relative_to(base) and path.is_file() else None

    def relative(arg: str, first: bool = False) -> str:
        path = inside(arg)
        if path is None or not Path(arg).is_absolute():
            return arg
        rel = path.relative_to(base).as_posix()
        return f"./{rel}" if first and "/" not in rel else rel

    named: list[Path] = []
    if spec.kind == "command":
        named = [p for p in map(inside, spec.command) if p is not None]
        spec.command = [relative(spec.command[0], first=True)] + [
            relative(arg) for arg in spec.command[1:]
        ]
    elif spec.kind == "tune-function":
        target = dict(spec.inputs["function"])
        named = [p for p in [inside(str(target["script"]))] if p is not None]
        target["script"] = relative(str(target["script"]))
        spec.inputs = {**spec.inputs, "function": target}
    files = _tree(base) if whole else None
    if files is None:
        files = {}
        for path in named:
            if path.suffix == ".py":
                files.update(_beside(path, base))
            else:
                files[path.relative_to(base).as_posix()] = path
        size = sum(path.stat().st_size for path in files.values())
        if size > CODE_LIMIT or len(files) > CODE_FILES:
            raise InvalidInput(
                f"workdir {base}: the job's code ({len(files)} files, {size / 2**20:.1f} MiB) "
                f"is more than travels to a pod ({CODE_FILES} files, "
                f"{CODE_LIMIT // 2**20} MiB); keep data in datasets, dependencies in the image"
            )
    if files:
        with tempfile.TemporaryDirectory(prefix="appliance-code-") as tmp:
            archive = Path(tmp) / "code.tar"
            _archive(files, archive)
            stored = app.objects.put_file(archive)
        spec.inputs = {**spec.inputs, CODE_KEY: {"tar": stored.sha256, "files": len(files)}}
    spec.workdir = None  # the pod's own directory, where the files are unpacked
    return spec


class K3sExecutor(LocalExecutor):
    """Jobs as Kubernetes Jobs on k3s. The supervisor is started here as locally (it survives
    the agent, records the job's lines, ends it); the job itself runs in a pod."""

    name = "k3s"

    def child(self, app: Appliance, job_id: str, spec: JobSpec) -> KubeJob:
        return KubeJob(app, job_id, spec)

    def prepare(self, app: Appliance, spec: JobSpec) -> JobSpec:
        """Pods reach artifacts only over S3, and none of this machine's files."""
        if app.settings.store != "s3":
            raise InvalidInput(
                'executor "k3s" needs store = "s3": pods cannot reach this machine\'s object '
                "directory (install.sh --server sets both)"
            )
        return ship_code(app, spec)

    def cancel(self, job: dict[str, Any]) -> None:
        if self.is_alive(job):
            signal_ours(job.get("pid"), signal.SIGTERM)  # the supervisor deletes the Job

    def orphaned(self, app: Appliance, job: dict[str, Any]) -> None:
        """Its supervisor vanished: delete the Job, so a retry starts clean, as locally."""
        try:
            Kube.for_settings(app.settings).delete(
                app.settings.k3s.namespace, f"job/job-{job['id']}"
            )
        except ApplianceError:
            pass  # the cluster is gone too; its ttl removes the Job

    def capacity(self, app: Appliance) -> Capacity:
        """What the Ready nodes offer together: the agent starts no more than that at once;
        the cluster's scheduler places each pod."""
        nodes = _ready_nodes(app)
        return Capacity(
            cpu=sum(n["cpu"] or 0 for n in nodes),
            memory=sum(n["memory_bytes"] or 0 for n in nodes),
            gpu=sum(n["gpus"] for n in nodes),
        )

    def check_fits(self, app: Appliance, request: Request) -> None:
        """A pod runs on one node: refuse a job no Ready node could ever hold."""
        nodes = _ready_nodes(app)
        if not nodes:
            raise InvalidInput("the cluster has no Ready node (see `appliance cluster nodes`)")
        for key, asked, have, unit in (
            ("cpu", request.cpu, max(n["cpu"] or 0 for n in nodes), "cores"),
            ("memory", request.memory, max(n["memory_bytes"] or 0 for n in nodes), "bytes"),
            ("gpu", request.gpu, max(n["gpus"] for n in nodes), "GPUs"),
        ):
            if asked > have:
                raise InvalidInput(
                    f"resources.{key}: {asked:g} requested but the largest Ready node of the "
                    f"cluster has {have:g} {unit}"
                )


def _ready_nodes(app: Appliance) -> list[dict[str, Any]]:
    from appliance.core.cluster import list_nodes

    return [n for n in list_nodes(Kube.for_settings(app.settings)) if n["ready"]]
