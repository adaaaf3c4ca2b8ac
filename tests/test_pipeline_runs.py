"""Pipeline runs driven by the agent: steps as jobs, parallel branches, failure and retry,
caching (and why it hit or missed), cancel, compare, a kill -9 of the agent mid-step, and
the README's example end to end with a fully cached second run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.core.context import Appliance
from appliance.core.pipeline_runs import (
    cancel_run,
    compare_runs,
    get_run,
    retry_run,
    run_pipeline,
    show_run,
    wait_run,
)
from appliance.errors import Conflict, InvalidInput, NotFound

ROOT = Path(__file__).resolve().parents[1]

# A step script: appends "START/END <name> <time>" to events.log, sleeps, fails when a file
# named fail-<name> exists next to it.
STEP_SCRIPT = """
import sys, time, pathlib
name, seconds = sys.argv[1], float(sys.argv[2])
here = pathlib.Path(__file__).parent
with open(here / "events.log", "a") as log:
    log.write(f"START {name} {time.time()}\\n")
time.sleep(seconds)
if (here / f"fail-{name}").exists():
    print(f"{name} was told to fail", file=sys.stderr)
    sys.exit(3)
with open(here / "events.log", "a") as log:
    log.write(f"END {name} {time.time()}\\n")
print('{"type": "metric", "name": "score", "value": %s}' % len(name))
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "step.py").write_text(STEP_SCRIPT)
    return root


def write(project: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = project / name
    path.write_text(text)
    return path


def events(project: Path) -> list[tuple[str, str, float]]:
    path = project / "events.log"
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(kind, name, float(at)) for kind, name, at in rows]


def steps_of(app: Appliance, run_id: str) -> dict[str, dict[str, Any]]:
    return {s["step"]: s for s in show_run(app, run_id)["steps_detail"]}


SCRIPTS = """
name: branches
params: {pause: 1.0}
steps:
  a: {script: step.py, args: [a, "${params.pause}"]}
  b: {script: step.py, args: [b, "${params.pause}"]}
  c: {script: step.py, args: [c, 0], after: [a, b]}
"""


def test_independent_steps_run_in_parallel_each_as_a_job(app: Appliance, project: Path) -> None:
    run = wait_run(app, run_pipeline(app, write(project, SCRIPTS))["id"], timeout=60)
    assert run["state"] == "succeeded", show_run(app, run["id"])
    steps = steps_of(app, run["id"])
    assert {s["state"] for s in steps.values()} == {"succeeded"}
    seen = {(kind, name): at for kind, name, at in events(project)}
    # a and b overlap; c starts after both ended
    assert seen[("START", "b")] < seen[("END", "a")]
    assert seen[("START", "a")] < seen[("END", "b")]
    assert seen[("START", "c")] >= max(seen[("END", "a")], seen[("END", "b")])
    # every step is a job with its run, logs and metrics; the run points back to the pipeline
    for name, step in steps.items():
        job = app.db.one("SELECT state, kind FROM jobs WHERE id = ?", (step["job_id"],))
        assert job == {"state": "succeeded", "kind": "command"}
        assert step["outputs"] == {"run": step["run_id"]}
        rows = app.db.rows("SELECT key, value FROM run_tags WHERE run_id = ?", (step["run_id"],))
        tags = {r["key"]: r["value"] for r in rows}
        assert tags["pipeline.run"] == run["id"] and tags["pipeline.step"] == name
        assert app.db.scalar(
            "SELECT value FROM run_metrics WHERE run_id = ? AND key = 'score'", (step["run_id"],)
        ) == len(name)
        assert step["duration_s"] is not None and step["duration_s"] > 0


FAILING = """
name: failing
steps:
  a: {script: step.py, args: [a, 0]}
  b: {script: step.py, args: [b, 0], after: a}
  c: {script: step.py, args: [c, 0], after: b}
  side: {script: step.py, args: [side, 0]}
"""


def test_a_failed_step_stops_its_descendants_and_retry_resumes_from_it(
    app: Appliance, project: Path
) -> None:
    (project / "fail-b").touch()
    run = wait_run(app, run_pipeline(app, write(project, FAILING))["id"], timeout=60)
    assert run["state"] == "failed"
    assert run["error"].startswith("step b: job ")
    assert "exit code 3: b was told to fail" in run["error"]
    steps = steps_of(app, run["id"])
    assert [steps[n]["state"] for n in "abc"] == ["succeeded", "failed", "pending"]
    assert steps["side"]["state"] == "succeeded"  # an independent branch finishes
    first_a = steps["a"]["job_id"]

    with pytest.raises(NotFound, match="pipeline run 'ffffffffffff' not found"):
        retry_run(app, "f" * 12)
    (project / "fail-b").unlink()
    retried = wait_run(app, retry_run(app, run["id"])["id"], timeout=60)
    assert retried["state"] == "succeeded" and retried["attempt"] == 2
    steps = steps_of(app, run["id"])
    assert steps["a"]["job_id"] == first_a  # kept, not run again
    assert steps["b"]["attempt"] == 2 and steps["c"]["state"] == "succeeded"
    names = [name for kind, name, _ in events(project) if kind == "END"]
    assert sorted(names) == ["a", "b", "c", "side"]  # each ran to completion once
    with pytest.raises(Conflict, match="is succeeded"):
        retry_run(app, run["id"])


CACHED = """
name: cached
params: {n: 1}
steps:
  a: {script: step.py, args: [a, 0, "${params.n}"]}
  b: {script: step.py, args: [b, 0], after: a}
  c: {script: step.py, args: [c, 0], cache: false}
"""


def test_a_step_with_identical_inputs_is_cached_and_says_why_it_hit_or_missed(
    app: Appliance, project: Path, cli: Any
) -> None:
    path = write(project, CACHED)
    first = wait_run(app, run_pipeline(app, path)["id"], timeout=60)
    assert first["state"] == "succeeded"
    second = wait_run(app, run_pipeline(app, path)["id"], timeout=60)
    steps = steps_of(app, second["id"])
    assert steps["a"]["state"] == steps["b"]["state"] == "cached"
    assert steps["a"]["cached_from"] == f"{first['id']}/a"
    assert steps["a"]["outputs"] == steps_of(app, first["id"])["a"]["outputs"]
    assert steps["a"]["why"] == f"same key as {first['id']}/a"
    assert steps["c"]["state"] == "succeeded" and steps["c"]["why"] == "off for this step"
    assert second["cached"] == 2

    # a parameter changes: a misses and says what changed; b only waits for a (it reads
    # nothing of a's), so its own inputs are the same and it stays cached
    third = wait_run(app, run_pipeline(app, path, ["n=2"])["id"], timeout=60)
    steps = steps_of(app, third["id"])
    assert steps["a"]["state"] == "succeeded"
    assert steps["a"]["why"] == (
        f'changed since run {second["id"]}: args.args: ["a", 0, 1] -> ["a", 0, 2]'
    )
    assert steps["b"]["state"] == "cached"
    # the script's content changes: every step that runs it misses, naming the file
    (project / "step.py").write_text(STEP_SCRIPT + "\n# changed\n")
    fourth = wait_run(app, run_pipeline(app, path, ["n=2"])["id"], timeout=60)
    assert "files.script" in steps_of(app, fourth["id"])["a"]["why"]
    # --no-cache runs everything, and says so
    result = cli(
        "--home",
        str(app.settings.home),
        "pipelines",
        "run",
        str(path),
        "--param",
        "n=2",
        "--no-cache",
        "--wait",
        "--json",
    )
    assert result.code == 0, result.err
    shown = result.json()
    assert shown["cached"] == 0
    assert {s["why"] for s in shown["steps_detail"]} >= {"off for this run (--no-cache)"}
    # the cache key is written with the step
    assert (
        len(
            app.db.scalar(
                "SELECT cache_key FROM pipeline_steps WHERE run_id = ? AND step = 'a'",
                (shown["id"],),
            )
        )
        == 64
    )


def test_cancel_stops_running_steps_and_retry_continues(app: Appliance, project: Path) -> None:
    path = write(project, SCRIPTS.replace("pause: 1.0", "pause: 30"))
    run = run_pipeline(app, path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if get_run(app, run["id"])["counts"].get("running") == 2 and len(events(project)) == 2:
            break
        time.sleep(0.1)
    started = time.monotonic()
    cancel_run(app, run["id"])
    ended = wait_run(app, run["id"], timeout=30)
    assert ended["state"] == "cancelled" and time.monotonic() - started < 10
    steps = steps_of(app, run["id"])
    assert steps["a"]["state"] == steps["b"]["state"] == "cancelled"
    assert steps["c"]["state"] == "pending"
    with pytest.raises(Conflict, match="already cancelled"):
        cancel_run(app, run["id"])


def test_a_run_survives_a_kill_9_of_the_agent_mid_step(app: Appliance, project: Path) -> None:
    """The agent is killed while a step runs, then comes back: the step's job went on under
    its supervisor, its result is taken once, and the run finishes; nothing ran twice."""
    from appliance.core.agent import ensure_agent

    path = write(project, SCRIPTS.replace("pause: 1.0", "pause: 2"))
    run = run_pipeline(app, path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(events(project)) < 2:
        time.sleep(0.05)
    pid = int((app.settings.home / "agent.lock").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    time.sleep(3)  # a and b end while no agent runs
    assert get_run(app, run["id"])["state"] == "running"
    ensure_agent(app)
    done = wait_run(app, run["id"], timeout=60)
    assert done["state"] == "succeeded"
    starts = [name for kind, name, _ in events(project) if kind == "START"]
    assert sorted(starts) == ["a", "b", "c"]


def test_runs_of_one_pipeline_never_overlap(app: Appliance, project: Path) -> None:
    path = write(project, SCRIPTS.replace("pause: 1.0", "pause: 1"))
    first = run_pipeline(app, path, no_cache=True)
    second = run_pipeline(app, path, no_cache=True)
    assert wait_run(app, second["id"], timeout=60)["state"] == "succeeded"
    a, b = get_run(app, first["id"]), get_run(app, second["id"])
    assert a["state"] == "succeeded"
    assert b["started_at"] >= a["finished_at"]


def test_bad_input_is_refused_before_anything_is_stored(
    app: Appliance, project: Path, cli: Any
) -> None:
    cyclic = write(
        project,
        "name: p\nsteps:\n  a: {script: step.py, after: b}\n  b: {script: step.py, after: a}\n",
    )
    result = cli("--home", str(app.settings.home), "pipelines", "run", str(cyclic))
    assert result.code != 0 and "cycle: a -> b -> a" in result.err
    missing = write(project, "name: p\nsteps:\n  a: {recipe: nope.sql, inputs: {x: y}, out: z}\n")
    result = cli("--home", str(app.settings.home), "pipelines", "run", str(missing))
    assert result.code != 0 and "steps.a.recipe: nope.sql: no such file" in result.err
    result = cli(
        "--home", str(app.settings.home), "pipelines", "run", str(cyclic.parent / "x.yaml")
    )
    assert result.code != 0 and "no such pipeline file" in result.err
    with pytest.raises(InvalidInput, match="--param n: expected number"):
        run_pipeline(app, write(project, CACHED), ["n=many"])
    assert app.db.scalar("SELECT count(*) FROM pipeline_runs") == 0


def test_a_step_that_cannot_start_fails_naming_the_step_and_key(
    app: Appliance, project: Path
) -> None:
    """Found only when the step is about to run: a dataset that does not exist, a `when`
    that is not a boolean. The run fails there; earlier steps' results are kept."""
    text = """
name: late
params: {data: nothing_here, go: "yes"}
steps:
  a: {script: step.py, args: [a, 0]}
  b: {split: "${params.data}", fractions: [0.5, 0.5], after: a}
"""
    run = wait_run(app, run_pipeline(app, write(project, text))["id"], timeout=60)
    assert run["state"] == "failed"
    steps = steps_of(app, run["id"])
    assert steps["a"]["state"] == "succeeded"
    assert steps["b"]["error"].startswith("steps.b.split: ")
    assert "nothing_here" in steps["b"]["error"]


@pytest.mark.slow
def test_the_readme_example_runs_end_to_end_and_a_second_run_is_fully_cached(
    app: Appliance, tmp_path: Path, cli: Any
) -> None:
    from appliance.core import datasets
    from appliance.core.quickstart import predict_v2, sample_csv, sample_rows

    datasets.import_csv(app, sample_csv(), "churn")
    example = tmp_path / "churn-retrain"
    shutil.copytree(ROOT / "examples" / "churn-retrain", example)
    home = str(app.settings.home)
    first = cli(
        "--home", home, "pipelines", "run", str(example / "pipeline.yaml"), "--wait", "--json"
    )
    assert first.code == 0, first.err + first.out
    run = first.json()
    steps = {s["step"]: s for s in run["steps_detail"]}
    assert [s["state"] for s in steps.values()] == ["succeeded"] * 6
    assert steps["prep"]["outputs"] == {"out": "churn_clean@1"}
    assert steps["split"]["outputs"]["test"] == "churn_clean_test@1"
    assert steps["register"]["outputs"] == {"version": "churn@1"}
    assert steps["gate"]["outputs"]["promoted"] is True  # no champion yet: nothing to beat
    assert steps["deploy"]["outputs"]["version"] == "churn@1"
    features, rows = sample_rows(3)
    answer = predict_v2(steps["deploy"]["outputs"]["url"], "churn", features, rows)
    assert answer["model_version"] == "1"

    second = cli(
        "--home", home, "pipelines", "run", str(example / "pipeline.yaml"), "--wait", "--json"
    )
    assert second.code == 0, second.err
    again = second.json()
    assert again["cached"] == 6 and again["state"] == "succeeded"
    assert {s["cache"] for s in again["steps_detail"]} == {"hit"}

    # everything the pipeline made points back to its run and its parameters
    lineage = cli("--home", home, "lineage", "model:churn@1", "--json").json()
    contexts = [c for c in lineage["contexts"] if c["type"] == "PipelineRun"]
    assert run["id"] in {c["name"] for c in contexts}
    assert contexts[0]["params"] == {"data": "churn", "min_gain": 0.002}
    text = cli("--home", home, "lineage", "dataset:churn_clean@1").out
    assert f"in PipelineRun {run['id']}  pipeline churn-retrain" in text

    # a new version of the data: the prep step misses and says which input changed
    extra = tmp_path / "more.csv"
    lines = sample_csv().read_text().splitlines()
    extra.write_text("\n".join(lines[:3000]) + "\n")
    datasets.import_csv(app, extra, "churn")
    third = cli(
        "--home",
        home,
        "pipelines",
        "run",
        str(example / "pipeline.yaml"),
        "--param",
        "min_gain=0.5",
        "--wait",
        "--json",
    )
    assert third.code == 0, third.err
    steps = {s["step"]: s for s in third.json()["steps_detail"]}
    assert steps["prep"]["cache"] == "miss"
    assert "args.inputs.raw: churn@1" in steps["prep"]["why"]
    assert "-> churn@2" in steps["prep"]["why"]
    assert steps["gate"]["outputs"]["promoted"] is False  # min_gain 0.5: not better enough
    assert steps["deploy"]["state"] == "skipped"

    compared = compare_runs(app, run["id"], third.json()["id"])
    assert {"param": "min_gain", "a": 0.002, "b": 0.5, "differs": True} in compared["params"]
    assert any(m["metric"].startswith("tune.valid_auc") for m in compared["metrics"])
    shown = cli("--home", home, "pipelines", "compare", run["id"], third.json()["id"])
    assert "* param.min_gain" in shown.out and "* prep.out" in shown.out
    listed = cli("--home", home, "pipelines", "runs", "--json").json()
    assert [r["id"] for r in listed][-1] == run["id"] and len(listed) == 3


def test_a_step_interrupted_by_a_reboot_runs_again_by_itself(app: Appliance, project: Path) -> None:
    """A reboot kills the agent and every job's supervisor: when the agent is back, the
    interrupted step (not failed by its own code) runs again, and the run goes on."""
    from appliance.core.agent import ensure_agent
    from appliance.core.processes import kill_tree

    path = write(project, "name: boot\nsteps:\n  a: {script: step.py, args: [a, 3]}\n")
    run = run_pipeline(app, path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not events(project):
        time.sleep(0.05)
    os.kill(int((app.settings.home / "agent.lock").read_text().split()[0]), signal.SIGKILL)
    job = app.db.one(
        "SELECT j.pid, j.child_pid FROM jobs j JOIN pipeline_steps s ON s.job_id = j.id "
        "WHERE s.run_id = ?",
        (run["id"],),
    )
    os.kill(job["pid"], signal.SIGKILL)
    kill_tree(job["child_pid"], grace=0.1)
    ensure_agent(app)
    done = wait_run(app, run["id"], timeout=60)
    assert done["state"] == "succeeded", show_run(app, run["id"])
    step = steps_of(app, run["id"])["a"]
    assert step["attempt"] == 2 and step["interruptions"] == 1
    kinds = [kind for kind, _, _ in events(project)]
    assert kinds.count("START") == 2 and kinds.count("END") == 1


def test_a_retried_register_step_registers_once(app: Appliance, project: Path) -> None:
    """An attempt that registered, then died before reporting: the next attempt finds the
    version instead of registering the run again."""
    from appliance.core.datasets import import_csv
    from appliance.core.jobs import wait_job
    from appliance.core.pipeline_steps import _BODIES, StepContext
    from appliance.core.quickstart import sample_csv
    from appliance.core.training import submit_training

    import_csv(app, sample_csv(), "churn")
    job = wait_job(
        app, submit_training(app, "churn", "churned", params={"num_boost_round": 5})["id"], 120
    )
    assert job["state"] == "succeeded"
    ctx = StepContext(
        app, "r", "p", "register", "register", {"register": job["run_id"], "model": "m"}, None
    )
    first = _BODIES["register"](ctx, lambda event: None)
    again = _BODIES["register"](ctx, lambda event: None)
    assert first == again == {"version": "m@1"}
    assert app.db.scalar("SELECT count(*) FROM model_versions") == 1


TUNE = """
name: slow
train: {script: objective.py, function: slow}
objective: {metric: loss, direction: minimize}
space: {x: {uniform: [0, 1]}}
max_trials: 20
parallel_trials: 2
"""


def test_cancelling_a_tune_step_stops_its_trials(app: Appliance, project: Path) -> None:
    (project / "objective.py").write_text(
        "import time\n\ndef slow(p):\n    time.sleep(30)\n    return p['x']\n"
    )
    (project / "tune.yaml").write_text(TUNE)
    run = run_pipeline(app, write(project, "name: t\nsteps:\n  search: {tune: tune.yaml}\n"))
    deadline = time.monotonic() + 30
    running = 0
    while time.monotonic() < deadline and running < 2:
        running = app.db.scalar(
            "SELECT count(*) FROM jobs WHERE kind = 'tune-function' AND state = 'running'"
        )
        time.sleep(0.1)
    assert running == 2
    cancel_run(app, run["id"])
    assert wait_run(app, run["id"], timeout=30)["state"] == "cancelled"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and app.db.scalar(
        "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')"
    ):
        time.sleep(0.1)
    left = app.db.rows(
        "SELECT id, kind, state, error FROM jobs WHERE state IN ('queued', 'running')"
    )
    assert left == [], (left, app.db.rows("SELECT state, message FROM studies"))
    assert app.db.scalar("SELECT state FROM studies") == "stopped"


def test_control_steps_run_on_this_machine_whatever_executes_the_compute(
    app: Appliance, project: Path
) -> None:
    """On a k3s home a train step's job goes to the cluster, but a register or deploy step
    acts on this home's registry: its job's executor is local."""
    import dataclasses

    from appliance.core.pipeline_steps import StepContext, start_step

    # what a cluster home says; nothing is submitted to a cluster here
    cluster = Appliance(dataclasses.replace(app.settings, executor="k3s"))
    ctx = StepContext(app, "r", "p", "gate", "promote", {"promote": "m@1", "to": "champion"}, None)
    job = start_step(ctx, lambda conn, job_id, run_id: None, {})["job"]
    assert cluster.db.scalar("SELECT executor FROM jobs WHERE id = ?", (job["id"],)) == "local"
    spec = json.loads(cluster.db.scalar("SELECT spec_json FROM jobs WHERE id = ?", (job["id"],)))
    assert spec["kind"] == "pipeline-step" and spec["resources"]["cpu"] == 0
    cluster.close()
