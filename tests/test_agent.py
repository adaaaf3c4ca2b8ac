"""The agent and the durable job queue: capacity, timeouts, retries, crashes and restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.core.agent import agent_status, ensure_agent, machine_capacity, systemd_unit
from appliance.core.context import Appliance
from appliance.core.jobs import JobSpec, get_job, submit_job, wait_job
from appliance.core.runs import get_run, metric_history
from appliance.errors import InvalidInput


def _py(code: str, **spec: object) -> JobSpec:
    return JobSpec(kind="command", command=[sys.executable, "-c", code], **spec)  # type: ignore[arg-type]


def _until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _agent_pid(app: Appliance) -> int:
    _until(lambda: agent_status(app)["running"])
    return int(agent_status(app)["pid"])


def test_a_timed_out_job_is_killed_with_its_tree_and_says_so(app: Appliance) -> None:
    from datetime import datetime

    def ts(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print('started', flush=True); time.sleep(120)"
    )
    job = submit_job(app, _py(code, timeout="1s", retries=2))
    _until(lambda: get_job(app, job["id"])["child_pid"] is not None)
    child = get_job(app, job["id"])["child_pid"]
    done = wait_job(app, job["id"], timeout=30)
    assert done["state"] == "timed_out"
    assert done["error"] == "timed out after 1 s"
    assert done["attempt"] == 1  # a timeout is final: retries are for failures
    assert 1.0 <= ts(done["finished_at"]) - ts(done["started_at"]) < 3.5  # 1 s + at most 2 s
    assert get_run(app, job["run_id"])["status"] == "timed_out"
    from appliance.core.processes import tree_members

    assert tree_members(child) == []


def test_a_failed_attempt_runs_again_while_retries_remain(app: Appliance, tmp_path: Path) -> None:
    marker = tmp_path / "attempts"
    code = (
        "import json, os, pathlib, sys\n"
        f"p = pathlib.Path({str(marker)!r})\n"
        "p.write_text(p.read_text() + 'x' if p.exists() else 'x')\n"
        "attempt = int(os.environ['APPLIANCE_ATTEMPT'])\n"
        "event = {'type': 'metric', 'key': 'attempt', 'value': attempt, 'step': attempt}\n"
        "print(json.dumps(event))\n"
        "sys.exit(0 if attempt == 3 else 1)"
    )
    job = submit_job(app, _py(code, retries=2))
    done = wait_job(app, job["id"], timeout=60)
    assert done["state"] == "succeeded" and done["attempt"] == 3
    assert marker.read_text() == "xxx"
    assert [m["value"] for m in metric_history(app, job["run_id"], "attempt")] == [1, 2, 3]
    log = (app.settings.logs_dir / "jobs" / f"{job['id']}.log").read_text()
    assert "attempt 1 of 3 failed" in log and "attempt 2 of 3 failed" in log

    always_fails = submit_job(app, _py("import sys; sys.exit(3)", retries=1))
    done = wait_job(app, always_fails["id"], timeout=60)
    assert done["state"] == "failed" and done["attempt"] == 2 and done["exit_code"] == 3


def test_jobs_run_within_the_machines_capacity(app: Appliance, tmp_path: Path) -> None:
    """Whole-machine jobs run one at a time; half-machine jobs share it, two at once."""
    cores = machine_capacity().cpu
    code = (
        "import pathlib, sys, time\n"
        "start = time.time(); time.sleep(0.6)\n"
        "pathlib.Path(sys.argv[1]).write_text(f'{start} {time.time()}')"
    )

    def spans(cpu: float, count: int) -> list[tuple[float, float]]:
        jobs = []
        for i in range(count):
            out = tmp_path / f"{cpu}-{i}"
            spec = JobSpec(
                kind="command",
                command=[sys.executable, "-c", code, str(out)],
                resources={"cpu": cpu, "memory": "64Mi"},
            )
            jobs.append((submit_job(app, spec), out))
        for job, _ in jobs:
            assert wait_job(app, job["id"], timeout=60)["state"] == "succeeded"
        return sorted(tuple(map(float, out.read_text().split())) for _, out in jobs)  # type: ignore[misc]

    whole = spans(cores, 3)
    assert all(whole[i][1] <= whole[i + 1][0] for i in range(2)), whole  # never overlapped
    half = spans(cores / 2, 2)
    assert half[0][1] > half[1][0], half  # ran side by side


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ({"cpu": 100_000}, "resources.cpu"),
        ({"cpu": "lots"}, "resources.cpu"),
        ({"memory": "64Pi"}, "resources.memory"),
        ({"memory": "3 apples"}, "resources.memory"),
        ({"gpu": 1.5}, "resources.gpu"),
        ({"gpus": 1}, "resources.gpus"),
    ],
)
def test_impossible_or_malformed_requests_are_refused_naming_the_key(
    app: Appliance, resources: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidInput, match=field.replace(".", r"\.")):
        submit_job(app, _py("pass", resources=resources))
    assert app.db.scalar("SELECT count(*) FROM jobs") == 0


def test_a_gpu_request_needs_a_gpu(app: Appliance) -> None:
    if machine_capacity().gpu:
        pytest.skip("this machine has a GPU")
    with pytest.raises(InvalidInput, match=r"resources\.gpu: 1 requested but this machine has 0"):
        submit_job(app, _py("pass", resources={"gpu": 1}))


@pytest.mark.parametrize(
    ("spec", "field"),
    [({"timeout": "soon"}, "timeout"), ({"timeout": -1}, "timeout"), ({"retries": 99}, "retries")],
)
def test_bad_timeout_or_retries_name_the_key(
    app: Appliance, spec: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidInput, match=f"^{field}:"):
        submit_job(app, _py("pass", **spec))


def test_two_agents_started_at_once_leave_exactly_one(app: Appliance) -> None:
    env = {**os.environ, "APPLIANCE_HOME": str(app.settings.home)}
    command = [sys.executable, "-m", "appliance", "agent", "--idle-exit", "5"]
    procs = [
        subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    try:
        _until(lambda: any(p.poll() is not None for p in procs), timeout=20)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        assert loser.returncode == 75  # EX_TEMPFAIL: another agent has the home
        assert "another agent" in loser.stderr.read()  # type: ignore[union-attr]
        assert winner.poll() is None
        assert agent_status(app)["pid"] == winner.pid
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
    assert not agent_status(app)["running"]


PROGRESSING_JOB = """
import json, sys, time
for step in range(1, 1000):
    print(json.dumps({"type": "metric", "name": "loss", "value": 1 / step, "step": step}))
    sys.stdout.flush()
    time.sleep(float(sys.argv[1]))
    if step == int(sys.argv[2]):
        break
"""


def test_kill_9_of_the_agent_does_not_stop_a_running_job(app: Appliance) -> None:
    spec = JobSpec(kind="command", command=[sys.executable, "-c", PROGRESSING_JOB, "0.05", "40"])
    job = submit_job(app, spec)
    agent = _agent_pid(app)
    _until(lambda: len(metric_history(app, job["run_id"], "loss")) >= 5)
    os.kill(agent, signal.SIGKILL)
    _until(lambda: _gone(agent))
    done = wait_job(app, job["id"], timeout=60)  # its supervisor carried on alone
    assert done["state"] == "succeeded"
    assert len(metric_history(app, job["run_id"], "loss")) == 40
    ensure_agent(app)  # the restarted agent finds nothing to fix
    assert _agent_pid(app) != agent
    assert get_job(app, job["id"])["state"] == "succeeded"


RETRY_AWARE_JOB = """
import json, os, sys, time
slow = os.environ["APPLIANCE_ATTEMPT"] == "1"
for step in range(1, 9999 if slow else 4):
    print(json.dumps({"type": "metric", "name": "loss", "value": 1 / step, "step": step}))
    sys.stdout.flush()
    time.sleep(0.1 if slow else 0.01)
"""


def test_after_a_crash_a_restarted_agent_settles_running_jobs(app: Appliance) -> None:
    """Agent, supervisors and jobs all killed (a power cut); the next agent reconciles:
    failed when no retries remain, queued and run again when they do; metrics kept."""
    half = {"cpu": 0.5, "memory": "64Mi"}
    slow = [sys.executable, "-c", PROGRESSING_JOB, "0.1", "9999"]
    doomed = submit_job(app, JobSpec(kind="command", command=slow, resources=half))
    retried = submit_job(
        app,
        JobSpec(
            kind="command",
            command=[sys.executable, "-c", RETRY_AWARE_JOB],
            resources=half,
            retries=1,
        ),
    )
    agent = _agent_pid(app)
    for job in (doomed, retried):
        _until(lambda job=job: len(metric_history(app, job["run_id"], "loss")) >= 3)
    os.kill(agent, signal.SIGKILL)
    for job in (doomed, retried):
        row = app.db.one("SELECT pid, child_pid FROM jobs WHERE id = ?", (job["id"],))
        assert row is not None and row["pid"] and row["child_pid"]
        for pid in (row["pid"], row["child_pid"]):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _until(lambda: _gone(agent))
    kept = len(metric_history(app, doomed["run_id"], "loss"))
    assert kept >= 3
    assert get_job(app, doomed["id"])["state"] in ("running", "failed")  # not yet, or by us

    ensure_agent(app)
    done = wait_job(app, doomed["id"], timeout=30)
    assert done["state"] == "failed" and "disappeared" in done["error"]
    assert get_run(app, doomed["run_id"])["status"] == "failed"
    assert len(metric_history(app, doomed["run_id"], "loss")) == kept
    again = wait_job(app, retried["id"], timeout=60)
    assert again["state"] == "succeeded" and again["attempt"] == 2
    assert "attempt 1 failed" not in (again["error"] or "")  # a success clears the reason
    assert app.db.scalar("SELECT count(*) FROM jobs WHERE state = 'running'") == 0


def test_a_job_started_while_another_thread_has_the_database_open_runs(
    app: Appliance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent starts jobs while its shipping or monitor thread may have the database
    open. A supervisor forked then inherits that connection's SQLite state without its
    files and failed its first read ("disk I/O error"): the job ended as "supervisor
    disappeared" within 20 ms. Such a supervisor starts in a fresh interpreter instead."""
    import threading

    from appliance.core import agent
    from appliance.core.jobs import LocalExecutor, cancel_job, claim_job
    from appliance.core.processes import identity

    monkeypatch.setattr(agent, "ensure_agent", lambda app: None)  # this test is the agent
    opened, done = threading.Event(), threading.Event()

    def start(spec: JobSpec) -> dict:  # type: ignore[type-arg]
        job = submit_job(app, spec)
        assert claim_job(app, job["id"])
        pid = LocalExecutor().start(app, job["id"])
        app.db.execute(  # what the agent records
            "UPDATE jobs SET pid = coalesce(pid, ?), pid_identity = coalesce(pid_identity, ?) "
            "WHERE id = ?",
            (pid, identity(pid), job["id"]),
        )
        return job

    def hold_the_database() -> None:  # as a shipping pass does, for as long as it runs
        other = Appliance(app.settings)
        other.db.scalar("SELECT count(*) FROM jobs")
        opened.set()
        done.wait(30)
        other.close()

    holder = threading.Thread(target=hold_the_database)
    holder.start()
    try:
        assert opened.wait(10)
        # the job gets signals as any other: SIGTERM not blocked (bit 15 of SigBlk)
        code = (
            "import re; print(re.search(r'SigBlk:\\s*(\\w+)', open('/proc/self/status').read())[1])"
        )
        ended = wait_job(app, start(_py(code))["id"], timeout=60)
        # a cancel that comes before the fresh interpreter listens waits for it
        cancelled = start(_py("import time; time.sleep(30)", retries=1))
        took = time.monotonic()
        stopped = cancel_job(app, cancelled["id"])
        took = time.monotonic() - took
    finally:
        done.set()
        holder.join()
    assert ended["state"] == "succeeded", (ended["error"], Path(ended["log_path"]).read_text())
    blocked = Path(ended["log_path"]).read_text().split()[-1]
    assert not int(blocked, 16) & (1 << (signal.SIGTERM - 1)), blocked
    assert stopped["state"] == "cancelled" and stopped["attempt"] == 1, stopped
    assert stopped["error"] == "cancelled before it started", stopped  # by the supervisor
    assert took < 2.0, took


def test_a_process_is_known_as_ours_while_its_exec_is_under_way() -> None:
    """`posix_spawn` returns before the new program's command line is in place (nearly
    always, here): a job checked at that moment read as gone while its supervisor ran, and
    was failed or retried (the job-start test above failed so under load)."""
    from appliance.core.processes import is_ours

    sleep = "import time; time.sleep(0.1)"
    for argv, ours in (
        ([sys.executable, "-c", sleep, "appliance-supervisor"], True),
        ([sys.executable, "-c", sleep], False),  # someone else's, once it shows its line
    ):
        for _ in range(5):
            pid = os.posix_spawn(sys.executable, argv, dict(os.environ))
            try:
                assert is_ours(pid) is ours
            finally:
                os.waitpid(pid, 0)


def test_the_agent_reaps_what_it_started_and_nothing_its_threads_wait_for(
    app: Appliance,
) -> None:
    """A monitor's command runs in the agent's watch thread while the main loop reaps: a
    waitpid(-1) there could take the command's exit status first, and a failed command then
    read as exit 0. The loop reaps the supervisors and servers it started, and only those."""
    import threading

    from appliance.core.agent import Agent

    agent = Agent(app, capacity=machine_capacity())
    codes: list[int] = []
    done = threading.Event()

    def commands() -> None:  # as the watch thread runs an action's command
        try:
            for _ in range(300):
                codes.append(subprocess.run(["false"], check=False).returncode)
        finally:
            done.set()

    thread = threading.Thread(target=commands)
    thread.start()
    while not done.is_set():
        agent._reap()
    thread.join()
    assert codes == [1] * 300, codes.count(0)

    started = os.posix_spawnp("true", ["true"], os.environ)  # a supervisor that has ended
    agent.children.add(started)
    _until(lambda: _gone(started))  # a zombie until reaped
    agent._reap()
    assert not Path(f"/proc/{started}").exists() and started not in agent.children


def test_the_agent_passes_no_descriptor_it_inherited_to_the_supervisors_it_spawns(
    tmp_path: Path,
) -> None:
    """Forked supervisors close every descriptor but 0-2; spawned ones get what is not
    close-on-exec, so the agent makes what it inherited (from a shell that leaks some)
    close-on-exec when it starts."""
    code = (
        "import os, sys\n"
        "from appliance.core.agent import run_agent\n"
        "from appliance.core.context import Appliance\n"
        "read, write = os.pipe()\n"
        "os.set_inheritable(write, True)\n"
        "run_agent(Appliance.open(sys.argv[1]), idle_exit=0.01)\n"
        "print(os.get_inheritable(write), os.get_inheritable(2))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "home")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.split()[-2:] == ["False", "True"], (done.stdout, done.stderr)


def test_a_restart_that_fails_with_any_error_backs_off(
    app: Appliance, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A restart that fails with a database or system error, not only the server's own,
    waits its backoff: the deployment stays wanted after a failed restart, and the agent
    must not start a server on every pass."""
    import sqlite3

    from appliance.core import deployments
    from appliance.core.agent import Agent

    agent = Agent(app, capacity=machine_capacity())
    crashed = [{"name": "churn", "host": "127.0.0.1", "port": 0, "pid": None}]
    monkeypatch.setattr(deployments, "crashed_deployments", lambda app: crashed)
    tries: list[str] = []

    def broken(app, name, host, port):  # type: ignore[no-untyped-def]
        tries.append(name)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(deployments, "restart_deployment", broken)
    before = time.monotonic()
    assert agent._step() is True  # the pass fails as before: logged
    assert "agent pass failed, retrying: disk I/O error" in capsys.readouterr().err
    failures, not_before = agent.restarts["churn"]
    assert tries == ["churn"] and failures == 1 and not_before >= before + 1.0  # backing off
    agent.restarts["churn"] = (failures, time.monotonic() + 3600)  # still backing off
    agent.supervise_deployments()
    assert tries == ["churn"]  # not tried again meanwhile


def test_a_deployment_back_for_ten_minutes_starts_its_backoff_afresh(
    app: Appliance, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Restarts back off while a deployment keeps crashing; once it has stayed up for
    RESTARTS_FORGOTTEN, its next crash is restarted at once, as Kubernetes does. A restart
    that found nothing to start (stopped meanwhile, or already back) is neither logged nor
    counted."""
    from appliance.core import deployments
    from appliance.core.agent import RESTARTS_FORGOTTEN, Agent

    agent = Agent(app, capacity=machine_capacity())
    crashed = [{"name": "churn", "host": "127.0.0.1", "port": 0, "pid": None}]
    monkeypatch.setattr(deployments, "crashed_deployments", lambda app: crashed)
    answers: list[dict[str, Any] | None] = []
    monkeypatch.setattr(deployments, "restart_deployment", lambda *a: answers.pop(0))
    answers.append({"name": "churn", "pid": None})
    agent.supervise_deployments()
    assert agent.restarts["churn"][0] == 1
    assert "restarted deployment churn" in capsys.readouterr().err
    up_since = time.monotonic() - RESTARTS_FORGOTTEN
    agent.restarts["churn"] = (6, up_since + 5)  # up, but not yet for long enough
    crashed.clear()
    agent.supervise_deployments()
    assert agent.restarts["churn"] == (6, up_since + 5)
    agent.restarts["churn"] = (6, up_since - 5)  # crashing still: the backoff stays
    crashed.append({"name": "churn", "host": "127.0.0.1", "port": 0, "pid": None})
    answers.append({"name": "churn", "pid": None})
    agent.supervise_deployments()
    assert agent.restarts["churn"][0] == 7 and "restarted" in capsys.readouterr().err
    agent.restarts["churn"] = (7, up_since - 5)  # up for ten minutes: forgotten
    crashed.clear()
    agent.supervise_deployments()
    assert "churn" not in agent.restarts
    crashed.append({"name": "churn", "host": "127.0.0.1", "port": 0, "pid": None})
    answers.append(None)  # already back when the restart looked
    agent.supervise_deployments()
    assert "churn" not in agent.restarts and answers == []
    assert "restarted" not in capsys.readouterr().err


def test_a_cancel_right_after_the_start_is_a_cancel(app: Appliance) -> None:
    """However early the cancel lands (claim, fork, registration), the job ends cancelled,
    is not retried, and within 2 s."""
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1):
        job = submit_job(app, _py("import time; time.sleep(30)", retries=1))
        _until(lambda job=job: get_job(app, job["id"])["state"] == "running", timeout=10)
        time.sleep(delay)
        started = time.monotonic()
        from appliance.core.jobs import cancel_job

        done = cancel_job(app, job["id"])
        took = time.monotonic() - started
        assert done["state"] == "cancelled", (delay, done)
        assert done["attempt"] == 1 and took < 2.0, (delay, took)
        time.sleep(0.3)
        assert get_job(app, job["id"])["state"] == "cancelled"  # nothing restarted it


def test_stopping_the_agent_leaves_running_jobs_running(app: Appliance) -> None:
    from appliance.core.agent import stop_agent

    spec = JobSpec(kind="command", command=[sys.executable, "-c", PROGRESSING_JOB, "0.05", "30"])
    job = submit_job(app, spec)
    _agent_pid(app)
    _until(lambda: get_job(app, job["id"])["state"] == "running")
    assert stop_agent(app)["stopped"]
    assert not agent_status(app)["running"]
    assert wait_job(app, job["id"], timeout=60)["state"] == "succeeded"


def test_the_cli_reports_and_controls_the_agent(cli, home: Path) -> None:  # type: ignore[no-untyped-def]
    started = cli("agent", "start", "--home", str(home), "--json")
    assert started.code == 0 and started.json()["running"]
    status = cli("agent", "status", "--home", str(home), "--json").json()
    assert status["pid"] == started.json()["pid"] and status["capacity"]["cpu"] >= 1
    again = cli("agent", "start", "--home", str(home), "--json").json()
    assert again["pid"] == status["pid"]  # one agent per home
    stopped = cli("agent", "stop", "--home", str(home), "--json")
    assert stopped.json() == {"stopped": True, "pid": status["pid"]}
    assert cli("agent", "status", "--home", str(home), "--json").json()["running"] is False


def test_systemd_unit_keeps_jobs_alive_across_agent_restarts(app: Appliance) -> None:
    unit = systemd_unit(app, user="appliance")
    assert "KillMode=process" in unit  # jobs share the agent's cgroup
    assert f"Environment=APPLIANCE_HOME={app.settings.home}" in unit
    assert "User=appliance" in unit and "WantedBy=multi-user.target" in unit
    exec_line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_line.endswith(" agent --wait-lock")  # no restart loop behind an on-demand agent
    shipped = Path(__file__).parents[1] / "provisioning" / "systemd" / "appliance-agent.service"
    assert "KillMode=process" in shipped.read_text()


def test_jobs_submit_reads_a_spec_file(cli, home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "kind: command\n"
        f"entry: {sys.executable} -c \"print('hi from a spec')\"\n"
        "resources: {cpu: 0.5, memory: 128Mi}\n"
        "timeout: 2m\n"
        "retries: 1\n"
        "experiment: specs\n"
    )
    result = cli("jobs", "submit", str(spec), "--home", str(home), "--json", "--wait")
    assert result.code == 0, result.err
    job = result.json()
    assert job["state"] == "succeeded"
    assert job["timeout_s"] == 120 and job["retries"] == 1 and job["cpu"] == 0.5
    assert job["memory_bytes"] == 128 * 2**20
    runs = cli("runs", "list", "--experiment", "specs", "--home", str(home), "--json").json()
    assert [r["id"] for r in runs] == [job["run_id"]]

    spec.write_text("kind: command\nentry: [echo, hi]\nresource: {cpu: 1}\n")
    bad = cli("jobs", "submit", str(spec), "--home", str(home))
    assert bad.code == 2 and "unknown key 'resource'" in bad.err
    spec.write_text(json.dumps({"kind": "cron", "entry": "echo"}))
    bad = cli("jobs", "submit", str(spec), "--home", str(home))
    assert bad.code == 2 and "kind 'cron'" in bad.err


def test_gpus_are_counted_with_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.core.agent import count_gpus

    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        'echo "$@" >> "$(dirname "$0")/calls"\n'
        "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n"
        "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert count_gpus() == 2
    assert (fake.parent / "calls").read_text().split() == ["-L"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert count_gpus() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert count_gpus() == 0


def test_the_mlp_requests_a_gpu_only_where_there_is_one(
    app: Appliance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import appliance.core.agent as agent
    from appliance.core.agent import Capacity
    from appliance.core.datasets import import_data
    from appliance.core.jobs import cancel_job
    from appliance.core.training import submit_training

    csv = tmp_path / "d.csv"
    csv.write_text("x,y\n" + "".join(f"{i},{i % 2}\n" for i in range(50)))
    import_data(app, "d", str(csv))
    here = machine_capacity()
    monkeypatch.setattr(agent, "machine_capacity", lambda: Capacity(here.cpu, here.memory, 1))
    job = submit_training(app, "d", "y", trainer="mlp")
    spec = json.loads(app.db.scalar("SELECT spec_json FROM jobs WHERE id = ?", (job["id"],)))
    assert spec["resources"]["gpu"] == 1 and job["gpu"] == 1
    cancel_job(app, job["id"])  # the real machine may have no GPU to run it on
    monkeypatch.setattr(agent, "machine_capacity", lambda: Capacity(here.cpu, here.memory, 0))
    job = submit_training(app, "d", "y", trainer="mlp")
    assert job["gpu"] == 0
    cancel_job(app, job["id"])


def test_a_queued_job_with_no_agent_gets_one_when_anyone_waits_or_looks(
    app: Appliance, monkeypatch: pytest.MonkeyPatch
) -> None:
    import appliance.core.agent as agent
    from appliance.core.jobs import list_jobs

    real = agent.ensure_agent
    monkeypatch.setattr(agent, "ensure_agent", lambda app: None)  # as if the agent died
    first = submit_job(app, _py("print('one')"))
    second = submit_job(app, _py("print('two')"))
    time.sleep(0.3)
    assert get_job(app, first["id"])["state"] == "queued"
    assert not agent_status(app)["running"]
    monkeypatch.setattr(agent, "ensure_agent", real)
    assert wait_job(app, first["id"], timeout=30)["state"] == "succeeded"
    assert wait_job(app, second["id"], timeout=30)["state"] == "succeeded"
    assert all(j["state"] == "succeeded" for j in list_jobs(app))


def test_a_train_spec_file_runs_the_built_in_trainer(cli, home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    csv = tmp_path / "d.csv"
    csv.write_text("x,z,y\n" + "".join(f"{i},{i % 7},{(i * 7) % 3 == 0}\n" for i in range(300)))
    assert cli("data", "import", "d", str(csv), "--home", str(home)).code == 0
    spec = tmp_path / "train.yaml"
    spec.write_text(
        "kind: train\ntrain: d\nlabel: y\nexperiment: specs\nretries: 1\ntimeout: 5m\n"
        "resources: {cpu: 1}\nparams: {num_boost_round: 20}\n"
    )
    result = cli("jobs", "submit", str(spec), "--home", str(home), "--json", "--wait")
    assert result.code == 0, result.err
    job = result.json()
    assert job["state"] == "succeeded" and job["retries"] == 1 and job["timeout_s"] == 300
    run = cli("runs", "show", job["run_id"], "--home", str(home), "--json").json()
    assert run["experiment"] == "specs" and "valid_auc" in run["metrics"]

    spec.write_text("kind: train\ntrain: d\nlabel: y\nresources: {cpu: 0.5}\n")
    bad = cli("jobs", "submit", str(spec), "--home", str(home))
    assert bad.code == 2 and "resources.cpu" in bad.err
    spec.write_text("kind: train\ntrain: d\nlabel: y\nfeatures: x\n")
    bad = cli("jobs", "submit", str(spec), "--home", str(home))
    assert bad.code == 2 and "'features'" in bad.err


def test_jobs_get_the_agents_environment_plus_their_own_env(
    cli, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "show.py"
    script.write_text("import os\nprint('GREETING=' + os.environ.get('GREETING', '-'))\n")
    result = cli(
        "run", str(script), "--home", str(home), "--json", "--wait", "--env", "GREETING=hi"
    )
    assert result.code == 0, result.err
    log = (home / "logs" / "jobs" / f"{result.json()['id']}.log").read_text()
    assert "GREETING=hi" in log
    bad = cli("run", str(script), "--home", str(home), "--env", "APPLIANCE_HOME=/elsewhere")
    assert bad.code == 2 and "env.APPLIANCE_HOME" in bad.err
    bad = cli("run", str(script), "--home", str(home), "--env", "novalue")
    assert bad.code == 2 and "--env 'novalue'" in bad.err


def test_waiting_on_the_cli_restarts_a_missing_agent(
    cli, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """`--wait` on a job whose agent is gone (killed, or exited idle at the wrong moment)."""
    import appliance.core.agent as agent

    real, calls = agent.ensure_agent, []

    def first_call_lost(app: Appliance) -> None:
        calls.append(1)
        if len(calls) > 1:
            real(app)

    monkeypatch.setattr(agent, "ensure_agent", first_call_lost)
    result = cli(
        "jobs", "run", "--home", str(home), "--json", "--wait", "--", sys.executable, "-c", "1"
    )
    assert result.code == 0, result.err
    assert result.json()["state"] == "succeeded" and len(calls) > 1


def test_gpus_are_handed_out_one_job_at_a_time(
    app: Appliance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a 2-GPU machine: two 1-GPU jobs get GPU 0 and GPU 1, a 0-GPU job sees none, a
    third GPU job waits; an agent that sees no GPU keeps GPU jobs queued and says why."""
    import appliance.core.agent as agent
    from appliance.core.agent import Agent, Capacity

    here = machine_capacity()
    two = Capacity(here.cpu * 4, here.memory, 2)
    monkeypatch.setattr(agent, "machine_capacity", lambda: two)
    monkeypatch.setattr(agent, "ensure_agent", lambda app: None)  # only the agent below
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    small = {"cpu": 0.25, "memory": "1Mi"}
    jobs = [submit_job(app, _py("pass", resources={**small, "gpu": 1})) for _ in range(3)]
    cpu_only = submit_job(app, _py("pass", resources=small))

    class Recording:
        name = "local"
        started: list[str] = []

        def start(self, app: Appliance, job_id: str) -> int:
            self.started.append(job_id)
            return os.getpid()

    scheduler = Agent(app, capacity=two)
    scheduler.executor = Recording()  # type: ignore[assignment]
    scheduler.schedule()
    rows = {r["id"]: r for r in app.db.rows("SELECT id, state, gpu_ids FROM jobs")}
    assert [rows[j["id"]]["gpu_ids"] for j in jobs[:2]] == ["0", "1"], rows
    assert rows[jobs[2]["id"]]["state"] == "queued"  # both GPUs are taken
    assert rows[cpu_only["id"]]["gpu_ids"] == ""  # sees no GPU at all

    smaller = Agent(app, capacity=Capacity(two.cpu, two.memory, 0))
    smaller.executor = Recording()  # type: ignore[assignment]
    smaller.schedule()
    waiting = get_job(app, jobs[2]["id"])
    assert waiting["state"] == "queued"
    assert waiting["progress_message"].startswith("waiting: resources.gpu: 1 requested")
    app.db.execute("UPDATE jobs SET state = 'cancelled' WHERE state = 'running'")


def test_a_big_job_that_waited_long_is_not_overtaken(
    app: Appliance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backfill lets small jobs pass a big one that does not fit yet, but not for ever."""
    import appliance.core.agent as agent
    from appliance.core.agent import Agent, Capacity

    four = Capacity(4, machine_capacity().memory, 0)
    monkeypatch.setattr(agent, "machine_capacity", lambda: four)
    monkeypatch.setattr(agent, "ensure_agent", lambda app: None)  # only the agent below

    class Recording:
        name = "local"

        def start(self, app: Appliance, job_id: str) -> int:
            return os.getpid()

    scheduler = Agent(app, capacity=four)
    scheduler.executor = Recording()  # type: ignore[assignment]
    mem = {"memory": "1Mi"}
    busy = submit_job(app, _py("pass", resources={"cpu": 3, **mem}))
    assert scheduler.schedule() == [busy["id"]]
    big = submit_job(app, _py("pass", resources={"cpu": 4, **mem}))
    small = submit_job(app, _py("pass", resources={"cpu": 1, **mem}))
    assert scheduler.schedule() == [small["id"]]  # backfilled past the big one
    app.db.execute("UPDATE jobs SET state = 'succeeded' WHERE id = ?", (small["id"],))
    app.db.execute(
        "UPDATE jobs SET submitted_at = '2000-01-01T00:00:00.000Z' WHERE id = ?", (big["id"],)
    )
    later = submit_job(app, _py("pass", resources={"cpu": 1, **mem}))
    assert scheduler.schedule() == []  # the big one has waited long: it goes next
    app.db.execute("UPDATE jobs SET state = 'succeeded' WHERE id = ?", (busy["id"],))
    assert scheduler.schedule() == [big["id"]]
    assert get_job(app, later["id"])["state"] == "queued"
    app.db.execute("UPDATE jobs SET state = 'cancelled' WHERE state IN ('queued', 'running')")


def test_a_cancel_wins_over_a_retry_and_a_claim(
    app: Appliance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel is stored first: a failing attempt that would be retried, or a claim that
    comes a moment later, ends in 'cancelled' instead of running the job again."""
    import appliance.core.agent as agent
    from appliance.core.jobs import claim_job, fail_or_retry

    monkeypatch.setattr(agent, "ensure_agent", lambda app: None)  # nothing runs on its own
    job = submit_job(app, _py("pass", retries=3))
    assert claim_job(app, job["id"])
    app.db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job["id"],))
    assert fail_or_retry(app, job["id"], 1, "exit code 1") == "cancelled"
    assert get_job(app, job["id"])["state"] == "cancelled"

    queued = submit_job(app, _py("pass"))
    app.db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (queued["id"],))
    assert not claim_job(app, queued["id"])  # the agent will not start it


def test_a_status_line_is_not_overwritten_by_an_older_progress_message(app: Appliance) -> None:
    code = (
        "import json, time\n"
        "print(json.dumps({'type': 'progress', 'done': 1, 'total': 2, 'message': 'epoch 1'}))\n"
        "print(json.dumps({'type': 'status', 'message': 'uploading the model'}), flush=True)\n"
        "time.sleep(30)"
    )
    job = submit_job(app, _py(code))
    _until(lambda: get_job(app, job["id"])["progress_total"] == 2)
    time.sleep(0.6)  # past a periodic flush
    row = get_job(app, job["id"])
    assert row["progress_message"] == "uploading the model" and row["progress_current"] == 1


def test_env_values_are_checked(app: Appliance) -> None:
    with pytest.raises(InvalidInput, match=r"env\.BAD: contains a NUL byte"):
        submit_job(app, _py("pass", env={"BAD": "a\0b"}))
    with pytest.raises(InvalidInput, match=r"env\.1X: not a valid variable name"):
        submit_job(app, _py("pass", env={"1X": "a"}))
