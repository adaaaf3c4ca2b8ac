"""Pipeline definitions checked whole before anything runs: the README's example, and every
bad input named by step and key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.core.pipelines import describe, load_pipeline, parse_pipeline
from appliance.errors import InvalidInput

EXAMPLE = """
name: churn-retrain
params: {data: churn, min_gain: 0.002}
steps:
  prep:     {recipe: recipes/clean.sql, inputs: {raw: "${params.data}"}, out: churn_clean}
  split:    {split: "${steps.prep.out}", fractions: [0.7, 0.15, 0.15], stratify: churned}
  tune:     {tune: tune.yaml, train: "${steps.split.train}", valid: "${steps.split.valid}",
             test: "${steps.split.test}", max_trials: 20}
  register: {register: "${steps.tune.best_run}", model: churn}
  gate:     {promote: "${steps.register.version}", to: champion,
             gate: "test_auc >= champion.test_auc + ${params.min_gain}"}
  deploy:   {deploy: churn@champion, name: churn, when: "${steps.gate.promoted}"}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "clean.sql").write_text("SELECT * FROM raw\n")
    (tmp_path / "tune.yaml").write_text("name: t\n")
    (tmp_path / "pipeline.yaml").write_text(EXAMPLE)
    return tmp_path


def _check(project: Path, change: Any = None, *overrides: str) -> Any:
    data = yaml.safe_load(EXAMPLE)
    if change is not None:
        change(data)
    return parse_pipeline(data, "p.yaml", project, overrides)


def test_the_example_checks_and_runs_in_dependency_order(project: Path) -> None:
    pipeline = load_pipeline(project / "pipeline.yaml")
    assert pipeline.name == "churn-retrain"
    assert pipeline.order == ["prep", "split", "tune", "register", "gate", "deploy"]
    assert pipeline.steps["tune"].after == {"split"}
    assert pipeline.steps["deploy"].after == {"gate"}
    assert describe(pipeline)[1] == {
        "step": "split",
        "kind": "split",
        "after": "prep",
        "outputs": "train,valid,test",
    }
    assert pipeline.params == {"data": "churn", "min_gain": 0.002}


def test_parameters_are_typed_by_their_defaults(project: Path) -> None:
    pipeline = _check(project, None, "min_gain=0.01", "data=churn_2026")
    assert pipeline.params == {"data": "churn_2026", "min_gain": 0.01}
    with pytest.raises(InvalidInput, match=r"--param min_gain: expected number like 0.002"):
        _check(project, None, "min_gain=lots")
    with pytest.raises(InvalidInput, match=r"--param epochs: the pipeline has no such parameter"):
        _check(project, None, "epochs=3")


def _set(step: str, key: str, value: Any) -> Any:
    def change(data: dict[str, Any]) -> None:
        if value is None:
            data["steps"][step].pop(key)
        else:
            data["steps"][step][key] = value

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (  # a cycle, named step by step
            _set("prep", "after", ["deploy"]),
            r"steps form a cycle: deploy -> gate -> register -> tune -> split -> prep -> deploy",
        ),
        (
            _set("register", "register", "${steps.tunes.best_run}"),
            r"steps.register.register: \$\{steps.tunes.best_run\}: no step 'tunes'",
        ),
        (
            _set("register", "register", "${steps.tune.best}"),
            r"steps.register.register: \$\{steps.tune.best\}: a tune step has no output 'best'",
        ),
        (  # a reference of the wrong type
            _set("register", "register", "${steps.split.train}"),
            r"steps.register.register: \$\{steps.split.train\}: is a dataset, but register "
            r"takes a run",
        ),
        (
            _set("deploy", "when", "${params.min_gain}"),
            r"steps.deploy.when: \$\{params.min_gain\}: is a number, but when takes a boolean",
        ),
        (
            _set("prep", "inputs", {"raw": "${params.dataset}"}),
            r"steps.prep.inputs: \$\{params.dataset\}: no parameter 'dataset'",
        ),
        (
            _set("gate", "gate", "test_auc >>= champion.test_auc"),
            r"steps.gate.gate: expected a number or ALIAS.METRIC",
        ),
        (_set("prep", "recipe", "recipes/missing.sql"), r"steps.prep.recipe: recipes/missing.sql"),
        (_set("split", "fractions", [0.7, 0.7]), r"steps.split.fractions: expected 2 or 3"),
        (_set("split", "stratiffy", "churned"), r"steps.split.stratiffy: not a key of a split"),
        (_set("register", "model", None), r"steps.register.model: a register step needs it"),
        (_set("deploy", "train", "x"), r"steps.deploy: several action keys \(deploy, train\)"),
        (
            lambda d: d["steps"].update(notify={"email": "ops@example.com"}),
            r"steps.notify: no action key \(email: not a step kind\); a step does exactly one",
        ),
        (_set("tune", "after", ["nothing"]), r"steps.tune.after: no step 'nothing'"),
        (
            lambda d: d["steps"].update({"Bad-Name": {"materialize": "drivers"}}),
            r"step 'Bad-Name': names are lowercase",
        ),
        (lambda d: d.update(params={"min_gain": None}), r"params.min_gain: a default of"),
        (lambda d: d.update(schedule="daily"), r"unknown key\(s\) \['schedule'\]"),
        (lambda d: d.update(name=["a"]), r"name: expected the pipeline's name \(text\)"),
        (_set("tune", "max_trials", "ten"), r"steps.tune.max_trials: expected a number, got 'ten'"),
        (_set("split", "seed", "abc"), r"steps.split.seed: expected a number, got 'abc'"),
        (_set("tune", "timeout", "soon"), r"steps.tune.timeout"),
        (_set("tune", "retries", 99), r"steps.tune.retries: expected a whole number from 0 to 10"),
        (_set("register", "model", 7), r"steps.register.model: expected text, got 7"),
        (_set("split", "seed", 1.5), r"steps.split.seed: expected a whole number from 0"),
        (_set("register", "model", "Bad Name"), r"steps.register.model"),
        (_set("deploy", "when", "not ${steps.gate.promoted}"), r"write the reference alone"),
        (
            lambda d: d["steps"].update(back={"rollback": "churn", "to_revision": 0}),
            r"steps.back.to_revision: expected a whole number from 1",
        ),
        (  # a two-part split has no test part to refer to
            _set("split", "fractions", [0.8, 0.2]),
            r"steps.tune.test: \$\{steps.split.test\}: step 'split' splits in two",
        ),
    ],
)
def test_bad_definitions_are_named_by_step_and_key(
    project: Path, change: Any, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        _check(project, change)


def test_the_cli_validates_a_file(project: Path, cli: Any, home: Path) -> None:
    result = cli(
        "pipelines", "validate", str(project / "pipeline.yaml"), "--json", "--home", str(home)
    )
    assert result.code == 0, result.err
    steps = json.loads(result.out)
    assert [s["step"] for s in steps] == ["prep", "split", "tune", "register", "gate", "deploy"]
    (project / "broken.yaml").write_text(EXAMPLE.replace("${steps.prep.out}", "${steps.prp.out}"))
    result = cli("pipelines", "validate", str(project / "broken.yaml"), "--home", str(home))
    assert result.code == 2
    assert "steps.split.split: ${steps.prp.out}: no step 'prp'" in result.err
    result = cli("pipelines", "validate", str(project / "none.yaml"), "--home", str(home))
    assert result.code == 2 and "no such pipeline file" in result.err


def test_values_given_by_reference_are_checked_when_the_step_runs(project: Path) -> None:
    """A list parameter may give a split's fractions; its values are checked once put in,
    and a negative number in a gate reads as a subtraction."""
    from appliance.core.pipelines import check_values, resolve, tidy_gate

    pipeline = _check(
        project,
        lambda d: (
            d["params"].update(parts=[0.5, 0.5, 0.5]),
            d["steps"]["split"].update(fractions="${params.parts}"),
        ),
        "min_gain=-0.01",
    )
    split = pipeline.steps["split"]
    args = resolve(split.args, pipeline.params, {"prep": {"out": "churn_clean@1"}})
    with pytest.raises(InvalidInput, match=r"steps.split.fractions: expected 2 or 3 fractions"):
        check_values(split, args, "steps.split")
    gate = resolve(pipeline.steps["gate"].args, pipeline.params, {"register": {"version": "x"}})
    assert tidy_gate(gate["gate"]) == "test_auc >= champion.test_auc - 0.01"


def test_list_parameters_keep_their_items_type(project: Path) -> None:
    pipeline = _check(
        project,
        lambda d: (
            d["params"].update(parts=[0.5, 0.5]),
            d["steps"]["split"].update(fractions="${params.parts}"),
            d["steps"]["tune"].pop("test"),
        ),
        "parts=0.8,0.2",
    )
    assert pipeline.params["parts"] == [0.8, 0.2]
    with pytest.raises(InvalidInput, match=r"--param parts: expected numbers separated by"):
        _check(project, lambda d: d["params"].update(parts=[0.5, 0.5]), "parts=a,b")


def test_a_script_takes_a_list_parameter_as_its_inputs(tmp_path: Path) -> None:
    (tmp_path / "s.py").write_text("print(1)\n")
    data = {
        "name": "p",
        "params": {"sets": ["a@1", "b@2"]},
        "steps": {"s": {"script": "s.py", "inputs": "${params.sets}"}},
    }
    assert parse_pipeline(data, "p.yaml", tmp_path).steps["s"].kind == "script"
