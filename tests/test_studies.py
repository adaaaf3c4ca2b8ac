"""Tuning studies end to end: trials as child runs with the values they used, the median
rule on curves whose answer is known, failures, the study's own stops, and resume after a
stop, a finished budget, or the driver and the agent killed mid-study."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.core import studies
from appliance.core.context import Appliance
from appliance.core.runs import compare_runs, get_run
from appliance.core.tuning import parse_study
from appliance.errors import Conflict, InvalidInput

OBJECTIVES = """
import time

def quadratic(p):
    return (p["x"] - 1) ** 2 + (p["y"] + 2) ** 2 + abs(p["z"])

def linear_curve(p):
    # value rate * step at steps 1..5: the median rule's answer is known for every trial
    for step in range(1, 6):
        yield p["rate"] * step

def slow_curve(p):
    for step in range(1, 11):
        time.sleep(0.12)
        yield {"score": p["rate"] * step}

def sleepy(p):
    time.sleep(p.get("sleep", 0.6))
    return {"loss": (p["x"] - 1) ** 2}

def fails_when_positive(p):
    if p["x"] > 0:
        raise ValueError(f"x must be negative, got {p['x']:.3f}")
    return p["x"] ** 2

def wrong_metric(p):
    return {"other": 1.0}

def nan_below_half(p):
    return float("nan") if p["x"] < 0.5 else p["x"]

def always_fails(p):
    raise RuntimeError("broken objective")

def exits_when_positive(p):
    import sys
    if p["x"] > 0:
        sys.exit(3)
    return p["x"] ** 2

def kills_its_supervisor(p):
    import os, signal
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(0.3)
    return p["x"]
"""


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "objectives.py"
    path.write_text(OBJECTIVES)
    return path


XYZ = {"x": {"uniform": [-5, 5]}, "y": {"uniform": [-5, 5]}, "z": {"uniform": [-1, 1]}}


def make(app: Appliance, script: Path, function: str, in_process: bool = True, **spec: Any):
    train = {"script": str(script), "function": function, "in_process": in_process}
    data = {
        "name": spec.pop("name", function),
        "train": {**train, "params": spec.pop("fixed", {})},
        "objective": spec.pop("objective", {"metric": "loss", "direction": "minimize"}),
        "space": spec.pop("space", XYZ),
        **spec,
    }
    return parse_study(app, data)


def sleepy_jobs(app: Appliance, script: Path, max_trials: int, parallel: int = 1) -> dict:
    """A study of trials that take 0.6 s each, run as jobs."""
    return make(
        app,
        script,
        "sleepy",
        in_process=False,
        space={"x": {"uniform": [0, 2]}},
        max_trials=max_trials,
        parallel_trials=parallel,
    )


def run_here(app: Appliance, spec: dict[str, Any]) -> dict[str, Any]:
    """Create a study and drive it in this process (the driver's own code path)."""
    study = studies.create_study(app, spec, start=False)
    studies.drive_study(app, study["id"])
    return studies.show_study(app, study["id"])


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_trials_are_child_runs_with_the_values_they_used(app: Appliance, script: Path) -> None:
    space = {
        **XYZ,
        "booster": {
            "choice": ["gbdt", {"kind": {"choice": ["dart"]}, "drop": {"uniform": [0.1, 0.3]}}]
        },
        "leaves": {"randint": [2, 9]},
    }
    shown = run_here(app, make(app, script, "quadratic", space=space, max_trials=25, seed=3))
    assert (shown["state"], shown["trials"], shown["counts"]["succeeded"]) == ("succeeded", 25, 25)
    trials = shown["trial_rows"]
    for t in trials:
        booster = t["params"]["booster"]
        # a choice is the option itself (never an index); a nested option a mapping
        assert booster == "gbdt" or (booster["kind"] == "dart" and 0.1 <= booster["drop"] <= 0.3)
        assert isinstance(t["params"]["leaves"], int) and 2 <= t["params"]["leaves"] <= 9
        expected = (t["params"]["x"] - 1) ** 2 + (t["params"]["y"] + 2) ** 2
        assert t["objective"] == pytest.approx(expected + abs(t["params"]["z"]))
        run = get_run(app, t["run_id"])
        assert run["parent_run_id"] == shown["run_id"] and run["status"] == "finished"
        # the run holds what the function got: a nested option's parameters, flattened
        assert run["params"].get("drop") == (None if booster == "gbdt" else booster["drop"])
    best = min(trials, key=lambda t: t["objective"])
    assert (shown["best_trial"], shown["best_value"]) == (best["number"], best["objective"])
    assert set(shown["importance"]) == {"x", "y", "z", "booster", "drop", "leaves"}
    assert abs(sum(shown["importance"].values()) - 1) < 1e-9
    # the parent run's best-so-far curve never gets worse
    curve = [
        m["value"]
        for m in app.db.rows(
            "SELECT value FROM run_metrics WHERE run_id = ? AND key = 'best_loss' ORDER BY step",
            (shown["run_id"],),
        )
    ]
    assert len(curve) == 25 and curve == sorted(curve, reverse=True)
    compared = compare_runs(app, [trials[0]["run_id"], trials[1]["run_id"]])
    assert any(p["param"] == "x" and p["differs"] for p in compared["params"])


def test_the_median_rule_stops_exactly_the_trials_below_the_median(
    app: Appliance, script: Path
) -> None:
    # Curves are rate * step. After rates 10, 9 and 1 complete, their bests at step 2 are
    # 20, 18 and 2: the median is 18 (the mean would be 13.3). Rate 8 (16 at step 2) is
    # stopped there; rate 9.5 (19) is not, nor later (28.5 vs 27 at step 3 ...).
    spec = make(
        app,
        script,
        "linear_curve",
        objective={"metric": "loss", "direction": "maximize"},
        space={"rate": {"choice": [10, 9, 1, 8, 9.5]}},
        algorithm="grid",
        early_stopping={"rule": "median", "start_step": 2, "min_trials_required": 3},
    )
    shown = run_here(app, spec)
    states = [(t["params"]["rate"], t["state"], t["objective"]) for t in shown["trial_rows"]]
    assert states == [
        (10, "succeeded", 50),
        (9, "succeeded", 45),
        (1, "succeeded", 5),
        (8, "early_stopped", 16),
        (9.5, "succeeded", 47.5),
    ]
    stopped = shown["trial_rows"][3]
    assert "step 2" in stopped["error"] and "median" in stopped["error"]
    assert shown["best_value"] == 50


@pytest.mark.slow
def test_the_median_rule_stops_a_running_trial_job(app: Appliance, script: Path) -> None:
    # The same rule from metrics the trial's job streams: rates 3, 2.5, 2 complete (10
    # steps of 0.12 s); rate 0.5 is stopped mid-way, its job cancelled, its trial kept.
    spec = make(
        app,
        script,
        "slow_curve",
        in_process=False,
        objective={"metric": "score", "direction": "maximize"},
        space={"rate": {"choice": [3, 2.5, 2, 0.5]}},
        algorithm="grid",
        early_stopping={"rule": "median", "start_step": 2, "min_trials_required": 3},
    )
    study = studies.create_study(app, spec)
    done = studies.wait_study(app, study["id"], timeout=60)
    shown = studies.show_study(app, study["id"])
    assert done["state"] == "succeeded", shown
    states = [t["state"] for t in shown["trial_rows"]]
    assert states == ["succeeded", "succeeded", "succeeded", "early_stopped"]
    last = shown["trial_rows"][3]
    assert last["objective"] < 0.5 * 10  # stopped before its last step
    assert 0 < last["duration_s"] < 1.2
    run = get_run(app, last["run_id"])  # once its job ended, the trial agrees with its run
    scores = [
        m["value"]
        for m in app.db.rows(
            "SELECT value FROM run_metrics WHERE run_id = ? AND key = 'score'", (last["run_id"],)
        )
    ]
    assert last["objective"] == max(scores) and run["tags"]["early_stopped"].startswith("step ")
    wait_for(  # its job ends cancelled
        lambda: (
            app.db.scalar("SELECT state FROM jobs WHERE id = ?", (last["job_id"],)) == "cancelled"
        )
    )


def test_failures_are_recorded_and_the_budget_fails_the_study(app: Appliance, script: Path) -> None:
    spec = make(
        app, script, "fails_when_positive", space={"x": {"uniform": [-1, 1]}}, max_trials=40
    )
    failed = run_here(app, {**spec, "max_failed_trials": 2})
    assert failed["state"] == "failed" and failed["counts"]["failed"] == 3
    assert "3 trials failed, more than max_failed_trials (2)" in failed["message"]
    assert "ValueError: x must be negative" in failed["message"]
    bad = [t for t in failed["trial_rows"] if t["state"] == "failed"]
    assert all(t["params"]["x"] > 0 and "x must be negative" in t["error"] for t in bad)
    # with room for them, failures never stop the search nor steer it
    tolerant = run_here(app, {**spec, "max_trials": 30, "max_failed_trials": 30})
    assert tolerant["state"] == "succeeded" and tolerant["trials"] == 30
    assert tolerant["counts"]["failed"] + tolerant["counts"]["succeeded"] == 30
    assert tolerant["best_params"]["x"] <= 0


def test_an_objective_never_reported_fails_the_study_after_one_trial(
    app: Appliance, script: Path
) -> None:
    shown = run_here(app, make(app, script, "wrong_metric", max_trials=10))
    assert shown["state"] == "failed" and shown["trials"] == 1
    assert shown["message"] == (
        "objective.metric 'loss': trial 0 never reported it (it reported other)"
    )


def test_a_target_patience_or_timeout_ends_the_study(app: Appliance, script: Path) -> None:
    target = run_here(app, make(app, script, "quadratic", max_trials=200, stop={"target": 8.0}))
    assert target["state"] == "succeeded" and target["message"].startswith("stopped early")
    assert target["best_value"] <= 8.0 and target["trials"] < 200
    patience = run_here(app, make(app, script, "quadratic", max_trials=200, stop={"patience": 3}))
    assert "no improvement in the last 3 trials" in patience["message"]
    values = [t["objective"] for t in patience["trial_rows"]]
    assert min(values[-3:]) >= min(values[:-3])
    timed = run_here(
        app,
        make(
            app,
            script,
            "sleepy",
            space={"x": {"uniform": [0, 2]}},
            fixed={"sleep": 0.05},
            max_trials=100,
            timeout=0.5,
        ),
    )
    assert timed["message"] == "timeout of 0.5 s reached" and 2 <= timed["trials"] < 20
    # the timeout is the study's whole running time: a resume may only lengthen it
    with pytest.raises(InvalidInput, match="--timeout 0.1: the study has already run"):
        studies.resume_study(app, timed["id"], timeout=0.1, start=False)
    studies.resume_study(app, timed["id"], timeout=1.0, start=False)
    studies.drive_study(app, timed["id"])
    longer = studies.get_study(app, timed["id"])
    assert longer["message"] == "timeout of 1 s reached" and longer["trials"] > timed["trials"]
    assert 1.0 <= longer["elapsed_s"] < 1.5


def test_a_nan_objective_fails_its_trial_not_the_study(app: Appliance, script: Path) -> None:
    space = {"x": {"choice": [0.1, 0.7, 0.2, 0.9]}}
    shown = run_here(app, make(app, script, "nan_below_half", space=space, algorithm="grid"))
    assert (shown["state"], shown["trials"]) == ("succeeded", 4)
    states = [(t["params"]["x"], t["state"]) for t in shown["trial_rows"]]
    assert states == [(0.1, "failed"), (0.7, "succeeded"), (0.2, "failed"), (0.9, "succeeded")]
    assert "objective.metric 'loss' was nan" in shown["trial_rows"][0]["error"]
    assert shown["best_value"] == 0.7


def test_a_function_that_exits_fails_its_trial_not_the_driver(app: Appliance, script: Path) -> None:
    spec = make(
        app,
        script,
        "exits_when_positive",
        space={"x": {"choice": [1, -1, 2, -2]}},
        algorithm="grid",
    )
    shown = run_here(app, spec)
    assert [t["state"] for t in shown["trial_rows"]] == ["failed", "succeeded"] * 2
    assert shown["trial_rows"][0]["error"] == "SystemExit: 3" and shown["state"] == "succeeded"


def test_values_the_trainer_refuses_fail_their_trials(
    app: Appliance, script: Path, tmp_path: Path
) -> None:
    _synthetic(app, tmp_path)
    spec = parse_study(
        app,
        {
            "name": "refused",
            "train": {"trainer": "lightgbm", "train": "tune_train", "label": "label"},
            "objective": {"metric": "valid_auc", "direction": "maximize"},
            "space": {"num_boost_round": {"uniform": [5, 20]}},
            "max_trials": 10,
            "max_failed_trials": 2,
        },
    )
    shown = run_here(app, spec)
    assert shown["state"] == "failed" and shown["trials"] == 3
    assert all(t["state"] == "failed" and t["job_id"] is None for t in shown["trial_rows"])
    assert "refused: param num_boost_round: must be a non-negative integer" in shown["message"]


def test_a_study_whose_every_trial_failed_fails(app: Appliance, script: Path) -> None:
    shown = run_here(app, make(app, script, "always_fails", max_trials=3, max_failed_trials=5))
    assert shown["state"] == "failed" and shown["message"] == "no trial succeeded (3 failed)"


def test_a_finished_study_resumes_only_when_what_ended_it_is_lifted(
    app: Appliance, script: Path
) -> None:
    target = run_here(app, make(app, script, "quadratic", max_trials=200, stop={"target": 8.0}))
    with pytest.raises(Conflict, match="cannot be extended; start a new study"):
        studies.resume_study(app, target["id"], max_trials=400, start=False)
    grid = run_here(
        app,
        make(app, script, "nan_below_half", space={"x": {"choice": [0.6, 0.7]}}, algorithm="grid"),
    )
    with pytest.raises(Conflict, match="cannot be extended"):
        studies.resume_study(app, grid["id"], max_trials=10, start=False)
    failing = make(
        app, script, "fails_when_positive", space={"x": {"uniform": [-1, 1]}}, max_trials=40
    )
    failed = run_here(app, {**failing, "max_failed_trials": 1})
    with pytest.raises(
        Conflict, match=r"resume it with --max-failed-trials 2 or more \(2 failed\)"
    ):
        studies.resume_study(app, failed["id"], max_trials=50, start=False)
    studies.resume_study(app, failed["id"], max_failed_trials=4, start=False)
    studies.drive_study(app, failed["id"])
    again = studies.get_study(app, failed["id"])
    assert again["counts"]["failed"] == 5 and again["trials"] > failed["trials"]
    # a stop that comes after the end changes nothing
    assert not studies._wind_down(app, again["id"], "stopped", "late", "request")
    assert studies.get_study(app, again["id"])["state"] == "failed"


def test_resume_refuses_a_finished_study_unless_its_budget_grows(
    app: Appliance, script: Path
) -> None:
    shown = run_here(app, make(app, script, "quadratic", max_trials=12))
    with pytest.raises(Conflict, match=r"already finished \(succeeded: 12 trials finished\)"):
        studies.resume_study(app, shown["id"], start=False)
    with pytest.raises(InvalidInput, match="already has 12 trials"):
        studies.resume_study(app, shown["id"], max_trials=5, start=False)
    raced = run_here(app, make(app, script, "quadratic", max_trials=3, name="raced"))
    studies.resume_study(app, raced["id"], max_trials=4, start=False)
    with pytest.raises(Conflict, match="is running"):  # the first resume holds it
        studies.resume_study(app, raced["id"], max_trials=5, start=False)
    studies.drive_study(app, raced["id"])  # its driver takes over and ends it
    assert studies.get_study(app, raced["id"])["trials"] == 4
    first = {t["number"]: t["params"] for t in shown["trial_rows"]}
    studies.resume_study(app, shown["id"], max_trials=20, start=False)
    studies.drive_study(app, shown["id"])
    extended = studies.show_study(app, shown["id"])
    assert (extended["state"], extended["trials"]) == ("succeeded", 20)
    assert {t["number"]: t["params"] for t in extended["trial_rows"][:12]} == first


def _kill_group(pid: int | None, known: str | None = None) -> None:
    """SIGKILL the process group of `pid`, if it is still the process recorded (`known`, its
    identity): a pid whose process ended may already be another's, such as a job supervisor
    of a test in another process of the suite, and killing its group would fail that test."""
    from appliance.core.processes import is_same

    if pid and (known is None or is_same(pid, known)):
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_stop_then_resume_runs_the_cut_off_trials_again(app: Appliance, script: Path) -> None:
    spec = sleepy_jobs(app, script, 4, 2)
    study = studies.create_study(app, spec)
    wait_for(lambda: studies.get_study(app, study["id"])["counts"]["running"] == 2)
    stopped = studies.stop_study(app, study["id"])
    assert stopped["state"] == "stopped" and stopped["counts"]["cancelled"] >= 1
    cut = {
        t["number"]: t["params"]
        for t in studies.list_trials(app, study["id"])
        if t["state"] == "cancelled"
    }
    with pytest.raises(Conflict, match="already stopped"):
        studies.stop_study(app, study["id"])
    studies.resume_study(app, study["id"])
    done = studies.wait_study(app, study["id"], timeout=60)
    assert (done["state"], done["trials"], done["counts"]["succeeded"]) == ("succeeded", 4, 4)
    for t in studies.list_trials(app, study["id"]):
        if t["number"] in cut:  # the same values, run again; a stop is no supervisor lost
            assert t["params"] == cut[t["number"]] and (t["attempt"], t["lost"]) == (2, 0)


@pytest.mark.slow
@pytest.mark.parametrize("kill_trials", [False, True], ids=["agent-and-driver", "power-cut"])
def test_resume_after_the_driver_the_agent_and_the_trials_are_killed(
    app: Appliance, script: Path, kill_trials: bool
) -> None:
    """The driver and the agent killed mid-study (their trials' jobs go on and are followed
    by the resumed driver); or, as a power cut would, every process at once (the cut-off
    trials run again). Nothing is lost either way."""
    from appliance.core.agent import agent_status

    spec = sleepy_jobs(app, script, 6, 2)
    study = studies.create_study(app, spec)

    def started() -> list[dict[str, Any]]:
        # trials whose supervisors are up (a job caught between its claim and its supervisor
        # is the job system's case: settled after its claim grace, not tested here)
        return app.db.rows(
            "SELECT t.number, j.pid, j.pid_identity FROM trials t JOIN jobs j ON j.id = t.job_id "
            "WHERE t.study_id = ? AND t.state = 'running' AND j.pid IS NOT NULL",
            (study["id"],),
        )

    wait_for(
        lambda: (
            studies.get_study(app, study["id"])["counts"]["succeeded"] >= 2 and len(started()) == 2
        )
    )
    running = started()
    row = app.db.one("SELECT driver_pid, driver_identity FROM studies WHERE id = ?", (study["id"],))
    assert row is not None
    _kill_group(row["driver_pid"], row["driver_identity"])
    _kill_group(agent_status(app)["pid"])
    if kill_trials:
        for trial in running:
            _kill_group(trial["pid"], trial["pid_identity"])
    wait_for(lambda: studies.get_study(app, study["id"])["state"] == "interrupted")
    before = {t["number"]: t for t in studies.list_trials(app, study["id"])}
    resumed = studies.resume_study(app, study["id"])
    assert resumed["state"] == "running"
    done = studies.wait_study(app, study["id"], timeout=90)
    trials = studies.list_trials(app, study["id"])
    assert (done["state"], len(trials)) == ("succeeded", 6), trials
    assert [t["number"] for t in trials] == list(range(6))
    assert all(t["state"] == "succeeded" for t in trials)
    for trial in running:  # cut off: the same values, run again; else followed to the end
        again = next(t for t in trials if t["number"] == trial["number"])
        assert again["params"] == before[trial["number"]]["params"]
        assert (again["attempt"], again["lost"]) == ((2, 1) if kill_trials else (1, 0))
    with pytest.raises(Conflict, match="already finished"):
        studies.resume_study(app, study["id"])


def _synthetic(app: Appliance, tmp_path: Path) -> None:
    import numpy as np

    from appliance.core import datasets

    rng = np.random.default_rng(0)
    for name, rows in (("tune_train", 1500), ("tune_valid", 500)):
        x = rng.normal(size=(rows, 4))
        y = (x[:, 0] + 0.5 * x[:, 1] ** 2 + rng.normal(scale=0.5, size=rows) > 0.5).astype(int)
        path = tmp_path / f"{name}.csv"
        lines = ["a,b,c,d,label"] + [
            ",".join(f"{v:.5f}" for v in r) + f",{t}" for r, t in zip(x, y, strict=True)
        ]
        path.write_text("\n".join(lines) + "\n")
        datasets.import_csv(app, path, name)


@pytest.mark.slow
def test_a_lightgbm_study_from_the_cli_registers_its_best_trial(
    cli: Any, home: Path, app: Appliance, tmp_path: Path
) -> None:
    _synthetic(app, tmp_path)
    config = tmp_path / "tune.yaml"
    config.write_text(
        """
name: lgbm
train: {trainer: lightgbm, train: tune_train, valid: tune_valid, label: label,
        params: {num_boost_round: 30}}
objective: {metric: valid_auc, direction: maximize}
max_trials: 4
parallel_trials: 2
space:
  num_leaves: {randint: [4, 32]}
  learning_rate: {loguniform: [0.05, 0.3]}
  min_data_in_leaf: {quniform: [5, 60, 5]}
"""
    )
    result = cli("tune", "--config", str(config), "--wait", "--json", "--home", str(home))
    assert result.code == 0, result.err
    study = result.json()
    assert study["state"] == "succeeded" and study["counts"]["succeeded"] == 4
    result = cli("tune", "show", "lgbm", "--json", "--home", str(home))
    assert result.code == 0, result.err
    shown = result.json()
    for t in shown["trial_rows"]:
        run = get_run(app, t["run_id"])
        assert run["params"]["feature_pre_filter"] is False  # min_data_in_leaf varies
        assert run["params"]["num_leaves"] == t["params"]["num_leaves"]
        assert t["objective"] == pytest.approx(run["metrics"]["valid_auc"])
    table = cli("tune", "show", "lgbm", "--home", str(home))
    assert "IMPORTANCE" in table.out and "min_data_in_leaf" in table.out
    registered = cli(
        "tune", "register-best", "lgbm", "--model", "churn", "--json", "--home", str(home)
    )
    assert registered.code == 0, registered.err
    version = registered.json()
    best = next(t for t in shown["trial_rows"] if t["number"] == shown["best_trial"])
    assert version["run_id"] == best["run_id"] and version["trial"] == shown["best_trial"]
    ids = [t["run_id"] for t in shown["trial_rows"][:2]]
    compared = cli("runs", "compare", *ids, "--json", "--home", str(home)).json()
    assert any(m["metric"] == "valid_auc" for m in compared["metrics"])
    # an objective the trainer never reports: the study says so after its first trial
    config.write_text(config.read_text().replace("valid_auc", "valid_auk"))
    wrong = cli("tune", "--config", str(config), "--wait", "--json", "--home", str(home))
    assert wrong.code == 1
    message = json.loads(wrong.out)["message"]
    assert "objective.metric 'valid_auk'" in message and "valid_auc" in message


def test_bad_studies_are_refused_by_the_cli_and_create_nothing(
    cli: Any, home: Path, app: Appliance, tmp_path: Path, script: Path
) -> None:
    config = tmp_path / "study.yaml"
    cases = {
        "x: {gaussian: [0, 1]}": "study.yaml: space.x: unknown distribution 'gaussian'",
        "x: {uniform: [1, 1]}": "space.x: uniform needs low < high",
        "x: {loguniform: [0, 1]}": "space.x: loguniform needs a positive low bound",
    }
    for space, message in cases.items():
        config.write_text(
            f"name: bad\ntrain: {{script: objectives.py, function: quadratic}}\n"
            f"objective: {{metric: loss}}\nspace:\n  {space}\n"
        )
        result = cli("tune", "--config", str(config), "--home", str(home))
        assert result.code != 0 and message in result.err, result.err
    config.write_text(
        "name: bad\ntrain: {script: objectives.py, function: quadratic}\n"
        "objective: {metric: loss}\nalgorithm: grid\nspace:\n  x: {uniform: [0, 1]}\n"
    )
    result = cli("tune", "--config", str(config), "--home", str(home))
    assert "space.x: grid needs a discrete space" in result.err
    config.write_text(
        "name: bad\ntrain: {script: objectives.py, function: nowhere}\n"
        "objective: {metric: loss}\nspace:\n  x: {uniform: [0, 1]}\n"
    )
    result = cli("tune", "--config", str(config), "--home", str(home))
    assert "train.function: objectives.py defines no function 'nowhere'" in result.err
    assert app.db.scalar("SELECT count(*) FROM studies") == 0
    assert app.db.scalar("SELECT count(*) FROM runs") == 0
    missing = cli("tune", "resume", "nope", "--home", str(home))
    assert missing.code != 0 and "study 'nope' not found" in missing.err


@pytest.mark.slow
def test_a_script_study_runs_each_trial_as_a_command_job(app: Appliance, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\n"
        "from appliance import sdk\n"
        "p = sdk.params({'x': 0.0})\n"
        "if p['x'] > 1.5:\n"
        "    sys.exit(f'x={p[\"x\"]:.2f} is out of range')\n"
        "for step in range(1, 4):\n"
        "    sdk.log_metric('loss', (p['x'] - 1) ** 2 + 1 / step, step=step)\n"
    )
    spec = parse_study(
        app,
        {
            "name": "scripted",
            "train": {"script": str(script)},
            "objective": {"metric": "loss", "direction": "minimize"},
            "space": {"x": {"uniform": [0, 2]}},
            "max_trials": 6,
            "parallel_trials": 2,
            "max_failed_trials": 6,
        },
    )
    study = studies.create_study(app, spec)
    done = studies.wait_study(app, study["id"], timeout=90)
    trials = studies.list_trials(app, study["id"])
    assert done["state"] == "succeeded" and len(trials) == 6
    for t in trials:
        job = app.db.one("SELECT kind FROM jobs WHERE id = ?", (t["job_id"],))
        assert job == {"kind": "command"}
        if t["params"]["x"] > 1.5:
            assert t["state"] == "failed" and "is out of range" in t["error"]
        else:  # the final value: the last step's
            assert t["objective"] == pytest.approx((t["params"]["x"] - 1) ** 2 + 1 / 3)


@pytest.mark.slow
def test_a_trial_job_cancelled_from_outside_is_kept_and_runs_again_on_resume(
    app: Appliance, script: Path
) -> None:
    from appliance.core.jobs import cancel_job

    spec = sleepy_jobs(app, script, 3)
    study = studies.create_study(app, spec)
    wait_for(lambda: studies.get_study(app, study["id"])["counts"]["running"] == 1)
    first = studies.list_trials(app, study["id"])[0]
    wait_for(
        lambda: app.db.scalar("SELECT pid FROM jobs WHERE id = ?", (first["job_id"],)) is not None
    )
    cancel_job(app, first["job_id"])
    done = studies.wait_study(app, study["id"], timeout=60)
    assert done["state"] == "succeeded"
    assert done["message"] == "2 trials finished, 1 cancelled (resume runs them again)"
    cut = studies.list_trials(app, study["id"])[0]
    assert cut["state"] == "cancelled" and "its job was cancelled" in cut["error"]
    studies.resume_study(app, study["id"])  # finished, but with a trial to run again
    again = studies.wait_study(app, study["id"], timeout=60)
    trials = studies.list_trials(app, study["id"])
    assert again["state"] == "succeeded" and [t["state"] for t in trials] == ["succeeded"] * 3
    assert trials[0]["attempt"] == 2 and trials[0]["params"] == first["params"]


@pytest.mark.slow
def test_job_trials_that_report_nan_or_kill_their_supervisor_fail_alone(
    app: Appliance, tmp_path: Path, script: Path
) -> None:
    nan_script = tmp_path / "nan.py"
    nan_script.write_text(
        "from appliance import sdk\n"
        "p = sdk.params()\n"
        "sdk.log_metric('loss', 0.5, step=1)\n"  # a finite value first: still diverged
        "sdk.log_metric('loss', float('nan') if p['x'] < 0.5 else p['x'], step=2)\n"
    )
    spec = parse_study(
        app,
        {
            "name": "nan-script",
            "train": {"script": str(nan_script)},
            "objective": {"metric": "loss"},
            "algorithm": "grid",
            "space": {"x": {"choice": [0.1, 0.7]}},
        },
    )
    study = studies.create_study(app, spec)
    done = studies.wait_study(app, study["id"], timeout=60)
    trials = studies.list_trials(app, study["id"])
    assert done["state"] == "succeeded" and [t["state"] for t in trials] == ["failed", "succeeded"]
    assert trials[0]["error"] == "objective.metric 'loss' was nan at step 2"
    # a trial that kills its own supervisor is run again, but not for ever
    killer = make(
        app,
        script,
        "kills_its_supervisor",
        in_process=False,
        space={"x": {"choice": [1.0]}},
        algorithm="grid",
    )
    study = studies.create_study(app, killer)
    done = studies.wait_study(app, study["id"], timeout=90)
    (trial,) = studies.list_trials(app, study["id"])
    assert trial["state"] == "failed" and trial["attempt"] == studies.MAX_LOST
    assert "supervisor process disappeared" in trial["error"] and done["state"] == "failed"


@pytest.mark.slow
def test_an_in_process_study_killed_keeps_the_time_it_ran(app: Appliance, script: Path) -> None:
    spec = make(
        app,
        script,
        "sleepy",
        space={"x": {"uniform": [0, 2]}},
        fixed={"sleep": 0.1},
        max_trials=500,
        timeout=60,
    )
    study = studies.create_study(app, spec)
    wait_for(lambda: studies.get_study(app, study["id"])["trials"] >= 12)
    row = app.db.one("SELECT driver_pid, driver_identity FROM studies WHERE id = ?", (study["id"],))
    assert row is not None
    _kill_group(row["driver_pid"], row["driver_identity"])
    wait_for(lambda: studies.get_study(app, study["id"])["state"] == "interrupted")
    assert studies.get_study(app, study["id"])["elapsed_s"] >= 0.6
