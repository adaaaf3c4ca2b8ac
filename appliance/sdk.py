"""Tracking from inside your own training script, when it runs as an appliance job.

    from appliance import sdk

    sdk.log_param("lr", 0.01)
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


def log_param(key: str, value: Any) -> None:
    _emit({"type": "param", "key": key, "value": value})


def log_params(params: dict[str, Any]) -> None:
    for key, value in params.items():
        log_param(key, value)


def log_metric(key: str, value: float, step: int = 0) -> None:
    _emit({"type": "metric", "key": key, "value": float(value), "step": int(step)})


def set_tag(key: str, value: Any) -> None:
    _emit({"type": "tag", "key": key, "value": str(value)})


def progress(done: float, total: float | None = None, message: str = "") -> None:
    _emit({"type": "progress", "current": done, "total": total, "message": message})


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
    objective: str = "binary",
    metrics: dict[str, float] | None = None,
) -> str:
    """Save a model in a pickle-free format as the run's 'model', ready to register and serve.

    flavor 'lightgbm': a lightgbm.Booster (saved as its text format).
    flavor 'mlp': an appliance.core.mlp.MlpModel (weights and preprocessing as .npz).
    signature: [{"name": ..., "type": "double"} or {"name", "type": "category", "categories"}].
    """
    if flavor not in _FLAVORS:
        raise ValueError(f"flavor {flavor!r}: expected one of {_FLAVORS} (pickle is not offered)")
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
            "labels": [0, 1] if objective == "binary" else [],
            "metrics": metrics or {},
        }
        dataset = os.environ.get("APPLIANCE_LAST_INPUT")
        if dataset:
            meta["dataset"] = dataset
        return log_artifact(path, name="model", meta=meta)


def input_dataset(ref: str) -> Path:
    """A dataset version's Parquet file (verified), recorded as an input of this run."""
    spec = json.loads(os.environ.get("APPLIANCE_JOB_SPEC", "{}"))
    declared = (spec.get("inputs") or {}).get("datasets", {})
    found = declared.get(ref)
    if found is None:  # not declared at submit: resolve it read-only in the local store
        from appliance.core.context import Appliance
        from appliance.core.datasets import get_dataset_version

        app = Appliance.open(os.environ.get("APPLIANCE_HOME"))
        try:
            version = get_dataset_version(app, ref)
        finally:
            app.close()
        found = {"ref": version["ref"], "sha256": version["sha256"]}
    _emit({"type": "input", "ref": found["ref"]})
    os.environ["APPLIANCE_LAST_INPUT"] = found["ref"]
    return _store().get_file(found["sha256"])
