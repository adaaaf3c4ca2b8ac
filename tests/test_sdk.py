"""Your own script as a job: the sdk's lines become params, metrics, inputs and a model."""

from __future__ import annotations

from pathlib import Path

from appliance.core.context import Appliance

SCRIPT = """
import sys
import duckdb
import lightgbm as lgb
from appliance import sdk

lr = float(sys.argv[1])
sdk.log_param("lr", lr)
path = sdk.input_dataset("points@1")
data = duckdb.sql(f"SELECT x, y, label FROM read_parquet('{path}')").fetchnumpy()
import numpy as np
features = np.column_stack([data["x"], data["y"]])
booster = lgb.train({"objective": "binary", "learning_rate": lr, "verbosity": -1},
                    lgb.Dataset(features, data["label"]), num_boost_round=5)
for step in range(5):
    sdk.log_metric("fake_loss", 1.0 / (step + 1), step=step)
sdk.set_tag("stage", "demo")
sdk.save_model(booster, flavor="lightgbm",
               signature=[{"name": "x", "type": "double"}, {"name": "y", "type": "double"}])
print("done training")
"""


def _points(cli, home: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = ["x,y,label"] + [f"{i % 7},{i % 5},{int(i % 7 > 3)}" for i in range(200)]
    (tmp_path / "p.csv").write_text("\n".join(rows) + "\n")
    assert cli("data", "import", "points", str(tmp_path / "p.csv"), "--home", home).code == 0


def test_script_is_tracked_like_a_built_in(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from appliance.core.lineage import lineage

    home = str(tmp_path / "h")
    _points(cli, home, tmp_path)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    result = cli(
        "run",
        str(script),
        "--input",
        "points@1",
        "--experiment",
        "mine",
        "--wait",
        "--json",
        "--home",
        home,
        "--",
        "0.3",
    )
    assert result.code == 0, result.err
    run = cli("runs", "show", result.json()["run_id"], "--json", "--home", home).json()
    assert run["experiment"] == "mine" and run["status"] == "finished"
    assert run["params"]["lr"] == 0.3 and run["metrics"]["fake_loss"] == 0.2
    assert run["tags"]["stage"] == "demo" and run["tags"]["env.python"]
    assert run["tags"]["script"] == str(script.resolve())
    assert cli("models", "register", "pts", "--run", run["id"], "--home", home).code == 0
    app = Appliance.open(home)
    upstream = {n["ref"] for n in lineage(app, "model:pts@1")["upstream"]}
    assert "dataset:points@1" in upstream
    app.close()


def test_a_script_that_raises_fails_with_its_traceback(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = str(tmp_path / "h")
    script = tmp_path / "boom.py"
    script.write_text(
        "from appliance import sdk\nsdk.log_metric('x', 1)\nraise RuntimeError('no')\n"
    )
    result = cli("run", str(script), "--wait", "--json", "--home", home)
    assert result.code == 1
    job = result.json()
    assert job["state"] == "failed" and "RuntimeError: no" in job["error"]
    logs = cli("jobs", "logs", job["id"], "--home", home).out
    assert "Traceback" in logs
    run = cli("runs", "show", job["run_id"], "--json", "--home", home).json()
    assert run["status"] == "failed" and run["metrics"] == {"x": 1.0}  # what it logged is kept


def test_missing_script_and_input(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = str(tmp_path / "h")
    assert cli("run", str(tmp_path / "nope.py"), "--home", home).code == 2
    script = tmp_path / "s.py"
    script.write_text("print('hi')\n")
    result = cli("run", str(script), "--input", "ghost@1", "--home", home)
    assert result.code == 3 and "ghost@1" in result.err


def test_an_undeclared_input_is_refused_inside_the_job(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = str(tmp_path / "h")
    _points(cli, home, tmp_path)
    script = tmp_path / "reads.py"
    script.write_text("from appliance import sdk\nsdk.input_dataset('points@1')\n")
    result = cli("run", str(script), "--wait", "--json", "--home", home)
    assert result.code == 1 and "--input points@1" in result.json()["error"]
