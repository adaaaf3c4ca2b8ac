"""Tracking from inside your own training script, when it runs as an appliance job.

    from appliance import sdk

    lr = sdk.params({"lr": 0.01})["lr"]          # a tuning trial's value, or the default
    for epoch in range(10):
        sdk.log_metric("loss", loss, step=epoch)
    path = sdk.input_dataset("churn@2")          # a verified local Parquet file
    sdk.save_model(booster, flavor="lightgbm", signature=[...])

Everything goes out as protocol lines on stdout (see ARCHITECTURE.md), which the job's
supervisor records; outside a job the lines are simply printed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

_FLAVORS = ("lightgbm", "mlp")


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


def params(defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job's parameters (a tuning trial's values), over `defaults`; outside a job, the
    defaults alone, so the same script runs by hand."""
    spec = os.environ.get("APPLIANCE_JOB_SPEC")
    given = json.loads(spec).get("params", {}) if spec else {}
    return {**(defaults or {}), **given}


def log_param(key: str, value: Any) -> None:
    _emit({"type": "param", "name": key, "value": value})


def log_params(params: dict[str, Any]) -> None:
    for key, value in params.items():
        log_param(key, value)


def log_metric(key: str, value: float, step: int = 0) -> None:
    _emit({"type": "metric", "name": key, "value": float(value), "step": int(step)})


def set_tag(key: str, value: Any) -> None:
    _emit({"type": "tag", "name": key, "value": str(value)})


def progress(done: float, total: float | None = None, message: str = "") -> None:
    _emit({"type": "progress", "done": done, "total": total, "message": message})


def _store() -> Any:
    from appliance.config import load_settings
    from appliance.store.objects import open_object_store

    return open_object_store(load_settings(os.environ.get("APPLIANCE_HOME")))


def log_artifact(path: str | Path, name: str | None = None, meta: dict | None = None) -> str:
    """Store a file content-addressed and attach it to the run; returns its sha256."""
    source = Path(path)
    stored = _store().put_file(source)
    _emit(
        {
            "type": "artifact",
            "name": name or source.name,
            "sha256": stored.sha256,
            "size": stored.size,
            "uri": stored.uri,
            "media_type": "application/octet-stream",
            "meta": meta or {},
        }
    )
    return stored.sha256


def save_model(
    model: Any,
    flavor: str,
    signature: list[dict[str, Any]],
    objective: str | None = None,
    labels: list[Any] | None = None,
    target: str | None = None,
    metrics: dict[str, float] | None = None,
) -> str:
    """Save a model in a pickle-free format as the run's 'model', ready to register and serve.

    flavor 'lightgbm': a lightgbm.Booster (saved as its text format).
    flavor 'mlp': an appliance.core.mlp.MlpModel (weights and preprocessing as .npz).
    signature: [{"name": ..., "type": "double"} or {"name", "type": "category", "categories"}].
    objective: binary, multiclass or regression (read from a Booster when not given).
    labels: the classes in the order the model's outputs use (binary: [negative, positive]).
    """
    if flavor not in _FLAVORS:
        raise ValueError(f"flavor {flavor!r}: expected one of {_FLAVORS} (pickle is not offered)")
    from appliance.core.registry import is_valid_signature

    if not is_valid_signature(signature):
        raise ValueError(
            "signature: a list of {name, type: double} or {name, type: category, categories: [...]}"
        )
    if objective is None:
        objective = getattr(model, "objective", None)
        if flavor == "lightgbm":
            objective = str(getattr(model, "params", {}).get("objective", "binary"))
        objective = objective or "binary"
    objective = {"regression_l2": "regression", "multiclassova": "multiclass"}.get(
        objective, objective
    )
    if objective not in ("binary", "multiclass", "regression"):
        raise ValueError(f"objective {objective!r}: expected binary, multiclass or regression")
    if labels is None:
        labels = [0, 1] if objective == "binary" else []
    with tempfile.TemporaryDirectory() as tmp:
        if flavor == "lightgbm":
            path = Path(tmp) / "model.txt"
            model.save_model(str(path))
        else:
            path = Path(tmp) / "model.npz"
            model.save(path)
        meta = {
            "flavor": flavor,
            "signature": signature,
            "objective": objective,
            "labels": labels,
            "target": target,
            "metrics": metrics or {},
        }
        dataset = os.environ.get("APPLIANCE_LAST_INPUT")
        if dataset:
            meta["dataset"] = dataset
        return log_artifact(path, name="model", meta=meta)


def input_dataset(ref: str) -> Path:
    """A dataset version's Parquet file (verified), recorded as an input of this run.

    The version must be declared when the job is submitted (`appliance run --input REF`): the
    job process reads the object store but never the metadata database, so it runs the same
    on every executor.
    """
    spec = json.loads(os.environ.get("APPLIANCE_JOB_SPEC", "{}"))
    declared = (spec.get("inputs") or {}).get("datasets", {})
    found = declared.get(ref)
    if found is None:
        raise LookupError(
            f"dataset {ref!r} was not declared for this run; submit it with "
            f"`appliance run --input {ref} ...` (declared: {sorted(declared) or 'none'})"
        )
    _emit({"type": "input", "ref": found["ref"]})
    os.environ["APPLIANCE_LAST_INPUT"] = found["ref"]
    return _store().get_file(found["sha256"])
