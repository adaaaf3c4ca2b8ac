"""The tabular MLP: numpy serving equals torch, pickle-free files, determinism, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.core.mlp import MlpConfig, MlpModel, _build, fit

LEVELS = [0, 0, 0, 4]


def _data(rows: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.column_stack([rng.normal(size=(rows, 3)), rng.integers(0, 4, rows)]).astype(float)
    logit = 2 * x[:, 0] - x[:, 1] + (x[:, 3] == 2) * 1.5
    y = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(float)
    return x, y


def _fit(objective: str = "binary", **overrides) -> MlpModel:  # type: ignore[no-untyped-def]
    x, y = _data()
    if objective == "regression":
        y = x[:, 0] * 3 + x[:, 1]
    if objective == "multiclass":
        y = (x[:, 3] % 3).astype(float)
    config = MlpConfig(hidden=[16, 8], epochs=5, batch_size=64, **overrides)
    classes = 3 if objective == "multiclass" else 2
    return fit(
        x[:500], y[:500], x[500:], y[500:], LEVELS, objective, config, classes=classes, device="cpu"
    )


def test_numpy_forward_matches_torch() -> None:
    import torch

    model = _fit()
    net = _build(model.layout, model.config, 1)
    net.load_state_dict({k: torch.as_tensor(v) for k, v in model.weights.items()})
    net.eval()
    x, _ = _data(50, seed=1)
    num, cat, _ = model.layout.transform(x)
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.as_tensor(num), torch.as_tensor(cat)))[:, 0].numpy()
    assert np.allclose(model.predict(x), expected, atol=1e-5)


def test_saved_model_loads_without_pickle_and_predicts_the_same(tmp_path: Path) -> None:
    model = _fit()
    path = tmp_path / "m.npz"
    model.save(path)
    with np.load(path, allow_pickle=False) as data:  # would raise on any pickled object
        assert "header" in data.files
    x, _ = _data(40, seed=2)
    assert np.array_equal(MlpModel.load(path).predict(x), model.predict(x))


def test_cpu_training_is_deterministic_with_a_seed() -> None:
    a, b = _fit(seed=3), _fit(seed=3)
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)
    c = _fit(seed=4)
    assert not all(np.array_equal(a.weights[k], c.weights[k]) for k in a.weights)


def test_missing_and_unseen_values_are_imputed() -> None:
    model = _fit()
    x, _ = _data(10, seed=5)
    x[0, 0] = np.nan
    x[1, 3] = 99  # an unseen category
    x[2, 3] = np.nan
    assert np.isfinite(model.predict(x)).all()
    _, _, imputed = model.layout.transform(x)
    assert imputed == 1


def test_regression_and_multiclass() -> None:
    x, _ = _data(20, seed=6)
    assert _fit("regression").predict(x).shape == (20,)
    probs = _fit("multiclass").predict(x)
    assert probs.shape == (20, 3) and np.allclose(probs.sum(axis=1), 1)


def test_bad_config_names_the_key() -> None:
    with pytest.raises(ValueError, match="layers"):
        MlpConfig.from_params({"layers": 3})
    with pytest.raises(ValueError, match="dropout"):
        MlpConfig.from_params({"dropout": 1.5})


@pytest.mark.slow
def test_mlp_job_end_to_end(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from appliance.core.context import Appliance
    from appliance.core.inference import ModelRuntime
    from appliance.core.registry import get_model_version

    home = str(tmp_path / "h")
    x, y = _data(800)
    lines = ["a,b,c,kind,label"] + [
        f"{r[0]},{r[1]},{'' if i % 50 == 0 else r[2]},k{int(r[3])},{int(t)}"
        for i, (r, t) in enumerate(zip(x, y, strict=True))
    ]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    assert cli("data", "import", "d", str(tmp_path / "d.csv"), "--home", home).code == 0
    bad = cli(
        "jobs",
        "train",
        "--dataset",
        "d",
        "--target",
        "label",
        "--trainer",
        "mlp",
        "--param",
        "layers=3",
        "--home",
        home,
    )
    assert bad.code == 2 and "layers" in bad.err
    job = cli(
        "jobs",
        "train",
        "--dataset",
        "d",
        "--target",
        "label",
        "--trainer",
        "mlp",
        "--param",
        "epochs=15",
        "--param",
        "hidden=32x16",
        "--wait",
        "--json",
        "--home",
        home,
    )
    assert job.code == 0, job.err
    run = cli("runs", "show", job.json()["run_id"], "--json", "--home", home).json()
    assert run["metrics"]["auc"] > 0.8 and run["tags"]["device"] == "cpu"
    assert run["outputs"][0]["meta"]["imputed"]["train"] > 0  # the blank 'c' values
    history = cli("runs", "metrics", run["id"], "valid_loss", "--json", "--home", home).json()
    assert len(history) >= 2  # per-epoch metrics
    assert cli("models", "register", "m", "--run", run["id"], "--home", home).code == 0
    app = Appliance.open(home)
    mv = get_model_version(app, "m@1")
    runtime = ModelRuntime(mv, str(app.objects.get_file(mv["sha256"])))
    preds = runtime.predict(
        {"a": [2.0, -2.0], "b": [0.0, 0.0], "c": [0.0, None], "kind": ["k2", "k0"]}
    )
    assert preds[0] > preds[1]
    app.close()


def test_missing_and_unseen_levels_share_a_zero_embedding() -> None:
    model = _fit()
    assert not model.weights["embeddings.0.weight"][0].any()  # padding row stays zero
    x, _ = _data(2, seed=7)
    x[0, 3], x[1, 3] = np.nan, 42  # missing, unseen
    x[1, :3] = x[0, :3]
    preds = model.predict(x)
    assert preds[0] == preds[1]
