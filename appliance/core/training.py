"""Training: submit a LightGBM or MLP job on a dataset version, and the job bodies.

The job bodies (`train_lightgbm`, `train_mlp`) run in the job process: they read the dataset
from the object store by sha256, train, write the model back content-addressed and report
everything as protocol lines. They never open the metadata database.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.core.context import Appliance
from appliance.core.datasets import get_dataset_version
from appliance.core.duck import is_numeric
from appliance.core.jobs import JobSpec, submit_job
from appliance.errors import InvalidInput

Emit = Callable[[dict[str, Any]], None]

DEFAULT_PARAMS: dict[str, Any] = {
    "num_leaves": 31,
    "learning_rate": 0.05,
    "num_boost_round": 200,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.9,
    "valid_fraction": 0.2,
    "seed": 42,
}


def parse_param(text: str) -> tuple[str, Any]:
    """'num_leaves=31' -> ('num_leaves', 31); values are int, float, bool or string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise InvalidInput(f"param {text!r}: expected KEY=VALUE")
    value: Any = raw
    for cast in (int, float):
        try:
            value = cast(raw)
            break
        except ValueError:
            continue
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    return key, value


TRAINERS = ("lightgbm", "mlp")
COMMON_PARAMS = ("valid_fraction", "seed")


def submit_training(
    app: Appliance,
    dataset: str,
    target: str,
    params: dict[str, Any] | None = None,
    features: list[str] | None = None,
    experiment: str = "default",
    name: str | None = None,
    cpus: int = 1,
    trainer: str = "lightgbm",
) -> dict[str, Any]:
    """Validate against the dataset's schema, then submit a training job."""
    if trainer not in TRAINERS:
        raise InvalidInput(f"--trainer {trainer!r}: expected one of {', '.join(TRAINERS)}")
    version = get_dataset_version(app, dataset)
    columns = {c["name"]: c["type"] for c in version["schema"]}
    if target not in columns:
        raise InvalidInput(f"--target {target!r}: not a column of dataset {version['ref']}")
    chosen = features or [c for c in columns if c != target]
    for feature in chosen:
        if feature not in columns:
            raise InvalidInput(f"--feature {feature!r}: not a column of dataset {version['ref']}")
        if feature == target:
            raise InvalidInput(f"--feature {feature!r}: the target cannot be a feature")
    given = dict(params or {})
    if trainer == "lightgbm":
        # Keys beyond DEFAULT_PARAMS pass through to LightGBM as they are.
        merged = {**DEFAULT_PARAMS, **given}
        if not isinstance(merged["num_boost_round"], int) or merged["num_boost_round"] < 1:
            raise InvalidInput("param num_boost_round: must be a positive integer")
    else:
        from appliance.core.mlp import MlpConfig

        common = {k: given.pop(k) for k in COMMON_PARAMS if k in given}
        if "hidden" in given and isinstance(given["hidden"], str):
            given["hidden"] = [int(w) for w in given["hidden"].split("x")]  # 64x32
        try:
            config = MlpConfig.from_params(given)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"param: {exc}") from exc
        merged = {"valid_fraction": 0.2, "seed": config.seed, **common, "mlp": asdict(config)}
    if not isinstance(merged["valid_fraction"], int | float) or not (
        0 < merged["valid_fraction"] < 1
    ):
        raise InvalidInput("param valid_fraction: must be a number between 0 and 1")
    spec = JobSpec(
        kind=f"train-{trainer}",
        inputs={
            "dataset": {
                "ref": version["ref"],
                "sha256": version["sha256"],
                "schema": version["schema"],
            }
        },
        params={**merged, "target": target, "features": chosen},
        resources={"cpu": cpus, "memory": "2Gi", "gpu": 1 if trainer == "mlp" else 0},
    )
    return submit_job(
        app,
        spec,
        experiment=experiment,
        run_name=name or f"{trainer}-{version['name']}",
        inputs=[("DatasetVersion", f"dataset:{version['ref']}")],
    )


def _load_columns(path: Path, names: list[str]) -> dict[str, Any]:
    import duckdb

    con = duckdb.connect()
    try:
        cols = ", ".join('"' + n.replace('"', '""') + '"' for n in names)
        return con.execute(f"SELECT {cols} FROM read_parquet(?)", [str(path)]).fetchnumpy()
    finally:
        con.close()


def build_signature(schema: list[dict[str, str]], features: list[str], data: dict[str, Any]):  # type: ignore[no-untyped-def]
    """Input signature: numeric features as doubles, text features as categories (codes)."""
    import numpy as np

    types = {c["name"]: c["type"] for c in schema}
    signature = []
    columns = []
    for name in features:
        values = data[name]
        # DuckDB's fetchnumpy returns NULLs as masked entries; they must become missing values.
        missing = np.ma.getmaskarray(values)
        raw = np.ma.getdata(values)
        if is_numeric(types[name]):
            signature.append({"name": name, "type": "double"})
            numbers = np.asarray(raw, dtype=np.float64).copy()
            numbers[missing] = np.nan
            columns.append(numbers)
        else:
            texts = [None if m or v is None else str(v) for v, m in zip(raw, missing, strict=True)]
            categories = sorted({t for t in texts if t is not None})
            index = {c: i for i, c in enumerate(categories)}
            signature.append({"name": name, "type": "category", "categories": categories})
            columns.append(
                np.array([index[t] if t is not None else np.nan for t in texts], dtype=np.float64)
            )
    return signature, np.column_stack(columns)


def _auc(y: Any, p: Any) -> float:
    import numpy as np

    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = np.asarray(p)[order]
    # average ranks for ties
    i = 0
    n = len(p)
    while i < n:
        j = i
        while j + 1 < n and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class Prepared:
    """What both trainers start from: the matrix, the label and the split."""

    store: Any
    signature: list[dict[str, Any]]
    x: Any
    y: Any
    objective: str
    labels: list[Any]
    is_valid: Any
    dataset: dict[str, Any]
    target: str
    features: list[str]


def _prepare(spec: JobSpec, emit: Emit, total: int) -> Prepared:
    import numpy as np

    from appliance.config import load_settings
    from appliance.store.objects import open_object_store

    params = spec.params
    target, features = params["target"], params["features"]
    dataset = spec.inputs["dataset"]
    store = open_object_store(load_settings(os.environ.get("APPLIANCE_HOME")))
    emit({"type": "progress", "current": 0, "total": total, "message": "loading data"})
    data = _load_columns(store.get_file(dataset["sha256"]), [*features, target])
    signature, x = build_signature(dataset["schema"], features, data)
    known = ~np.ma.getmaskarray(data[target])
    if not known.all():
        print(f"dropped {int((~known).sum())} rows whose label {target!r} is missing")
        x = x[known]
    y_raw = np.asarray(np.ma.getdata(data[target]))[known]
    labels = sorted({v.item() if hasattr(v, "item") else v for v in y_raw if v is not None})
    if len(labels) == 2:
        objective = "binary"
        y = (y_raw == labels[1]).astype(np.float64)
    else:
        objective = "regression"
        y = y_raw.astype(np.float64)
        labels = []
    rng = np.random.default_rng(int(params["seed"]))
    is_valid = rng.random(len(y)) < float(params["valid_fraction"])
    if not 0 < int(is_valid.sum()) < len(y):
        raise ValueError(
            f"valid_fraction={params['valid_fraction']} leaves an empty training or validation "
            f"split of {len(y)} rows"
        )
    return Prepared(store, signature, x, y, objective, labels, is_valid, dataset, target, features)


def _report_model(
    p: Prepared,
    pred: Any,
    model_path: Path,
    flavor: str,
    steps: int,
    emit: Emit,
    extra_meta: dict[str, Any] | None = None,
) -> None:
    """Final validation metrics, then the model artifact with its signature."""
    import numpy as np

    yv = p.y[p.is_valid]
    final: dict[str, float] = {}
    if p.objective == "binary":
        final["auc"] = _auc(yv, pred)
        prob = np.clip(pred, 1e-15, 1 - 1e-15)
        final["logloss"] = float(-np.mean(yv * np.log(prob) + (1 - yv) * np.log(1 - prob)))
        final["accuracy"] = float(np.mean((pred >= 0.5) == (yv == 1)))
    else:
        final["rmse"] = float(np.sqrt(np.mean((pred - yv) ** 2)))
    final["n_train"] = float((~p.is_valid).sum())
    final["n_valid"] = float(p.is_valid.sum())
    for key, value in final.items():
        if np.isfinite(value):  # AUC is undefined when the validation split has one class
            emit({"type": "metric", "key": key, "value": value, "step": steps})
        else:
            print(f"metric {key} is undefined on this validation split; not recorded")
    stored = p.store.put_file(model_path)
    emit(
        {
            "type": "artifact",
            "name": "model",
            "sha256": stored.sha256,
            "size": stored.size,
            "uri": stored.uri,
            "media_type": f"application/octet-stream; flavor={flavor}",
            "meta": {
                "flavor": flavor,
                "objective": p.objective,
                "labels": p.labels,
                "signature": p.signature,
                "target": p.target,
                "dataset": p.dataset["ref"],
                "metrics": {k: v for k, v in final.items() if np.isfinite(v)},
                **(extra_meta or {}),
            },
        }
    )
    emit({"type": "progress", "current": steps, "total": steps, "message": "done"})


def train_lightgbm(spec: JobSpec, emit: Emit) -> None:
    """The body of a train-lightgbm job: emits progress, metrics and the model artifact."""
    import lightgbm as lgb
    import numpy as np

    params = dict(spec.params)
    rounds = int(params["num_boost_round"])
    p = _prepare(spec, emit, rounds)
    for key in ("target", "features", "num_boost_round", "valid_fraction", "seed"):
        params.pop(key)
    metrics = ["auc", "binary_logloss"] if p.objective == "binary" else ["l2"]
    categorical = [i for i, s in enumerate(p.signature) if s["type"] == "category"]
    lgb_params = {
        "objective": p.objective,
        "metric": metrics,
        "verbosity": -1,
        "seed": int(spec.params["seed"]),
        "num_threads": int(spec.resources.get("cpu", 1) or 1),
        **params,
    }
    train_set = lgb.Dataset(
        p.x[~p.is_valid],
        p.y[~p.is_valid],
        categorical_feature=categorical,
        feature_name=p.features,
        free_raw_data=False,
    )
    valid_set = lgb.Dataset(p.x[p.is_valid], p.y[p.is_valid], reference=train_set)

    def report(env: Any) -> None:
        step = env.iteration + 1
        now = time.time()
        for _, metric, value, _ in env.evaluation_result_list:
            if np.isfinite(value):
                emit(
                    {
                        "type": "metric",
                        "key": f"valid_{metric}",
                        "value": value,
                        "step": step,
                        "timestamp": now,
                    }
                )
        emit({"type": "progress", "current": step, "total": rounds, "message": "boosting"})

    booster = lgb.train(
        lgb_params,
        train_set,
        num_boost_round=rounds,
        valid_sets=[valid_set],
        valid_names=["valid"],
        callbacks=[report],
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "model.txt"
        booster.save_model(str(model_path))
        _report_model(p, booster.predict(p.x[p.is_valid]), model_path, "lightgbm", rounds, emit)


def train_mlp(spec: JobSpec, emit: Emit) -> None:
    """The body of a train-mlp job: a tabular MLP on CUDA when there is one, else the CPU."""
    from appliance.core.mlp import MlpConfig, fit, pick_device

    config = MlpConfig(**spec.params["mlp"])
    p = _prepare(spec, emit, config.epochs)
    if p.objective == "regression" and p.labels == [] and len(set(p.y.tolist())) < 2:
        raise ValueError(f"label {p.target!r} has a single value; nothing to learn")
    device = pick_device()
    print(f"training the MLP on {device}")
    levels = [len(s["categories"]) if s["type"] == "category" else 0 for s in p.signature]

    def on_epoch(report: Any) -> None:
        emit(
            {
                "type": "metric",
                "key": "train_loss",
                "value": report.train_loss,
                "step": report.epoch,
            }
        )
        emit(
            {
                "type": "metric",
                "key": "valid_loss",
                "value": report.valid_loss,
                "step": report.epoch,
            }
        )
        emit(
            {
                "type": "metric",
                "key": "epoch_seconds",
                "value": report.seconds,
                "step": report.epoch,
            }
        )
        emit(
            {
                "type": "progress",
                "current": report.epoch,
                "total": config.epochs,
                "message": f"epoch {report.epoch} on {device}",
            }
        )

    model = fit(
        p.x[~p.is_valid],
        p.y[~p.is_valid],
        p.x[p.is_valid],
        p.y[p.is_valid],
        levels,
        p.objective,
        config,
        device=device,
        on_epoch=on_epoch,
    )
    if model.imputed.get("train") or model.imputed.get("valid"):
        print(f"imputed missing numeric values with the training mean: {model.imputed}")
    emit({"type": "tag", "key": "device", "value": device})
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "model.npz"
        model.save(model_path)
        _report_model(
            p,
            model.predict(p.x[p.is_valid]),
            model_path,
            "mlp",
            config.epochs,
            emit,
            {"imputed": model.imputed, "device": device},
        )
