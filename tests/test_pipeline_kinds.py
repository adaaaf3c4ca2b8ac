"""Every step kind in a real run: import, validate, split (two parts), train, register,
evaluate, promote, deploy, rollback, features training_set and materialize; and a failing
validation stopping what depends on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.core import features
from appliance.core.context import Appliance
from appliance.core.deployments import get_deployment
from appliance.core.pipeline_runs import run_pipeline, show_run, wait_run
from appliance.core.registry import get_model_version
from tests.test_features import DEFINITIONS, ENTITIES, STATS

ROWS = "id,x,z,y\n" + "".join(f"{i},{i % 7},{(i * 3) % 5},{int(i % 7 > 3)}\n" for i in range(400))

TABULAR = """
name: kinds
params: {csv: data.csv}
steps:
  load:     {import: "${params.csv}", name: sales}
  check:    {validate: "${steps.load.out}", checks: checks.yaml}
  split:    {split: "${steps.load.out}", fractions: [0.8, 0.2], seed: 1, after: check}
  train_a:  {train: "${steps.split.train}", valid: "${steps.split.valid}", label: y,
             features: [x, z], params: {num_boost_round: 5}}
  train_b:  {train: "${steps.split.train}", label: y, features: [x, z],
             params: {num_boost_round: 8}}
  reg_a:    {register: "${steps.train_a.run}", model: m}
  reg_b:    {register: "${steps.train_b.run}", model: m, after: reg_a}
  score:    {evaluate: "${steps.reg_a.version}", data: "${steps.split.valid}"}
  prod:     {promote: "${steps.reg_a.version}", to: prod}
  first:    {deploy: "${steps.prod.version}", name: kinds}
  second:   {deploy: "${steps.reg_b.version}", name: kinds, after: first}
  back:     {rollback: "${steps.second.deployment}"}
"""


def _steps(app: Appliance, run_id: str) -> dict[str, dict[str, Any]]:
    return {s["step"]: s for s in show_run(app, run_id)["steps_detail"]}


def test_the_lifecycle_kinds_run_as_steps(app: Appliance, tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text(ROWS)
    (tmp_path / "checks.yaml").write_text("checks:\n  - not_null: [x, y]\n")
    (tmp_path / "pipeline.yaml").write_text(TABULAR)
    run = wait_run(app, run_pipeline(app, tmp_path / "pipeline.yaml")["id"], timeout=180)
    steps = _steps(app, run["id"])
    assert run["state"] == "succeeded", {n: s["error"] for n, s in steps.items()}
    assert steps["load"]["outputs"] == {"out": "sales@1"}
    assert steps["check"]["outputs"] == {"passed": True}
    assert steps["split"]["outputs"] == {
        "train": "sales_train@1",
        "valid": "sales_valid@1",
        "test": None,
    }
    assert steps["reg_a"]["outputs"] == {"version": "m@1"}
    assert steps["reg_b"]["outputs"] == {"version": "m@2"}
    assert get_model_version(app, "m@prod")["ref"] == "m@1"
    score = app.db.scalar(
        "SELECT value FROM run_metrics WHERE run_id = ? AND key = 'candidate.auc'",
        (steps["score"]["outputs"]["run"],),
    )
    assert score is not None and 0 <= score <= 1
    assert steps["first"]["outputs"]["revision"] == 1
    assert steps["second"]["outputs"]["revision"] == 2
    assert steps["back"]["outputs"] == {"revision": 3}
    dep = get_deployment(app, "kinds")
    assert (dep["current_revision"], dep["model_version"], dep["status"]) == (3, 1, "serving")

    # the same again: reproducible steps are cached, live ones (rollback) run again
    again = wait_run(app, run_pipeline(app, tmp_path / "pipeline.yaml")["id"], timeout=180)
    steps = _steps(app, again["id"])
    assert steps["train_a"]["state"] == steps["reg_a"]["state"] == "cached"
    # `second` must serve m@2 again (the deployment serves m@1 since the rollback: its
    # cached result no longer holds), and the rollback runs again: back to m@1
    assert steps["first"]["state"] == "cached"
    assert steps["second"]["state"] == "succeeded" and "no longer holds" in steps["second"]["why"]
    assert steps["back"]["state"] == "succeeded"
    assert steps["back"]["why"] == "a rollback step always runs"
    assert get_deployment(app, "kinds")["model_version"] == 1


def test_a_failing_validation_stops_what_depends_on_it(app: Appliance, tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text(ROWS.replace("\n5,5,0,1\n", "\n5,,0,1\n"))
    (tmp_path / "checks.yaml").write_text("checks:\n  - not_null: [x, y]\n")
    (tmp_path / "pipeline.yaml").write_text(TABULAR)
    run = wait_run(app, run_pipeline(app, tmp_path / "pipeline.yaml")["id"], timeout=120)
    assert run["state"] == "failed"
    steps = _steps(app, run["id"])
    assert steps["check"]["state"] == "failed"
    assert "steps.check.checks: sales@1 fails 1 check(s) of checks.yaml" in run["error"]
    assert steps["split"]["state"] == "pending" and steps["load"]["state"] == "succeeded"


FEATURES = """
name: features
steps:
  online:   {materialize: all}
  set:      {training_set: driver_model, entities: rides, out: driver_train}
  train:    {train: "${steps.set.out}", label: label, params: {num_boost_round: 3,
             min_data_in_leaf: 1}, features: [conv_rate, trips]}
"""


def test_feature_steps_write_a_training_set_and_the_online_store(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.core.datasets import import_csv
    from appliance.core.online import get_online_features

    for name, text in (("driver_stats", STATS), ("rides", ENTITIES)):
        path = tmp_path / f"{name}.csv"
        path.write_text(text)
        import_csv(app, path, name)
    folder = tmp_path / "defs"
    folder.mkdir()
    (folder / "features.yaml").write_text(DEFINITIONS.replace("TTL", "1000d"))
    features.apply(app, folder)
    (tmp_path / "pipeline.yaml").write_text(FEATURES)
    run = wait_run(app, run_pipeline(app, tmp_path / "pipeline.yaml")["id"], timeout=120)
    steps = _steps(app, run["id"])
    assert run["state"] == "succeeded", {n: s["error"] for n, s in steps.items()}
    assert steps["set"]["outputs"] == {"out": "driver_train@1"}
    assert steps["online"]["why"] == "a materialize step always runs"
    online = get_online_features(app, "driver_model", {"driver_id": [1]}, now=1.8e9)
    assert [r["values"] for r in online["results"]] == [[1], [0.2], [20]]
