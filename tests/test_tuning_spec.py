"""The tuning study spec: defaults, the clamp of parallel trials, and every bad key named
before anything is created."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.core import datasets
from appliance.core.context import Appliance
from appliance.core.tuning import importance, load_study, parse_study
from appliance.errors import InvalidInput, NotFound


@pytest.fixture
def app(tmp_path: Path) -> Appliance:
    appliance = Appliance.open(tmp_path / "home")
    csv = tmp_path / "churn.csv"
    csv.write_text("a,b,churned\n" + "".join(f"{i},{i % 7},{i % 2}\n" for i in range(50)))
    datasets.import_csv(appliance, csv, "churn_train")
    datasets.import_csv(appliance, csv, "churn_valid")
    return appliance


def study(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "churn-lgbm",
        "train": {
            "trainer": "lightgbm",
            "train": "churn_train",
            "valid": "churn_valid",
            "label": "churned",
        },
        "objective": {"metric": "valid_auc", "direction": "maximize"},
        "algorithm": "tpe",
        "max_trials": 40,
        "parallel_trials": 1,
        "space": {
            "num_leaves": {"randint": [8, 128]},
            "learning_rate": {"loguniform": [0.01, 0.3]},
            "boosting": {"choice": ["gbdt", "dart"]},
        },
        "early_stopping": {"rule": "median", "start_step": 10, "min_trials_required": 5},
    }
    base.update(changes)
    return base


def test_a_study_is_checked_and_completed_with_defaults(app: Appliance, tmp_path: Path) -> None:
    spec = parse_study(app, study())
    assert spec["name"] == "churn-lgbm" and spec["experiment"] == "churn-lgbm"
    assert spec["train"]["train"] == "churn_train@1" and spec["train"]["valid"] == "churn_valid@1"
    assert spec["objective"] == {"metric": "valid_auc", "direction": "maximize", "value": "final"}
    assert (spec["max_failed_trials"], spec["seed"], spec["timeout_s"]) == (3, 0, None)
    assert spec["early_stopping"] == {"rule": "median", "start_step": 10, "min_trials_required": 5}
    clamped = parse_study(app, study(parallel_trials=512))
    assert (
        clamped["parallel_trials"] < 512
        and "parallel_trials: 512 is more" in clamped["warnings"][0]
    )
    grid = parse_study(
        app, study(algorithm="grid", space={"num_leaves": {"randint": [8, 10]}}, max_trials=40)
    )
    assert grid["max_trials"] == 3  # the grid has three points
    path = tmp_path / "tune.yaml"
    path.write_text(
        "name: s\ntrain: {train: churn_train, label: nope}\n"
        "objective: {metric: valid_auc}\nspace: {x: {uniform: [0, 1]}}\n"
    )
    with pytest.raises(
        InvalidInput, match="tune.yaml: train.train: churn_train@1 has no column 'nope'"
    ):
        load_study(app, path)


def test_bad_studies_name_the_key(app: Appliance) -> None:
    cases = [
        (
            study(space={"learning_rate": {"gaussian": [0, 1]}}),
            "space.learning_rate: unknown distribution 'gaussian'",
        ),
        (
            study(space={"learning_rate": {"uniform": [0.3, 0.01]}}),
            "space.learning_rate: uniform needs low < high",
        ),
        (
            study(space={"learning_rate": {"loguniform": [0, 1]}}),
            "space.learning_rate: loguniform needs a positive",
        ),
        (
            study(algorithm="grid", space={"learning_rate": {"uniform": [0, 1]}}),
            "space.learning_rate: grid needs a discrete space",
        ),
        (study(algorithm="bayes"), "algorithm: 'bayes' is not one of"),
        (study(objective={"metric": "auc", "direction": "up"}), "objective.direction: 'up'"),
        (study(objective={"direction": "maximize"}), "objective: required"),
        (study(max_trials=0), "max_trials: expected a whole number >= 1"),
        (study(parallel_trials="2"), "parallel_trials: expected a whole number"),
        (study(early_stopping={"rule": "mean"}), "early_stopping: expected {rule: median"),
        (study(stop={"patience": 0}), "patience: expected a whole number >= 1"),
        (study(stop={"target": "high"}), "stop.target: expected a number"),
        (study(colour="blue"), r"unknown key\(s\) \['colour'\]"),
        (study(name="../x"), "study name"),
        (
            study(train={"train": "churn_train", "label": "churned", "trainer": "xgb"}),
            "train.trainer: 'xgb'",
        ),
        (
            study(train={"train": "churn_train", "label": "churned", "params": {"num_leaves": 4}}),
            r"space: \['num_leaves'\] also fixed in train.params",
        ),
        (study(train={"label": "churned"}), "train.train: required"),
        (study(space={"leaves": {"randint": [2, 9]}}), "space.leaves: not a LightGBM"),
        (
            study(train={"train": "churn_train", "label": "churned", "params": {"leafs": 4}}),
            "train.params: param 'leafs': not a LightGBM parameter",
        ),
        (
            study(train={"train": "churn_train", "label": "churned", "resources": {"cpu": 0}}),
            "train.resources.cpu: expected a positive number",
        ),
        (study(objective={"metric": "auc", "value": "mean"}), "objective.value: 'mean'"),
        (study(train={"script": "missing.py"}), "train.script: missing.py: no such file"),
        (study(experiment="a/b"), "experiment"),
        (
            study(early_stopping={"rule": "median", "min_trials": 2}),
            r"early_stopping: unknown key\(s\) \['min_trials'\]",
        ),
        (
            study(early_stopping={"start_step": -1}),
            "early_stopping.start_step: expected a whole number >= 0",
        ),
        (study(stop={"patience": 0}), "stop.patience: expected a whole number >= 1"),
        (
            study(
                train={"trainer": "mlp", "train": "churn_train", "label": "churned"},
                space={"lr": {"loguniform": [0.001, 0.1]}, "bogus_knob": {"uniform": [0, 1]}},
            ),
            "space.bogus_knob: not an MLP parameter",
        ),
        (
            study(
                train={
                    "trainer": "mlp",
                    "train": "churn_train",
                    "label": "churned",
                    "params": {"epochs": 0},
                },
                space={"lr": {"loguniform": [0.001, 0.1]}},
            ),
            "train.params: epochs",
        ),
    ]
    for spec, needle in cases:
        with pytest.raises(InvalidInput, match=needle):
            parse_study(app, spec)
    with pytest.raises(NotFound, match="nowhere"):
        parse_study(app, study(train={"train": "nowhere", "label": "churned"}))


def test_script_studies_are_checked_without_running_the_script(
    app: Appliance, tmp_path: Path
) -> None:
    script = tmp_path / "objective.py"
    script.write_text(
        "raise SystemExit('never run at submission')\ndef objective(p):\n    return 1\n"
    )
    base = {"objective": {"metric": "loss"}, "space": {"x": {"uniform": [0, 1]}}, "name": "s"}
    spec = parse_study(app, {**base, "train": {"script": str(script), "function": "objective"}})
    assert spec["train"]["function"] == "objective" and not spec["train"]["in_process"]
    cases = [
        ({"script": str(script), "function": "other"}, "defines no function 'other'"),
        ({"script": str(script), "in_process": True}, "train.in_process: true or false, and only"),
        ({"script": str(script), "label": "y"}, r"train: unknown key\(s\) \['label'\]"),
    ]
    for train, needle in cases:
        with pytest.raises(InvalidInput, match=needle):
            parse_study(app, {**base, "train": train})
    broken = tmp_path / "broken.py"
    broken.write_text("def objective(p)\n    return 1\n")
    with pytest.raises(InvalidInput, match="train.script: broken.py line 1"):
        parse_study(app, {**base, "train": {"script": str(broken), "function": "objective"}})
    one = parse_study(
        app,
        {
            **base,
            "parallel_trials": 2,
            "train": {"script": str(script), "function": "objective", "in_process": True},
        },
    )
    assert one["parallel_trials"] == 1 and "one at a time" in one["warnings"][0]
    with pytest.raises(InvalidInput, match="train.timeout: an in-process trial cannot be cut"):
        parse_study(
            app,
            {
                **base,
                "train": {
                    "script": str(script),
                    "function": "objective",
                    "in_process": True,
                    "timeout": 5,
                },
            },
        )


def test_the_median_rule_stops_a_trial_worse_than_the_median_at_the_same_step() -> None:
    from appliance.core.tuning import median_stop

    rule = {"rule": "median", "start_step": 3, "min_trials_required": 3}
    # known curves: completed trials reach 0.5, 0.6 and 0.9 by step 5 (median 0.6)
    completed = [
        {1: 0.2, 3: 0.4, 5: 0.5},
        {1: 0.3, 3: 0.5, 5: 0.6},
        {1: 0.1, 3: 0.8, 5: 0.9},
    ]
    slow = {1: 0.3, 3: 0.52, 5: 0.55}
    assert not median_stop(slow, completed, 2, rule, maximize=True)  # before start_step
    assert not median_stop(slow, completed, 3, rule, maximize=True)  # 0.52 vs median 0.5
    assert median_stop(slow, completed, 5, rule, maximize=True)  # 0.55 vs median 0.6
    assert not median_stop(slow, completed[:2], 5, rule, maximize=True)  # too few completed
    # a mean (0.667) would stop 0.62 here; the median (0.6) does not
    assert not median_stop({5: 0.62}, completed, 5, rule, maximize=True)
    # minimizing a loss: lower is better
    losses = [{4: 1.0}, {4: 2.0}, {4: 3.0}]
    assert median_stop({4: 2.5}, losses, 4, rule, maximize=False)
    assert not median_stop({4: 1.5}, losses, 4, rule, maximize=False)


def test_a_study_stops_on_its_target_or_its_patience() -> None:
    from appliance.core.tuning import study_should_stop

    assert study_should_stop([0.7, 0.8, 0.85], {"target": 0.85}, maximize=True) == (
        "the target 0.85 was reached (0.85)"
    )
    why = study_should_stop([0.7, 0.8, 0.79, None, 0.75], {"patience": 3}, maximize=True)
    assert why == "no improvement in the last 3 trials (best 0.8)"
    assert study_should_stop([0.7, 0.8, 0.79], {"patience": 3}, maximize=True) is None
    assert study_should_stop([3.0, 2.0], {"target": 2.5}, maximize=False) is not None


def test_importance_names_the_parameter_that_drives_the_objective() -> None:
    import random

    from appliance.core.tuning import importance

    rng = random.Random(0)
    trials = []
    for _ in range(40):
        lr, noise, kind = rng.uniform(0, 1), rng.uniform(0, 1), rng.choice(["a", "b"])
        objective = 3 * lr + (0.5 if kind == "b" else 0.0) + 0.01 * noise
        trials.append(
            {"params": {"learning_rate": lr, "noise": noise, "kind": kind}, "objective": objective}
        )
    trials.append(
        {"params": {"learning_rate": 0.5, "noise": 0.5, "kind": "a"}, "objective": None}
    )  # failed
    scores = importance(trials)
    assert abs(sum(scores.values()) - 1) < 1e-9
    assert scores["learning_rate"] > scores["kind"] > scores["noise"]
    assert importance(trials[:2]) == {}


def test_importance_judges_a_nested_option_by_its_level_and_its_own_numbers() -> None:
    import random

    rng = random.Random(0)
    trials = []
    for i in range(40):
        x = rng.random()
        booster = "gbdt" if i % 2 else {"kind": "dart", "drop": rng.random()}
        trials.append({"params": {"x": x, "booster": booster}, "objective": x})
    scores = importance(trials)
    # the objective is x alone: a nested option's noise must not look important
    assert set(scores) == {"x", "booster", "drop"} and scores["x"] > 0.8


def test_importance_gives_a_repeated_value_no_trial_order() -> None:
    ys = [8, 7, 6, 5, 4, 3, 2, 1]
    xs = [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    bs = [1, 1, 1, 2, 1, 1, 1, 1]  # one odd value: next to no rank correlation
    scores = importance(
        [{"params": {"x": x, "b": b}, "objective": y} for x, b, y in zip(xs, bs, ys, strict=True)]
    )
    assert scores["x"] > 0.95 and scores["b"] < 0.05
