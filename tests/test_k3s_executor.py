"""The k3s executor end to end through the real agent and supervisor, against a recording fake
`kubectl` first on PATH that plays a cluster: it stores the applied Job, shows its pods in
real `kubectl get -o json` shapes, prints each pod's log and ends the Job as scripted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from appliance.core.context import Appliance
from appliance.core.jobs import JobSpec, cancel_job, get_job, submit_job, wait_job
from appliance.core.k3s_jobs import job_manifest
from appliance.errors import InvalidInput
from tests.test_cluster import NODES

from .test_objects import s3_endpoint  # noqa: F401  (module-scoped moto server fixture)

BUCKET = "k3s-jobs"

FAKE = r"""#!{python}
import json, os, sys, time
args = sys.argv[1:]
state_path = os.environ["FAKE_STATE"]
def load():
    try:
        return json.load(open(state_path))
    except (OSError, ValueError):
        return {{"job": None, "deleted": False, "logged": [], "pending_seen": {{}}}}
def save(state):
    tmp = state_path + ".tmp"
    json.dump(state, open(tmp, "w"))
    os.replace(tmp, state_path)
scenario = json.load(open(os.environ["FAKE_SCENARIO"]))
with open(os.environ["FAKE_KUBE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
if args[:2] == ["--kubeconfig", os.environ["FAKE_KUBECONFIG"]]:
    args = args[2:]
else:
    print("no kubeconfig given", file=sys.stderr); sys.exit(1)
state = load()
if os.path.exists(state_path + ".broken") and args[0] in ("get", "logs"):
    print("The connection to the server 127.0.0.1:6443 was refused", file=sys.stderr)
    sys.exit(1)
def pod(i, spec, now_pending):
    name = spec["name"]
    obj = {{"apiVersion": "v1", "kind": "Pod",
           "metadata": {{"name": name, "namespace": "appliance",
                        "creationTimestamp": "2026-11-26T10:00:0%dZ" % i,
                        "labels": {{"batch.kubernetes.io/controller-uid": state["uid"]}}}},
           "spec": {{"nodeName": "edge-server", "containers": [{{"name": "job"}}]}}}}
    if now_pending:
        status = {{"phase": "Pending", "conditions": spec.get("conditions", [])}}
        if spec.get("waiting"):
            waiting = {{"waiting": spec["waiting"]}}
            status["containerStatuses"] = [{{"name": "job", "state": waiting}}]
    elif name in state["logged"]:
        code = spec.get("exit", 0)
        reason = spec.get("reason", "Completed" if code == 0 else "Error")
        ended = {{"terminated": {{"exitCode": code, "reason": reason}}}}
        status = {{"phase": "Succeeded" if code == 0 else "Failed",
                  "containerStatuses": [{{"name": "job", "state": ended}}]}}
        if spec.get("deadline"):
            status = {{"phase": "Failed", "reason": "DeadlineExceeded",
                      "message": "Pod was active on the node longer than the specified deadline"}}
    else:
        running = {{"name": "job", "state": {{"running": {{}}}}}}
        status = {{"phase": "Running", "containerStatuses": [running]}}
    obj["status"] = status
    return obj
def pods():
    out = []
    for i, spec in enumerate(scenario["pods"]):
        if i and scenario["pods"][i - 1]["name"] not in state["logged"]:
            break
        seen = state["pending_seen"].get(spec["name"], 0)
        pending = spec.get("waiting") is not None or seen < spec.get("pending", 0)
        if pending:
            state["pending_seen"][spec["name"]] = seen + 1
        out.append(pod(i, spec, pending))
    save(state)
    return out
if args[:3] == ["apply", "-f", "-"]:
    if scenario.get("apply_fail"):
        print(scenario["apply_fail"], file=sys.stderr); sys.exit(1)
    job = json.load(sys.stdin)
    state.update(job=job, uid="0d9c5e3a-uid", deleted=False)
    save(state)
    job["metadata"]["uid"] = state["uid"]
    print(json.dumps(job))
elif args[:2] == ["get", "nodes"]:
    print(json.dumps({{"kind": "List", "items": json.loads(os.environ["FAKE_NODES"])}}))
elif args[:2] == ["get", "jobs"]:
    items = []
    if state["job"] and not state["deleted"]:
        job = dict(state["job"])
        job["metadata"] = dict(job["metadata"], uid=state["uid"])
        names = [p["name"] for p in scenario["pods"]]
        done = all(n in state["logged"] for n in names)
        cond = []
        if done and scenario.get("end"):
            cond = [{{"type": scenario["end"], "status": "True",
                     "reason": scenario.get("end_reason", ""),
                     "message": scenario.get("end_message", "")}}]
        job["status"] = {{"conditions": cond}}
        items.append(job)
    print(json.dumps({{"apiVersion": "v1", "kind": "List", "items": items}}))
elif args[:2] == ["get", "pods"]:
    items = [] if state["deleted"] else pods()
    print(json.dumps({{"apiVersion": "v1", "kind": "List", "items": items}}))
elif args[0] == "get" and args[1].startswith("pod/"):
    name = args[1][4:]
    i = [p["name"] for p in scenario["pods"]].index(name)
    print(json.dumps(pod(i, scenario["pods"][i], False)))
elif args[:3] == ["logs", "-f", "--timestamps"]:
    name = args[3][4:]
    since = ([a[13:] for a in args if a.startswith("--since-time=")] or [""])[0]
    spec = [p for p in scenario["pods"] if p["name"] == name][0]
    first = not since
    breaks = spec.get("break_after") if first else None
    cut = spec.get("cut_at") if first else None
    idle = spec.get("idle_after") if first else None
    tz = spec.get("tz", "Z")
    for i, line in enumerate(spec.get("lines", [])):
        stamp = "2026-11-26T10:00:%02d.000000000" % i + tz
        if since and stamp < since:
            continue
        if breaks is not None and i == breaks:
            print("error: unexpected EOF", file=sys.stderr)
            sys.exit(1)
        if cut is not None and i == cut:
            sys.stdout.write(stamp + " " + line[: len(line) // 2])
            sys.stdout.flush()
            print("error: unexpected EOF", file=sys.stderr)
            sys.exit(1)
        if idle is not None and i == idle:
            sys.exit(0)  # the kubelet closed an idle stream: the container still runs
        print(stamp + " " + line, flush=True)
    if spec.get("block"):
        while not load()["deleted"]:
            if os.path.exists(state_path + ".broken"):
                print("error: unexpected EOF", file=sys.stderr)
                sys.exit(1)
            time.sleep(0.05)
        sys.exit(0)
    state = load()
    state["logged"].append(name)
    save(state)
elif args[0] == "delete":
    state["deleted"] = True
    save(state)
else:
    print("unknown command: " + " ".join(args), file=sys.stderr); sys.exit(1)
"""


@pytest.fixture
def cluster(
    tmp_path: Path,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    s3_endpoint: str,  # noqa: F811
) -> Iterator[Any]:
    """A home configured for the k3s executor (objects in S3, on moto), and a function that
    scripts the fake cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE.format(python=sys.executable))
    kubectl.chmod(0o755)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    log = tmp_path / "calls.jsonl"
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({"pods": []}))
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_KUBE_LOG", str(log))
    monkeypatch.setenv("FAKE_STATE", str(tmp_path / "state.json"))
    monkeypatch.setenv("FAKE_SCENARIO", str(scenario))
    monkeypatch.setenv("FAKE_KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("FAKE_NODES", json.dumps(NODES["items"][:1]))  # 8 cpu, 2 GPUs, Ready
    monkeypatch.setenv("APPLIANCE_K3S_POLL", "0.05")
    monkeypatch.setenv("APPLIANCE_AGENT_IDLE_EXIT", "2")
    home.mkdir(parents=True)
    (home / "appliance.toml").write_text(
        f'executor = "k3s"\nstore = "s3"\n[k3s]\nkubeconfig = "{kubeconfig}"\n'
        f'[s3]\nendpoint = "{s3_endpoint}"\nbucket = "{BUCKET}"\n'
        'access_key = "test"\nsecret_key = "testtest"\n'
    )
    app = Appliance.open(home)

    class Cluster:
        def play(self, **script: Any) -> None:
            scenario.write_text(json.dumps(script))

        def calls(self) -> list[list[str]]:
            if not log.exists():
                return []
            return [json.loads(line)[2:] for line in log.read_text().splitlines()]

        def break_reads(self) -> None:
            (tmp_path / "state.json.broken").touch()

        def applied(self) -> dict[str, Any]:
            return json.loads((tmp_path / "state.json").read_text())["job"]

    cluster = Cluster()
    cluster.app = app  # type: ignore[attr-defined]
    yield cluster
    app.close()


def _submit(app: Appliance, **spec: Any) -> dict[str, Any]:
    job_spec = JobSpec(kind="command", command=["python", "train.py"], **spec)
    return submit_job(app, job_spec)


def _shipped(app: Appliance, spec: JobSpec) -> dict[str, int]:
    """What travels to the pod: the files of the code archive, with their modes."""
    import tarfile

    assert spec.inputs["code"]["files"] > 0
    with tarfile.open(app.objects.get_file(spec.inputs["code"]["tar"])) as tar:
        return {m.name: m.mode for m in tar.getmembers()}


def _metric_keys(app: Appliance, job: dict[str, Any]) -> list[str]:
    rows = app.db.rows("SELECT key FROM run_metrics WHERE run_id = ? ORDER BY id", [job["run_id"]])
    return [r["key"] for r in rows]


def _spec(app: Appliance, job_id: str) -> JobSpec:
    return JobSpec.from_json(app.db.scalar("SELECT spec_json FROM jobs WHERE id = ?", [job_id]))


METRIC = json.dumps({"type": "metric", "name": "valid_auc", "value": 0.91, "step": 3})
PROGRESS = json.dumps({"type": "progress", "done": 3, "total": 10})


def test_a_job_runs_as_a_kubernetes_job_and_its_log_is_recorded(cluster: Any) -> None:
    cluster.play(
        pods=[{"name": "job-x-abcde", "pending": 2, "lines": [PROGRESS, "epoch 3", METRIC]}],
        end="Complete",
    )
    app = cluster.app
    job = _submit(app, resources={"cpu": 2, "memory": "1Gi"}, timeout=600, retries=1)
    done = wait_job(app, job["id"], timeout=30)
    assert done["state"] == "succeeded", done
    # what was applied is exactly the Job the spec becomes, and it is valid
    applied = cluster.applied()
    spec = _spec(app, job["id"])
    assert applied == job_manifest(job["id"], spec, app.settings, run_id=job["run_id"])
    kubernetes_validate.validate(applied, "1.32", strict=True)
    uid = "0d9c5e3a-uid"
    calls = cluster.calls()
    assert calls[0] == ["get", "nodes", "-o", "json"]  # submit: does any node fit it?
    assert ["apply", "-f", "-", "-o", "json"] in calls
    label = f"appliance.dev/job-id={job['id']}"
    assert ["get", "jobs", "-n", "appliance", "-l", label, "-o", "json"] in calls
    pods = ["get", "pods", "-n", "appliance", "-l", f"batch.kubernetes.io/controller-uid={uid}"]
    assert [*pods, "-o", "json"] in calls
    assert ["logs", "-f", "--timestamps", "pod/job-x-abcde", "-n", "appliance"] in calls
    assert not any(c[0] == "delete" for c in calls)
    # the pod's stdout went through the same line parser as a local job's
    rows = app.db.rows("SELECT key, value, step FROM run_metrics WHERE run_id = ?", [job["run_id"]])
    assert [(r["key"], r["value"], r["step"]) for r in rows] == [("valid_auc", 0.91, 3)]
    text = (Path(done["log_path"])).read_text()
    assert "epoch 3" in text and "attempt 1: pod job-x-abcde on node edge-server" in text
    assert done["progress_current"] == 3 and done["progress_total"] == 10


def test_kubernetes_retries_and_each_pod_is_an_attempt(cluster: Any) -> None:
    cluster.play(
        pods=[
            {"name": "job-x-a", "exit": 3, "lines": ["boom"]},
            {"name": "job-x-b", "lines": [METRIC]},
        ],
        end="Complete",
    )
    job = _submit(cluster.app, retries=1)
    done = wait_job(cluster.app, job["id"], timeout=30)
    assert done["state"] == "succeeded"
    text = Path(done["log_path"]).read_text()
    assert "attempt 1: pod job-x-a" in text and "attempt 2: pod job-x-b" in text
    assert sum(c[:1] == ["apply"] for c in cluster.calls()) == 1  # not retried here as well


def test_a_failed_job_says_why_and_is_not_retried_twice(cluster: Any) -> None:
    cluster.play(
        pods=[{"name": "job-x-a", "exit": 137, "reason": "OOMKilled"}],
        end="Failed",
        end_reason="BackoffLimitExceeded",
        end_message="Job has reached the specified backoff limit",
    )
    job = _submit(cluster.app)
    done = wait_job(cluster.app, job["id"], timeout=30)
    assert done["state"] == "failed"
    assert done["error"] == "exit code 137: OOMKilled"
    assert done["attempt"] == 1


def test_a_pod_past_its_deadline_ends_the_job_timed_out(cluster: Any) -> None:
    cluster.play(pods=[{"name": "job-x-a", "deadline": True}], end="Failed")
    job = _submit(cluster.app, timeout=5, retries=2)
    spec = _spec(cluster.app, job["id"])
    manifest = job_manifest(job["id"], spec, cluster.app.settings)
    # per attempt, from the pod's start, as locally; nothing counts the time spent pending
    assert manifest["spec"]["template"]["spec"]["activeDeadlineSeconds"] == 5
    assert "activeDeadlineSeconds" not in manifest["spec"]
    done = wait_job(cluster.app, job["id"], timeout=30)
    assert done["state"] == "timed_out"
    assert ["delete", f"job/job-{job['id']}", "-n", "appliance"] == cluster.calls()[-1][:4]


def test_cancel_deletes_the_job(cluster: Any) -> None:
    cluster.play(pods=[{"name": "job-x-a", "lines": ["started"], "block": True}], end="Complete")
    job = _submit(cluster.app)
    deadline = time.monotonic() + 20
    while (
        "started"
        not in Path(get_job(cluster.app, job["id"])["log_path"]).read_text(errors="replace")
        if Path(get_job(cluster.app, job["id"])["log_path"]).exists()
        else True
    ):
        assert time.monotonic() < deadline, "the pod's log never arrived"
        time.sleep(0.05)
    done = cancel_job(cluster.app, job["id"])
    done = wait_job(cluster.app, job["id"], timeout=10)
    assert done["state"] == "cancelled"
    # the supervisor deletes it; on a loaded machine cancel_job's fallback may too, after
    # its grace, and a second delete of the same Job is harmless (--ignore-not-found)
    delete = ["delete", f"job/job-{job['id']}", "-n", "appliance", "--ignore-not-found"]
    deletes = [c for c in cluster.calls() if c[0] == "delete"]
    assert deletes and all(d == [*delete, "--wait=false"] for d in deletes)


def test_an_image_that_cannot_be_pulled_fails_the_job_at_once(cluster: Any) -> None:
    waiting = {
        "reason": "ErrImageNeverPull",
        "message": "image appliance-runtime:0.1.0 not present",
    }
    cluster.play(pods=[{"name": "job-x-a", "waiting": waiting}], end="Complete")
    job = _submit(cluster.app)
    done = wait_job(cluster.app, job["id"], timeout=30)
    assert done["state"] == "failed"
    assert (
        "pod job-x-a: ErrImageNeverPull: image appliance-runtime:0.1.0 not present"
        in (done["error"])
    )
    assert any(c[0] == "delete" for c in cluster.calls())


def test_a_job_no_node_can_hold_is_refused_at_submit(cluster: Any) -> None:
    with pytest.raises(InvalidInput, match="resources.gpu: 4 requested but the largest Ready"):
        _submit(cluster.app, resources={"gpu": 4})
    assert cluster.app.db.scalar("SELECT count(*) FROM jobs") == 0


def test_a_refused_apply_fails_the_job_naming_kubectl(cluster: Any) -> None:
    cluster.play(pods=[], apply_fail="Error from server (Forbidden): jobs.batch is forbidden")
    job = _submit(cluster.app)
    done = wait_job(cluster.app, job["id"], timeout=30)
    assert done["state"] == "failed"
    assert "apply -f - -o json` failed (exit 1): Error from server (Forbidden)" in done["error"]


def test_the_agent_counts_the_clusters_ready_nodes(cluster: Any) -> None:
    from appliance.core.agent import agent_status

    status = agent_status(cluster.app)
    assert status["executor"] == "k3s"
    assert status["capacity"] == {"cpu": 8.0, "memory": 32596084 * 1024, "gpu": 2}


def test_a_broken_log_stream_is_resumed_and_no_line_is_lost_or_doubled(cluster: Any) -> None:
    late = json.dumps({"type": "metric", "name": "late", "value": 2.0, "step": 2})
    cluster.play(
        pods=[{"name": "job-x-a", "lines": [METRIC, "middle", late], "break_after": 2}],
        end="Complete",
    )
    job = _submit(cluster.app)
    done = wait_job(cluster.app, job["id"], timeout=30)
    assert done["state"] == "succeeded"
    assert _metric_keys(cluster.app, job) == ["valid_auc", "late"]
    text = Path(done["log_path"]).read_text()
    assert text.count("middle") == 1 and "broke off (error: unexpected EOF); resuming" in text
    logs = [c for c in cluster.calls() if c[0] == "logs"]
    assert logs[1][-1] == "--since-time=2026-11-26T10:00:01.000000000Z"


def test_a_job_whose_cluster_is_lost_fails_and_is_deleted(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.play(pods=[{"name": "job-x-a", "lines": ["started"], "block": True}], end="Complete")
    monkeypatch.setenv("APPLIANCE_K3S_GIVE_UP", "0.5")
    job = _submit(cluster.app)
    log = Path(get_job(cluster.app, job["id"])["log_path"])
    deadline = time.monotonic() + 20
    while "started" not in (log.read_text(errors="replace") if log.exists() else ""):
        assert time.monotonic() < deadline, "the pod's log never arrived"
        time.sleep(0.05)
    cluster.break_reads()  # from now on every `kubectl get` fails; delete still answers
    done = wait_job(cluster.app, job["id"], timeout=30)
    assert done["state"] == "failed" and done["error"].startswith("lost the cluster: ")
    assert any(c[0] == "delete" for c in cluster.calls())


SCRIPT = """
import json
from features import double

print(json.dumps({"type": "metric", "name": "score", "value": double(0.25), "step": 1}))
"""


def test_a_users_script_travels_to_the_pod_through_the_object_store(
    cluster: Any,
    tmp_path: Path,
    s3_endpoint: str,  # noqa: F811
) -> None:
    from appliance.core.jobs import submit_script

    project = tmp_path / "my project"
    (project / "utils").mkdir(parents=True)
    (project / ".git").mkdir()
    (project / "__pycache__").mkdir()
    (project / "score.py").write_text(SCRIPT)
    (project / "features.py").write_text("from utils.scale import twice as double\n")
    (project / "utils" / "__init__.py").write_text("")
    (project / "utils" / "scale.py").write_text("def twice(x):\n    return 2 * x\n")
    (project / "labels.csv").write_text("a small file of the project travels too\n")
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "__pycache__" / "features.cpython-311.pyc").write_bytes(b"\0")
    cluster.play(pods=[{"name": "job-x-a", "lines": ["ok"]}], end="Complete")
    job = submit_script(cluster.app, project / "score.py", ["--fold", "2"])
    wait_job(cluster.app, job["id"], timeout=30)
    spec = _spec(cluster.app, job["id"])
    assert spec.command == ["python", "score.py", "--fold", "2"]  # no path of this machine
    assert spec.workdir is None
    code = _shipped(cluster.app, spec)
    # the working directory's code, without version control or caches
    assert sorted(code) == [
        "features.py",
        "labels.csv",
        "score.py",
        "utils/__init__.py",
        "utils/scale.py",
    ]
    container = cluster.applied()["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == [
        "python",
        "-m",
        "appliance.runner",
        "exec",
        "--",
        "python",
        "score.py",
        "--fold",
        "2",
    ]
    assert "workingDir" not in container
    # the pod's side, run here with the pod's environment: fetch, then run the script
    pod_home = tmp_path / "pod"
    pod_home.mkdir()
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for item in container["env"]:
        if "valueFrom" in item:
            env[item["name"]] = {"access_key": "test", "secret_key": "testtest"}[
                item["valueFrom"]["secretKeyRef"]["key"]
            ]
        else:
            env[item["name"]] = item["value"]
    env["APPLIANCE_HOME"] = str(pod_home)
    argv = [sys.executable if a == "python" else a for a in container["command"]]
    done = subprocess.run(argv, env=env, cwd=pod_home, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"type": "metric", "name": "score", "value": 0.5, "step": 1}
    assert (pod_home / "job" / "utils" / "scale.py").read_text().startswith("def twice")


def test_a_large_directory_sends_only_the_script_and_what_is_beside_it(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.core import k3s_jobs
    from appliance.core.jobs import submit_script

    monkeypatch.setattr(k3s_jobs, "CODE_LIMIT", 4096)  # a "home directory" of 8 KiB
    home_dir = tmp_path / "home"
    (home_dir / "lib").mkdir(parents=True)
    (home_dir / "photos").mkdir()
    (home_dir / "train.py").write_text("import lib\n")
    (home_dir / "helpers.py").write_text("X = 1\n")
    (home_dir / "lib" / "__init__.py").write_text("")
    (home_dir / "photos" / "big.raw").write_bytes(b"\0" * 8192)
    cluster.play(pods=[{"name": "job-x-a"}], end="Complete")
    job = submit_script(cluster.app, home_dir / "train.py", [])
    code = sorted(_shipped(cluster.app, _spec(cluster.app, job["id"])))
    assert code == ["helpers.py", "lib/__init__.py", "train.py"]
    wait_job(cluster.app, job["id"], timeout=30)
    (home_dir / "train.py").write_bytes(b"#" * 8192)  # the script alone is over the limit
    with pytest.raises(InvalidInput, match=r"workdir .*home: the job's code \(3 files, .*to a pod"):
        submit_script(cluster.app, home_dir / "train.py", [])


def test_a_shell_command_keeps_the_images_programs(cluster: Any, tmp_path: Path) -> None:
    from appliance.core.jobs import submit_spec

    project = tmp_path / "proj"
    project.mkdir()
    (project / "run.sh").write_text("#!/bin/sh\necho ok\n")
    (project / "run.sh").chmod(0o755)
    cluster.play(pods=[{"name": "job-x-a"}], end="Complete")
    job = submit_spec(
        cluster.app,
        {
            "kind": "command",
            "command": ["/bin/sh", "-c", f"{project}/run.sh && ./run.sh"],
            "workdir": str(project),
        },
    )
    spec = _spec(cluster.app, job["id"])
    assert spec.command == ["/bin/sh", "-c", f"{project}/run.sh && ./run.sh"]  # not shipped
    assert _shipped(cluster.app, spec) == {"run.sh": 0o755}
    wait_job(cluster.app, job["id"], timeout=30)


def test_jobs_on_k3s_need_the_s3_store(cluster: Any) -> None:
    settings = replace(cluster.app.settings, store="local")
    local = Appliance(settings)
    with pytest.raises(InvalidInput, match='executor "k3s" needs store = "s3"'):
        _submit(local)
    local.close()


@pytest.mark.parametrize(
    "how",
    [
        {"tz": "+01:00"},  # a node whose clock is not on UTC: its offset in every stamp
        {"cut_at": 1},  # the stream breaks in the middle of a line
        {"idle_after": 1},  # kubectl ends cleanly while the container still runs
    ],
)
def test_every_line_of_the_pod_is_recorded_once(cluster: Any, how: dict[str, Any]) -> None:
    late = json.dumps({"type": "metric", "name": "late", "value": 2.0, "step": 2})
    cluster.play(pods=[{"name": "job-x-a", "lines": [METRIC, late, "end"], **how}], end="Complete")
    job = _submit(cluster.app)
    done = wait_job(cluster.app, job["id"], timeout=30)
    assert done["state"] == "succeeded", done["error"]
    assert _metric_keys(cluster.app, job) == ["valid_auc", "late"]
    assert Path(done["log_path"]).read_text().count("\nend\n") == 1


def test_without_a_workdir_a_script_travels_from_its_own_directory(
    cluster: Any, tmp_path: Path
) -> None:
    from appliance.core.jobs import submit_spec

    project = tmp_path / "rl"
    (project / "env").mkdir(parents=True)  # a package named like a virtual environment
    (project / "venv").mkdir()
    (project / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (project / "agent.py").write_text("import env\n")
    (project / "env" / "__init__.py").write_text("")
    (project / "notes.txt").write_text("not beside-code: only the script's own directory\n")
    cluster.play(pods=[{"name": "job-x-a"}], end="Complete")
    job = submit_spec(
        cluster.app, {"kind": "command", "command": [sys.executable, str(project / "agent.py")]}
    )
    spec = _spec(cluster.app, job["id"])
    assert spec.command == ["python", "agent.py"]
    assert sorted(_shipped(cluster.app, spec)) == ["agent.py", "env/__init__.py"]
    wait_job(cluster.app, job["id"], timeout=30)


def test_a_line_with_a_carriage_return_is_one_line(cluster: Any) -> None:
    late = json.dumps({"type": "metric", "name": "late", "value": 2.0, "step": 2})
    lines = [METRIC, "epoch 1 50%\rtwo", late]
    cluster.play(pods=[{"name": "job-x-a", "lines": lines, "break_after": 2}], end="Complete")
    job = _submit(cluster.app)
    done = wait_job(cluster.app, job["id"], timeout=30)
    assert done["state"] == "succeeded", done["error"]
    assert _metric_keys(cluster.app, job) == ["valid_auc", "late"]
    assert Path(done["log_path"]).read_text().count("two") == 1
