"""The whole lifecycle on the bundled churn sample: import, train twice, register, serve,
predict, deploy v2, roll back to v1. Every step goes through the same services as the CLI."""

from __future__ import annotations

import csv
import json
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from appliance.core import datasets, deployments, jobs, registry, training
from appliance.core.context import Appliance
from appliance.errors import ApplianceError, NotFound

Progress = Callable[[str], None]

SAMPLE_TARGET = "churned"
VARIANTS = (
    {"num_leaves": 15, "learning_rate": 0.1, "num_boost_round": 100},
    {"num_leaves": 31, "learning_rate": 0.05, "num_boost_round": 200},
)


def sample_csv() -> Path:
    return Path(str(resources.files("appliance.samples").joinpath("churn.csv")))


def sample_rows(count: int) -> tuple[list[str], list[list[Any]]]:
    with sample_csv().open() as fh:
        reader = csv.DictReader(fh)
        rows = [row for _, row in zip(range(count), reader, strict=False)]
    features = [c for c in rows[0] if c != SAMPLE_TARGET]

    def value(text: str) -> Any:
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return text

    return features, [[value(r[c]) for c in features] for r in rows]


def _post(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def predict_v2(url: str, model: str, features: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    """One KServe V2 request with one tensor per feature column."""
    inputs = []
    for j, name in enumerate(features):
        column = [row[j] for row in rows]
        datatype = "BYTES" if any(isinstance(v, str) for v in column) else "FP64"
        inputs.append({"name": name, "shape": [len(rows)], "datatype": datatype, "data": column})
    return _post(f"{url}/v2/models/{model}/infer", {"id": "quickstart", "inputs": inputs})


def run_quickstart(
    app: Appliance,
    name: str = "churn",
    keep_serving: bool = False,
    progress: Progress = lambda message: None,
) -> dict[str, Any]:
    """Run the lifecycle; returns a summary with per-phase timings (seconds)."""
    timings: dict[str, float] = {}

    @contextmanager
    def phase(label: str, message: str):  # type: ignore[no-untyped-def]
        progress(message)
        start = time.perf_counter()
        yield
        timings[label] = time.perf_counter() - start

    with phase("import", "importing the churn sample with DuckDB"):
        dataset = datasets.import_csv(app, sample_csv(), name)

    with phase("train", "training two LightGBM variants through the local executor"):
        submitted = [
            training.submit_training(
                app,
                dataset["ref"],
                SAMPLE_TARGET,
                params=dict(params),
                experiment="quickstart",
                name=f"{name}-v{i + 1}",
            )
            for i, params in enumerate(VARIANTS)
        ]
        finished = [jobs.wait_job(app, job["id"], timeout=300) for job in submitted]
        for job in finished:
            if job["state"] != "succeeded":
                raise ApplianceError(
                    f"training job {job['id']} {job['state']}: {job.get('error')} "
                    f"(see: appliance jobs logs {job['id']})"
                )

    with phase("register", "registering both models"):
        versions = [registry.register_model(app, name, job["run_id"]) for job in finished]
    v1, v2 = versions

    features, rows = sample_rows(5)
    serving_started = False
    try:
        with phase("serve-ready", f"serving {v1['ref']} on 127.0.0.1"):
            try:
                deployments.get_deployment(app, name)
                deployments.deploy(app, name, v1["ref"])
                dep = deployments.start_deployment(app, name)
            except NotFound:
                dep = deployments.create_deployment(app, name, v1["ref"])
            serving_started = True
        with phase("predict", "sending predictions (KServe V2)"):
            first = predict_v2(dep["url"], name, features, rows)

        with phase("deploy", f"deploying {v2['ref']}"):
            deployments.deploy(app, name, v2["ref"])
            second = predict_v2(dep["url"], name, features, rows)

        with phase("rollback", f"rolling back to {v1['ref']}"):
            dep = deployments.rollback(app, name)
            third = predict_v2(dep["url"], name, features, rows)
    finally:
        if serving_started and not keep_serving:  # never leave a server behind on failure
            deployments.stop_deployment(app, name)

    served = [first["model_version"], second["model_version"], third["model_version"]]
    expected = [str(v1["version"]), str(v2["version"]), str(v1["version"])]
    rollback_ok = served == expected and third["outputs"][0]["data"] == first["outputs"][0]["data"]
    return {
        "dataset": dataset["ref"],
        "models": [
            {"ref": v["ref"], "run_id": v["run_id"], "auc": v["metrics"].get("auc")}
            for v in versions
        ],
        "deployment": name,
        "url": dep["url"],
        "served_versions": served,
        "rollback_ok": rollback_ok,
        "revision": dep["current_revision"],
        "serving": keep_serving,
        "predictions": third["outputs"][0]["data"],
        "timings": timings,
    }
