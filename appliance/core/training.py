"""Training: submit a LightGBM job on a dataset version, and the job body that runs it.

The job body (`train_lightgbm`) runs in the job process: it reads the dataset from the object
store by sha256, trains, writes the model back content-addressed and reports everything as
protocol lines. It never opens the metadata database.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
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


def submit_training(
    app: Appliance,
    dataset: str,
    target: str,
    params: dict[str, Any] | None = None,
    features: list[str] | None = None,
    experiment: str = "default",
    name: str | None = None,
    cpus: int = 1,
) -> dict[str, Any]:
    """Validate against the dataset's schema, then submit a train-lightgbm job."""
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
    merged = {**DEFAULT_PARAMS, **(params or {})}
    # Keys beyond DEFAULT_PARAMS pass through to LightGBM as they are.
    if not isinstance(merged["num_boost_round"], int) or merged["num_boost_round"] < 1:
        raise InvalidInput("param num_boost_round: must be a positive integer")
    if not isinstance(merged["valid_fraction"], int | float) or not (
        0 < merged["valid_fraction"] < 1
    ):
        raise InvalidInput("param valid_fraction: must be a number between 0 and 1")
    spec = JobSpec(
        kind="train-lightgbm",
        inputs={
            "dataset": {
                "ref": version["ref"],
                "sha256": version["sha256"],
                "schema": version["schema"],
            }
        },
        params={**merged, "target": target, "features": chosen},
        resources={"cpu": cpus, "memory": "2Gi", "gpu": 0},
    )
    return submit_job(
        app,
        spec,
        experiment=experiment,
        run_name=name or f"lightgbm-{version['name']}",
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
        if is_numeric(types[name]):
            signature.append({"name": name, "type": "double"})
            columns.append(np.asarray(values, dtype=np.float64))
        else:
            texts = [None if v is None else str(v) for v in values]
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


def train_lightgbm(spec: JobSpec, emit: Emit) -> None:
    """The body of a train-lightgbm job: emits progress, metrics and the model artifact."""
    import lightgbm as lgb
    import numpy as np

    from appliance.config import load_settings
    from appliance.store.objects import open_object_store

    params = dict(spec.params)
    target = params.pop("target")
    features = params.pop("features")
    rounds = int(params.pop("num_boost_round"))
    valid_fraction = float(params.pop("valid_fraction"))
    seed = int(params.pop("seed"))
    dataset = spec.inputs["dataset"]
    store = open_object_store(load_settings(os.environ.get("APPLIANCE_HOME")))
    emit({"type": "progress", "current": 0, "total": rounds, "message": "loading data"})
    data = _load_columns(store.get_file(dataset["sha256"]), [*features, target])
    signature, x = build_signature(dataset["schema"], features, data)
    y_raw = np.asarray(data[target])
    labels = sorted({v.item() if hasattr(v, "item") else v for v in y_raw if v is not None})
    if len(labels) == 2:
        objective = "binary"
        y = (y_raw == labels[1]).astype(np.float64)
        metrics = ["auc", "binary_logloss"]
    else:
        objective = "regression"
        y = y_raw.astype(np.float64)
        metrics = ["l2"]
        labels = []
    rng = np.random.default_rng(seed)
    is_valid = rng.random(len(y)) < valid_fraction
    if not 0 < int(is_valid.sum()) < len(y):
        raise ValueError(
            f"valid_fraction={valid_fraction} leaves an empty training or validation split "
            f"of {len(y)} rows"
        )
    categorical = [i for i, s in enumerate(signature) if s["type"] == "category"]
    lgb_params = {
        "objective": objective,
        "metric": metrics,
        "verbosity": -1,
        "seed": seed,
        "num_threads": int(spec.resources.get("cpu", 1) or 1),
        **params,
    }
    train_set = lgb.Dataset(
        x[~is_valid],
        y[~is_valid],
        categorical_feature=categorical,
        feature_name=features,
        free_raw_data=False,
    )
    valid_set = lgb.Dataset(x[is_valid], y[is_valid], reference=train_set)

    def report(env: Any) -> None:
        step = env.iteration + 1
        now = time.time()
        for _, metric, value, _ in env.evaluation_result_list:
            if not np.isfinite(value):
                continue
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
    pred = booster.predict(x[is_valid])
    final: dict[str, float] = {}
    if objective == "binary":
        final["auc"] = _auc(y[is_valid], pred)
        eps = 1e-15
        p = np.clip(pred, eps, 1 - eps)
        yv = y[is_valid]
        final["logloss"] = float(-np.mean(yv * np.log(p) + (1 - yv) * np.log(1 - p)))
    else:
        final["rmse"] = float(np.sqrt(np.mean((pred - y[is_valid]) ** 2)))
    final["n_train"] = float((~is_valid).sum())
    final["n_valid"] = float(is_valid.sum())
    for key, value in final.items():
        if np.isfinite(value):  # AUC is undefined when the validation split has one class
            emit({"type": "metric", "key": key, "value": value, "step": rounds})
        else:
            print(f"metric {key} is undefined on this validation split; not recorded")

    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "model.txt"
        booster.save_model(str(model_path))
        stored = store.put_file(model_path)
    emit(
        {
            "type": "artifact",
            "name": "model",
            "sha256": stored.sha256,
            "size": stored.size,
            "uri": stored.uri,
            "media_type": "text/plain; flavor=lightgbm",
            "meta": {
                "flavor": "lightgbm",
                "objective": objective,
                "labels": labels,
                "signature": signature,
                "target": target,
                "dataset": dataset["ref"],
                "metrics": {k: v for k, v in final.items() if np.isfinite(v)},
            },
        }
    )
    emit({"type": "progress", "current": rounds, "total": rounds, "message": "done"})
