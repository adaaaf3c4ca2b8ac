"""`appliance train`: explicit splits, objectives, final metrics by split, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _write(tmp_path: Path, name: str, rows: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def splits(cli, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    """A 3-class problem with a numeric target too, split into train/valid/test."""
    home = str(tmp_path / "h")
    rng = np.random.default_rng(0)
    rows = ["a,b,kind,cls,amount"]
    for i in range(1500):
        a, b = rng.normal(), rng.normal()
        kind = "xyz"[i % 3]
        cls = "low" if a < -0.4 else ("mid" if a < 0.4 else "high")
        amount = 3 * a - b + (kind == "x") + rng.normal() * 0.1
        rows.append(f"{a if i % 97 else ''},{b},{kind},{cls},{amount}")
    source = _write(tmp_path, "d.csv", rows)
    assert cli("data", "import", "d", str(source), "--home", home).code == 0
    assert (
        cli("data", "split", "d", "--fractions", "0.6,0.2,0.2", "--seed", "1", "--home", home).code
        == 0
    )
    return home


def _train(cli, home: str, *args: str):  # type: ignore[no-untyped-def]
    result = cli(
        "train",
        "--train",
        "d_train",
        "--valid",
        "d_valid",
        "--test",
        "d_test",
        "--wait",
        "--json",
        "--home",
        home,
        *args,
    )
    assert result.code == 0, result.err
    out = result.json()
    assert set(out) >= {"run_id", "job_id"}
    return cli("runs", "show", out["run_id"], "--json", "--home", home).json()


def test_lightgbm_multiclass_with_test_metrics(cli, splits: str) -> None:  # type: ignore[no-untyped-def]
    run = _train(
        cli, splits, "--label", "cls", "--feature", "a", "--feature", "b", "--feature", "kind"
    )
    m = run["metrics"]
    assert run["status"] == "finished"
    assert m["test_accuracy"] > 0.9 and m["valid_accuracy"] > 0.9
    assert {"test_logloss", "test_f1", "test_precision", "test_recall"} <= set(m)
    meta = run["outputs"][0]["meta"]
    assert meta["objective"] == "multiclass" and meta["labels"] == ["high", "low", "mid"]
    assert max(meta["feature_importance_gain"], key=meta["feature_importance_gain"].get) == "a"


def test_mlp_regression_from_a_config_file(cli, splits: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = _write(
        tmp_path,
        "train.yaml",
        [
            "trainer: mlp",
            "label: amount",
            "objective: regression",
            "features: [a, b, kind]",
            "params: {epochs: 40, hidden: [32, 16], lr: 0.01}",
        ],
    )
    run = _train(cli, splits, "--config", str(config))
    m = run["metrics"]
    assert m["test_r2"] > 0.8 and m["test_rmse"] > 0 and "test_mae" in m
    assert run["outputs"][0]["meta"]["imputed"]["train"] > 0  # blank 'a' values, imputed


def test_bad_training_input(cli, splits: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = splits
    missing = cli("train", "--train", "d_train", "--label", "nope", "--home", home)
    assert missing.code == 2 and "'nope'" in missing.err
    no_train = cli("train", "--label", "cls", "--home", home)
    assert no_train.code == 2 and "--train" in no_train.err
    bad_key = _write(tmp_path, "bad.yaml", ["trainer: mlp", "lables: cls"])
    result = cli("train", "--config", str(bad_key), "--home", home)
    assert result.code == 2 and "'lables'" in result.err
    bad_param = cli(
        "train",
        "--trainer",
        "mlp",
        "--train",
        "d_train",
        "--label",
        "cls",
        "--param",
        "dropout=2",
        "--home",
        home,
    )
    assert bad_param.code == 2 and "dropout" in bad_param.err
    one_class = cli(
        "train",
        "--train",
        "d_train",
        "--label",
        "kind",
        "--objective",
        "binary",
        "--wait",
        "--home",
        home,
    )
    assert one_class.code == 1 and "binary objective needs exactly 2" in one_class.err


def test_evaluate_against_hand_computed_values() -> None:
    from appliance.core.training import evaluate

    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    m = evaluate("binary", y, p)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["auc"] == pytest.approx(5 / 6)
    # Macro averages skip classes that occur in neither the truth nor the predictions.
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    multi = evaluate("multiclass", np.array([0, 1]), probs, classes=3)
    assert multi["accuracy"] == 1.0 and multi["f1"] == 1.0
    reg = evaluate("regression", np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert reg["r2"] == pytest.approx(0.5) and reg["mae"] == pytest.approx(1 / 3)


def test_multiclass_model_serves_class_probabilities(cli, splits: str) -> None:  # type: ignore[no-untyped-def]
    import json
    import urllib.request

    run = _train(cli, splits, "--label", "cls", "--feature", "a", "--feature", "kind")
    assert cli("models", "register", "tri", "--run", run["id"], "--home", splits).code == 0
    dep = cli("deployments", "create", "tri", "--model", "tri@1", "--json", "--home", splits)
    url = dep.json()["url"]
    try:
        with urllib.request.urlopen(f"{url}/v2/models/tri", timeout=10) as response:
            meta = json.loads(response.read())
        assert meta["outputs"][0]["shape"] == [-1, 3]
        assert json.loads(meta["parameters"]["labels"]) == ["high", "low", "mid"]
        body = {
            "inputs": [
                {"name": "a", "shape": [2], "datatype": "FP64", "data": [2.0, -2.0]},
                {"name": "kind", "shape": [2], "datatype": "BYTES", "data": ["x", "y"]},
            ]
        }
        request = urllib.request.Request(
            f"{url}/v2/models/tri/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            out = json.loads(response.read())["outputs"][0]
        assert out["shape"] == [2, 3] and len(out["data"]) == 6
        first, second = out["data"][:3], out["data"][3:]
        assert first.index(max(first)) == 0 and second.index(max(second)) == 1  # high, low
    finally:
        cli("deployments", "stop", "tri", "--home", splits)


def test_parameter_mistakes_are_named(cli, splits: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = ["train", "--train", "d_train", "--label", "cls", "--home", splits]
    for params, needle in [
        (["--param", "num_leavs=3"], "'num_leavs'"),
        (["--param", "learning_rate=abc"], "learning_rate"),
        (["--trainer", "mlp", "--param", "epochs=2.5"], "epochs"),
        (["--trainer", "mlp", "--param", "lr=nan"], "lr"),
        (["--trainer", "mlp", "--param", "hidden=64,32"], "hidden"),
    ]:
        result = cli(*base, *params)
        assert result.code == 2 and needle in result.err, (params, result.err)
    config = _write(tmp_path, "c.yaml", ["cpus: abc"])
    result = cli(*base, "--config", str(config))
    assert result.code == 2 and "'cpus'" in result.err


def test_run_delete_leaves_nothing_behind(cli, splits: str) -> None:  # type: ignore[no-untyped-def]
    from appliance.core.context import Appliance

    run = _train(cli, splits, "--label", "cls", "--feature", "a", "--param", "num_boost_round=5")
    assert cli("runs", "delete", run["id"], "--home", splits).code == 0
    app = Appliance.open(splits)
    assert app.db.scalar("SELECT count(*) FROM jobs WHERE id = ?", (run["job_id"],)) == 0
    assert (
        app.db.scalar(
            "SELECT count(*) FROM lineage_executions WHERE ref = ?", (f"run:{run['id']}",)
        )
        == 0
    )
    app.close()


def test_nan_and_inf_features_train_on_both_trainers(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """LightGBM takes NaN and ±inf as it does natively; the MLP imputes them and says so."""
    home = str(tmp_path / "h")
    rng = np.random.default_rng(2)
    rows = ["a,b,y"]
    for i in range(600):
        a, b = rng.normal(), rng.normal()
        shown = "" if i % 11 == 0 else ("inf" if i % 13 == 0 else ("-inf" if i % 17 == 0 else a))
        rows.append(f"{shown},{b},{int(a + b > 0)}")
    source = _write(tmp_path, "d.csv", rows)
    assert cli("data", "import", "d", str(source), "--home", home).code == 0
    for trainer in ("lightgbm", "mlp"):
        result = cli(
            "train", "--trainer", trainer, "--train", "d", "--label", "y",
            "--param", "epochs=3" if trainer == "mlp" else "num_boost_round=20",
            "--home", home, "--json", "--wait",
        )  # fmt: skip
        assert result.code == 0, result.err
        run = cli("runs", "show", result.json()["run_id"], "--home", home, "--json").json()
        assert run["status"] == "finished" and run["metrics"]["valid_auc"] > 0.6
        log = cli("jobs", "logs", result.json()["job_id"], "--home", home).out
        if trainer == "mlp":
            assert "imputed missing numeric values with the training mean" in log
