"""Training: submit a LightGBM or MLP job on dataset versions, and the job bodies.

A job trains on a `train` version, stops early on a `valid` version (or a seeded fraction of
the training rows when none is given) and is evaluated on a `test` version when one is given.
The job bodies (`train_lightgbm`, `train_mlp`) run in the job process: they read the data from
the object store by sha256, train, write the model back content-addressed and report
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
from appliance.core.jobs import Executor, JobSpec, environment_tags, get_executor, submit_job
from appliance.errors import ApplianceError, InvalidInput

Emit = Callable[[dict[str, Any]], None]

DEFAULT_PARAMS: dict[str, Any] = {
    "num_leaves": 31,
    "learning_rate": 0.05,
    "num_boost_round": 200,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.9,
    "early_stopping_rounds": 20,
}
COMMON_DEFAULTS: dict[str, Any] = {"valid_fraction": 0.2, "seed": 42}
TRAINERS = ("lightgbm", "mlp")
OBJECTIVES = ("binary", "multiclass", "regression")
MAX_CLASSES = 50


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


CONFIG_KEYS = {
    "trainer",
    "train",
    "valid",
    "test",
    "label",
    "objective",
    "features",
    "params",
    "experiment",
    "name",
    "cpus",
    "timeout",
    "retries",
    "env",
}


def load_train_config(path: str | Path) -> dict[str, Any]:
    """`appliance train --config train.yaml`: the command's options as YAML keys."""
    from appliance.core.jobs import load_yaml_mapping

    return check_train_config(load_yaml_mapping(path, "--config"), str(path))


def check_train_config(data: dict[str, Any], source: str, extra: set[str] = set()) -> dict:  # noqa: B006
    """Refuse unknown keys and wrong types in a training config, naming the key."""
    unknown = sorted(set(data) - CONFIG_KEYS - extra)
    if unknown:
        raise InvalidInput(f"{source}: unknown key {unknown[0]!r}; known: {sorted(CONFIG_KEYS)}")
    if "params" in data and not isinstance(data["params"], dict):
        raise InvalidInput(f"{source}: 'params' must be a mapping")
    for key in ("trainer", "train", "valid", "test", "label", "objective", "experiment", "name"):
        if key in data and not isinstance(data[key], str):
            raise InvalidInput(f"{source}: {key!r} must be a string")
    if "features" in data and not (
        isinstance(data["features"], list) and all(isinstance(f, str) for f in data["features"])
    ):
        raise InvalidInput(f"{source}: 'features' must be a list of column names")
    if "cpus" in data and not (
        isinstance(data["cpus"], int) and not isinstance(data["cpus"], bool) and data["cpus"] >= 1
    ):
        raise InvalidInput(f"{source}: 'cpus' must be a positive integer")
    return data


def submit_train_config(app: Appliance, config: dict[str, Any]) -> dict[str, Any]:
    """Submit from merged options (`train` flags over `--config`, or a `kind: train` spec)."""
    for required in ("train", "label"):
        if not config.get(required):
            raise InvalidInput(f"--{required} is required (or '{required}:' in the config)")
    return submit_training(
        app,
        config["train"],
        config["label"],
        params=config.get("params") or {},
        features=config.get("features"),
        experiment=config.get("experiment", "default"),
        name=config.get("name"),
        cpus=int(config.get("cpus", 1)),
        trainer=config.get("trainer", "lightgbm"),
        valid=config.get("valid"),
        test=config.get("test"),
        objective=config.get("objective"),
        timeout=config.get("timeout"),
        retries=config.get("retries", 0),
        memory=config.get("memory", "2Gi"),
        gpu=config.get("gpu"),
        env=config.get("env"),
    )


def check_lightgbm_params(params: dict[str, Any]) -> None:
    """Refuse names LightGBM does not know (it would ignore a typo silently)."""
    known = set(DEFAULT_PARAMS)
    if set(params) - known:  # only then pay for importing lightgbm in the submitting process
        from lightgbm.basic import _ConfigAliases

        for name, aliases in _ConfigAliases._get_all_param_aliases().items():
            known.add(name)
            known.update(aliases)
    for key, value in params.items():
        if key not in known:
            raise InvalidInput(f"param {key!r}: not a LightGBM parameter")
        if key in ("objective", "num_class"):
            raise InvalidInput(f"param {key!r}: set the objective with --objective")
        if isinstance(value, str) and key in DEFAULT_PARAMS:
            raise InvalidInput(f"param {key}: expected a number, got {value!r}")


def _input(version: dict[str, Any]) -> dict[str, Any]:
    return {"ref": version["ref"], "sha256": version["sha256"], "schema": version["schema"]}


def _default_features(app: Appliance, train: dict[str, Any], target: str) -> list[str]:
    """Every column but the label; for a feature-store training set, its feature service's
    features only (entity keys and the timestamp are how rows were joined, not inputs)."""
    from appliance.core.features import get_definition, output_names, training_set_service

    service = training_set_service(app, train["ref"])
    columns = [c["name"] for c in train["schema"]]
    if service is None:
        return [c for c in columns if c != target]
    names = output_names(get_definition(app, "service", service))
    return [c for c in names if c in columns and c != target]


def _has_gpu(executor: Executor, app: Appliance) -> bool:
    """Whether the MLP should ask for a GPU: one exists where its jobs run."""
    try:
        return bool(executor.capacity(app).gpu > 0)
    except ApplianceError:  # the cluster is unreachable: submit_job says so just after
        return False


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
    valid: str | None = None,
    test: str | None = None,
    objective: str | None = None,
    timeout: float | str | None = None,
    retries: int = 0,
    memory: str | int = "2Gi",
    gpu: int | None = None,
    env: dict[str, str] | None = None,
    **submit: Any,
) -> dict[str, Any]:
    """Validate against the datasets' schemas, then submit a training job.

    `dataset` is the training version; `target` the label column; `valid`/`test` optional
    versions with the same columns. The MLP requests one GPU when the machine (or, on k3s,
    the cluster) has one.
    `submit` passes on to `submit_job` (a tuning trial's parent run, tags and record).
    """
    if trainer not in TRAINERS:
        raise InvalidInput(f"--trainer {trainer!r}: expected one of {', '.join(TRAINERS)}")
    if objective is not None and objective not in OBJECTIVES:
        raise InvalidInput(f"--objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    train = get_dataset_version(app, dataset)
    columns = {c["name"]: c["type"] for c in train["schema"]}
    if target not in columns:
        raise InvalidInput(f"--label {target!r}: not a column of dataset {train['ref']}")
    chosen = features or _default_features(app, train, target)
    for feature in chosen:
        if feature not in columns:
            raise InvalidInput(f"--feature {feature!r}: not a column of dataset {train['ref']}")
        if feature == target:
            raise InvalidInput(f"--feature {feature!r}: the label cannot be a feature")
    inputs = {"train": _input(train)}
    for role, ref in (("valid", valid), ("test", test)):
        if ref:
            version = get_dataset_version(app, ref)
            have = {c["name"] for c in version["schema"]}
            missing = [c for c in [*chosen, target] if c not in have]
            if missing:
                raise InvalidInput(f"--{role} {version['ref']}: has no column {missing[0]!r}")
            inputs[role] = _input(version)
    given = dict(params or {})
    common = {**COMMON_DEFAULTS, **{k: given.pop(k) for k in COMMON_DEFAULTS if k in given}}
    if trainer == "lightgbm":
        check_lightgbm_params(given)
        merged = {**DEFAULT_PARAMS, **given}  # other keys pass through to LightGBM as they are
        for key in ("num_boost_round", "early_stopping_rounds"):
            if not isinstance(merged[key], int) or merged[key] < 0:
                raise InvalidInput(f"param {key}: must be a non-negative integer")
        if merged["num_boost_round"] < 1:
            raise InvalidInput("param num_boost_round: must be a positive integer")
    else:
        from appliance.core.mlp import MlpConfig

        given.setdefault("seed", common["seed"])
        try:
            merged = {"mlp": asdict(MlpConfig.from_params(given))}
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"param: {exc}") from exc
    fraction = common["valid_fraction"]
    if not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise InvalidInput("param valid_fraction: must be a number between 0 and 1")
    spec = JobSpec(
        kind=f"train-{trainer}",
        inputs=inputs,
        params={**merged, **common, "label": target, "features": chosen, "objective": objective},
        resources={
            "cpu": cpus,
            "memory": memory,
            "gpu": gpu
            if gpu is not None
            else int(trainer == "mlp" and _has_gpu(get_executor(app.settings.executor), app)),
        },
        timeout=timeout,  # type: ignore[arg-type]  # validate() turns '30m' into seconds
        retries=retries,
        env=dict(env or {}),
    )
    return submit_job(
        app,
        spec,
        tags={**environment_tags(), **submit.pop("tags", {})},
        experiment=experiment,
        run_name=name or f"{trainer}-{train['name']}",
        inputs=[("DatasetVersion", f"dataset:{v['ref']}") for v in inputs.values()],
        **submit,
    )


def load_columns(path: Path, names: list[str]) -> dict[str, Any]:
    """Columns as numpy arrays; masked (NULLs) only where a column has NULLs, since masked
    arrays make every later copy and split slower."""
    import duckdb
    import numpy as np

    con = duckdb.connect()
    try:
        cols = ", ".join('"' + n.replace('"', '""') + '"' for n in names)
        fetched = con.execute(f"SELECT {cols} FROM read_parquet(?)", [str(path)]).fetchnumpy()
    finally:
        con.close()
    out = {}
    for name, values in fetched.items():
        mask = np.ma.getmask(values)
        plain = mask is np.ma.nomask or not mask.any()
        out[name] = np.ma.getdata(values) if plain else values
    return out


def fit_signature(
    schema: list[dict[str, str]], features: list[str], data: dict[str, Any]
) -> list[dict[str, Any]]:
    """Input signature: numeric features as doubles, others as categories seen in `data`."""
    import numpy as np

    types = {c["name"]: c["type"] for c in schema}
    signature: list[dict[str, Any]] = []
    for name in features:
        if is_numeric(types[name]):
            signature.append({"name": name, "type": "double"})
        else:
            raw, missing = np.ma.getdata(data[name]), np.ma.getmaskarray(data[name])
            levels = {str(v) for v, m in zip(raw, missing, strict=True) if not m and v is not None}
            signature.append({"name": name, "type": "category", "categories": sorted(levels)})
    return signature


def encode(signature: list[dict[str, Any]], data: dict[str, Any]) -> Any:
    """The float64 matrix both trainers take: NULL (and unseen levels) become NaN.

    Written column by column into one matrix: a 200k-row table is copied once, not twice."""
    import numpy as np

    rows = len(data[signature[0]["name"]]) if signature else 0
    out = np.empty((rows, len(signature)), dtype=np.float64)
    for j, feature in enumerate(signature):
        values = data[feature["name"]]
        # DuckDB's fetchnumpy returns NULLs as masked entries; they must become missing values.
        missing = np.ma.getmaskarray(values)
        raw = np.ma.getdata(values)
        if feature["type"] == "double":
            out[:, j] = np.asarray(raw, dtype=np.float64)
            if missing.any():
                out[missing, j] = np.nan
        else:
            index = {c: i for i, c in enumerate(feature["categories"])}
            out[:, j] = [
                np.nan if m or v is None else index.get(str(v), np.nan)
                for v, m in zip(raw, missing, strict=True)
            ]
    return out


def build_signature(schema: list[dict[str, str]], features: list[str], data: dict[str, Any]):  # type: ignore[no-untyped-def]
    """Signature and matrix of one table (fit and encode on the same rows)."""
    signature = fit_signature(schema, features, data)
    return signature, encode(signature, data)


def _auc(y: Any, p: Any) -> float:
    import numpy as np

    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = np.asarray(p)[order]
    i, n = 0, len(p)
    while i < n:  # average ranks for ties
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


def evaluate(objective: str, y: Any, pred: Any, classes: int = 2) -> dict[str, float]:
    """Final metrics of one split (names without the split prefix)."""
    import numpy as np

    if objective == "regression":
        err = pred - y
        total = float(((y - y.mean()) ** 2).sum())
        return {
            "rmse": float(np.sqrt(np.mean(err**2))),
            "mae": float(np.mean(np.abs(err))),
            "r2": 1 - float((err**2).sum()) / total if total else float("nan"),
        }
    if objective == "binary":
        prob = np.clip(pred, 1e-15, 1 - 1e-15)
        hard = (pred >= 0.5).astype(int)
        truth = (y == 1).astype(int)
        logloss = float(-np.mean(truth * np.log(prob) + (1 - truth) * np.log(1 - prob)))
    else:
        prob = np.clip(pred, 1e-15, 1)
        hard = prob.argmax(axis=1)
        truth = y.astype(int)
        logloss = float(-np.mean(np.log(prob[np.arange(len(truth)), truth])))
    metrics = {"logloss": logloss, "accuracy": float(np.mean(hard == truth))}
    if objective == "binary":
        metrics["auc"] = _auc(truth, pred)
    f1s, precisions, recalls = [], [], []
    present = [1] if objective == "binary" else np.union1d(truth, hard).tolist()
    for cls in present:  # macro averages over the classes that occur, as scikit-learn does
        tp = float(((hard == cls) & (truth == cls)).sum())
        fp = float(((hard == cls) & (truth != cls)).sum())
        fn = float(((hard != cls) & (truth == cls)).sum())
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        precisions.append(p)
        recalls.append(r)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    metrics["precision"] = float(np.mean(precisions))
    metrics["recall"] = float(np.mean(recalls))
    metrics["f1"] = float(np.mean(f1s))
    return metrics


@dataclass
class Split:
    x: Any
    y: Any


@dataclass
class Prepared:
    """What both trainers start from: encoded splits, the label's meaning, the signature."""

    store: Any
    signature: list[dict[str, Any]]
    objective: str
    labels: list[Any]
    train: Split
    valid: Split
    test: Split | None
    inputs: dict[str, Any]
    label: str
    features: list[str]

    @property
    def classes(self) -> int:
        return len(self.labels) if self.objective == "multiclass" else 2


def _distinct(values: Any) -> list[Any]:
    """Sorted distinct values as Python scalars (vectorised: labels have 10^5+ rows)."""
    import numpy as np

    array = np.asarray(values)
    if array.dtype.kind in "iufbU":
        return [v.item() if hasattr(v, "item") else v for v in np.unique(array)]
    return sorted({v.item() if hasattr(v, "item") else v for v in array})


def label_codes(raw: Any, labels: list[Any], label: str) -> Any:
    """Each row's class index in `labels`; refuses a value the training rows never had."""
    import numpy as np

    array = np.asarray(raw)
    if array.dtype.kind in "iufbU":
        uniq, inverse = np.unique(array, return_inverse=True)
        keys = [v.item() if hasattr(v, "item") else v for v in uniq]
    else:
        keys_of_rows = [v.item() if hasattr(v, "item") else v for v in array]
        keys = sorted(set(keys_of_rows), key=repr)
        position = {k: i for i, k in enumerate(keys)}
        inverse = np.array([position[k] for k in keys_of_rows], dtype=np.int64)
    index = {v: i for i, v in enumerate(labels)}
    unknown = [k for k in keys if k not in index]
    if unknown:
        raise ValueError(f"label {label!r} has value {unknown[0]!r}, unseen in training")
    lookup = np.array([index[k] for k in keys], dtype=np.float64)
    return lookup[inverse.reshape(-1)] if len(keys) else np.zeros(0, dtype=np.float64)


def _labels(objective: str | None, label: str, values: Any) -> tuple[str, list[Any]]:
    import numpy as np

    numeric = np.asarray(values).dtype.kind in "iufb"
    distinct = _distinct(values)
    if objective is None:
        if len(distinct) == 2:
            objective = "binary"
        elif numeric and (len(distinct) > MAX_CLASSES or np.asarray(values).dtype.kind == "f"):
            objective = "regression"
        else:
            objective = "multiclass"
    if objective == "binary" and len(distinct) != 2:
        raise ValueError(
            f"label {label!r} has {len(distinct)} class(es) in the training split; "
            "a binary objective needs exactly 2"
        )
    if objective == "multiclass" and not 2 <= len(distinct) <= MAX_CLASSES:
        raise ValueError(
            f"label {label!r} has {len(distinct)} classes; multiclass takes 2 to {MAX_CLASSES}"
        )
    if objective == "regression":
        if not numeric:
            raise ValueError(f"label {label!r} is not numeric; regression needs numbers")
        return objective, []
    return objective, distinct


def _prepare(spec: JobSpec, emit: Emit, total: int) -> Prepared:
    import numpy as np

    from appliance.config import load_settings
    from appliance.store.objects import open_object_store

    params = spec.params
    label, features = params["label"], params["features"]
    store = open_object_store(load_settings(os.environ.get("APPLIANCE_HOME")))
    emit({"type": "progress", "done": 0, "total": total, "message": "loading data"})
    loaded = {
        role: load_columns(store.get_file(item["sha256"]), [*features, label])
        for role, item in spec.inputs.items()
    }
    for role, data in loaded.items():
        known = ~np.ma.getmaskarray(data[label])
        if not known.all():
            print(f"{role}: dropped {int((~known).sum())} rows whose label {label!r} is missing")
            loaded[role] = {k: v[known] for k, v in data.items()}
    if "valid" not in loaded:  # hold out validation rows before anything is fitted
        rows = len(loaded["train"][label])
        rng = np.random.default_rng(int(params["seed"]))
        is_valid = rng.random(rows) < float(params["valid_fraction"])
        if not 0 < int(is_valid.sum()) < rows:
            raise ValueError(
                f"valid_fraction={params['valid_fraction']} leaves an empty training or "
                f"validation split of {rows} rows"
            )
        whole = loaded["train"]
        loaded["valid"] = {k: v[is_valid] for k, v in whole.items()}
        loaded["train"] = {k: v[~is_valid] for k, v in whole.items()}
    train_raw = np.asarray(np.ma.getdata(loaded["train"][label]))
    objective, labels = _labels(params.get("objective"), label, train_raw)
    print(f"objective: {objective}" + (f", classes {labels}" if labels else ""))
    # Categorical levels come from the training rows alone: no vocabulary leaks from valid/test.
    signature = fit_signature(spec.inputs["train"]["schema"], features, loaded["train"])

    def split(data: dict[str, Any]) -> Split:
        raw = np.asarray(np.ma.getdata(data[label]))
        if objective == "regression":
            y = raw.astype(np.float64)
        else:
            y = label_codes(raw, labels, label)
        return Split(encode(signature, data), y)

    train, valid = split(loaded["train"]), split(loaded["valid"])
    test = split(loaded["test"]) if "test" in loaded else None
    return Prepared(
        store, signature, objective, labels, train, valid, test, spec.inputs, label, features
    )


def _report_model(
    p: Prepared,
    predict: Callable[[Any], Any],
    model_path: Path,
    flavor: str,
    steps: int,
    emit: Emit,
    extra_meta: dict[str, Any] | None = None,
) -> None:
    """Final metrics named by split (`valid_auc`, `test_rmse`…), then the model artifact.

    They are logged at the kept step (best iteration or epoch), after the streamed values, so
    the latest value of each name is the saved model's."""
    import numpy as np

    final: dict[str, float] = {"n_train": float(len(p.train.y)), "n_valid": float(len(p.valid.y))}
    for role, part in (("valid", p.valid), ("test", p.test)):
        if part is None:
            continue
        for key, value in evaluate(p.objective, part.y, predict(part.x), p.classes).items():
            final[f"{role}_{key}"] = value
    if p.test is not None:
        final["n_test"] = float(len(p.test.y))
    if "valid_auc" in final:
        final["auc"] = final["valid_auc"]  # the headline number the quickstart prints
    for key, value in final.items():
        if np.isfinite(value):  # AUC is undefined when a split has one class
            emit({"type": "metric", "name": key, "value": value, "step": steps})
        else:
            print(f"metric {key} is undefined on this data; not recorded")
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
                "target": p.label,
                "dataset": p.inputs["train"]["ref"],
                "metrics": {k: v for k, v in final.items() if np.isfinite(v)},
                **(extra_meta or {}),
            },
        }
    )
    emit({"type": "progress", "done": steps, "total": steps, "message": "done"})


def _restate(streamed: dict[str, dict[int, float]], best: int, emit: Emit) -> None:
    """Log each streamed metric's value at the kept step once more, last: its latest value
    (what runs show, list and compare read) is then the saved model's, not the last step's."""
    import numpy as np

    for key, values in streamed.items():
        if best in values and np.isfinite(values[best]):
            emit({"type": "metric", "name": key, "value": values[best], "step": best})


def train_lightgbm(spec: JobSpec, emit: Emit) -> None:
    """The body of a train-lightgbm job: early stopping on valid, evaluation on test."""
    import lightgbm as lgb
    import numpy as np

    params = dict(spec.params)
    rounds = int(params["num_boost_round"])
    stop_after = int(params.pop("early_stopping_rounds", 0))
    started = time.perf_counter()
    p = _prepare(spec, emit, rounds)
    print(f"loaded {len(p.train.y)} training rows in {time.perf_counter() - started:.2f} s")
    for key in ("label", "features", "num_boost_round", "valid_fraction", "seed", "objective"):
        params.pop(key, None)
    metric = {
        # The first metric drives early stopping: log loss, steadier than AUC on small splits.
        "binary": ["binary_logloss", "auc"],
        "multiclass": ["multi_logloss", "multi_error"],
        "regression": ["l2", "l1"],
    }[p.objective]
    categorical = [i for i, s in enumerate(p.signature) if s["type"] == "category"]
    lgb_params = {
        "objective": p.objective,
        "metric": metric,
        "verbosity": -1,
        "seed": int(spec.params["seed"]),
        "num_threads": int(spec.resources.get("cpu", 1) or 1),
        **({"num_class": p.classes} if p.objective == "multiclass" else {}),
        **params,
    }
    # Dataset parameters belong to the Dataset: a study varying min_data_in_leaf sets
    # feature_pre_filter false, which LightGBM reads only here.
    dataset_params = {k: lgb_params.pop(k) for k in ("feature_pre_filter",) if k in lgb_params}
    train_set = lgb.Dataset(
        p.train.x,
        p.train.y,
        categorical_feature=categorical,
        feature_name=p.features,
        free_raw_data=False,
        params=dataset_params or None,
    )
    valid_set = lgb.Dataset(p.valid.x, p.valid.y, reference=train_set)

    streamed: dict[str, dict[int, float]] = {}

    def report(env: Any) -> None:
        step = env.iteration + 1
        now = time.time()
        for _, name, value, _ in env.evaluation_result_list:
            streamed.setdefault(f"valid_{name}", {})[step] = value
            if np.isfinite(value):
                emit(
                    {
                        "type": "metric",
                        "name": f"valid_{name}",
                        "value": value,
                        "step": step,
                        "timestamp": now,
                    }
                )
        emit({"type": "progress", "done": step, "total": rounds, "message": "boosting"})

    callbacks = [report]
    if stop_after:
        callbacks.append(lgb.early_stopping(stop_after, first_metric_only=True, verbose=False))
    started = time.perf_counter()
    booster = lgb.train(
        lgb_params,
        train_set,
        num_boost_round=rounds,
        valid_sets=[valid_set],
        valid_names=["valid"],
        callbacks=callbacks,
    )
    best = booster.best_iteration or booster.current_iteration()
    print(f"trained {booster.current_iteration()} rounds in {time.perf_counter() - started:.2f} s")
    emit({"type": "param", "name": "best_iteration", "value": best})
    _restate(streamed, best, emit)
    gains = booster.feature_importance(importance_type="gain")
    importance = {n: float(g) for n, g in zip(p.features, gains, strict=True)}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "model.txt"
        booster.save_model(str(model_path), num_iteration=best)
        _report_model(
            p,
            lambda x: booster.predict(x, num_iteration=best),
            model_path,
            "lightgbm",
            best,
            emit,
            {"feature_importance_gain": importance},
        )


def train_mlp(spec: JobSpec, emit: Emit) -> None:
    """The body of a train-mlp job: a tabular MLP on CUDA when there is one, else the CPU."""
    import numpy as np
    import torch

    from appliance.core.mlp import MlpConfig, fit, pick_device

    config = MlpConfig(**spec.params["mlp"])
    p = _prepare(spec, emit, config.epochs)
    # Only a GPU the scheduler granted: an unrequested one may be another job's.
    device = pick_device() if int(spec.resources.get("gpu", 0) or 0) > 0 else "cpu"
    print(f"training the MLP on {device}")
    levels = [len(s["categories"]) if s["type"] == "category" else 0 for s in p.signature]
    streamed: dict[str, dict[int, float]] = {}
    torch.set_num_threads(max(1, int(spec.resources.get("cpu", 1) or 1)))

    def on_epoch(report: Any) -> None:
        for key in ("train_loss", "valid_loss"):
            streamed.setdefault(key, {})[report.epoch] = getattr(report, key)
        for key in ("train_loss", "valid_loss", "seconds"):
            name = "epoch_seconds" if key == "seconds" else key
            emit(
                {
                    "type": "metric",
                    "name": name,
                    "value": getattr(report, key),
                    "step": report.epoch,
                }
            )
        emit(
            {
                "type": "progress",
                "done": report.epoch,
                "total": config.epochs,
                "message": f"epoch {report.epoch} on {device}",
            }
        )

    model = fit(
        p.train.x,
        p.train.y,
        p.valid.x,
        p.valid.y,
        levels,
        p.objective,
        config,
        classes=p.classes,
        device=device,
        on_epoch=on_epoch,
    )
    emit({"type": "param", "name": "best_epoch", "value": model.best_epoch})
    _restate(streamed, model.best_epoch, emit)
    imputed = dict(model.imputed)
    if p.test is not None:
        imputed["test"] = model.layout.transform(p.test.x)[2]
    if any(imputed.values()):
        print(f"imputed missing numeric values with the training mean: {imputed}")
    emit({"type": "tag", "name": "device", "value": device})
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "model.npz"
        model.save(model_path)
        _report_model(
            p,
            lambda x: np.asarray(model.predict(x)),
            model_path,
            "mlp",
            model.best_epoch,
            emit,
            {"imputed": imputed, "device": device},
        )
