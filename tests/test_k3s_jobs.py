"""A job spec as a Kubernetes Job: every manifest validated against the Kubernetes schemas
(strict), and the fields that carry the spec's meaning checked one by one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from appliance.config import S3Settings, Settings
from appliance.core.jobs import JobSpec
from appliance.core.k3s_jobs import JOB_LABEL, S3_SECRET, job_manifest
from appliance.errors import InvalidInput

K8S = "1.32"  # the Kubernetes of the k3s release the bundle pins (v1.32.3+k3s1)
SETTINGS = Settings(
    home=Path("unused"),
    store="s3",
    s3=S3Settings(endpoint="10.0.0.5:9000", access_key="never-in-a-manifest", secret_key="x"),
)


def valid(manifest: dict[str, Any]) -> dict[str, Any]:
    kubernetes_validate.validate(manifest, K8S, strict=True)
    return manifest


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]["containers"][0]


def test_a_training_job_on_the_cpu() -> None:
    spec = JobSpec(
        kind="train-lightgbm",
        params={"label": "churned", "num_leaves": 31},
        resources={"cpu": 2, "memory": "4Gi"},
        timeout="30m",  # type: ignore[arg-type]
        retries=2,
        env={"OMP_PROC_BIND": "false"},
    )
    job = valid(job_manifest("3f2a9c1b7d4e", spec, SETTINGS))
    assert job["metadata"] == {
        "name": "job-3f2a9c1b7d4e",
        "namespace": "appliance",
        "labels": {JOB_LABEL: "3f2a9c1b7d4e", "app.kubernetes.io/managed-by": "appliance"},
    }
    assert job["spec"]["backoffLimit"] == 2
    pod = job["spec"]["template"]["spec"]
    # the timeout is per attempt from the pod's start, as locally from the process's start
    assert pod["activeDeadlineSeconds"] == 1800 and "activeDeadlineSeconds" not in job["spec"]
    assert pod["restartPolicy"] == "Never" and "runtimeClassName" not in pod
    container = _container(job)
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["command"] == ["python", "-m", "appliance.runner", "run"]
    assert container["resources"] == {
        "requests": {"cpu": "2000m", "memory": "4096Mi"},
        "limits": {"memory": "4096Mi"},
    }
    env = {e["name"]: e for e in container["env"]}
    # the same spec the local supervisor hands its child
    assert json.loads(env["APPLIANCE_JOB_SPEC"]["value"]) == json.loads(spec.to_json())
    assert env["APPLIANCE_S3_ENDPOINT"]["value"] == "10.0.0.5:9000"
    assert env["APPLIANCE_S3_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": S3_SECRET, "key": "access_key"}
    }
    assert env["OMP_PROC_BIND"]["value"] == "false"
    assert "never-in-a-manifest" not in json.dumps(job)  # credentials come from the Secret
    # the validator is strict: a misspelt field would not pass
    _container(job)["imagePulPolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S, strict=True)


def test_a_gpu_job_gets_the_device_and_the_nvidia_runtime() -> None:
    spec = JobSpec(kind="train-mlp", resources={"cpu": "500m", "memory": "2Gi", "gpu": 1})
    job = valid(job_manifest("a1b2c3", spec, SETTINGS))
    assert job["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    assert _container(job)["resources"]["limits"] == {"memory": "2048Mi", "nvidia.com/gpu": 1}
    assert _container(job)["resources"]["requests"]["cpu"] == "500m"
    assert "activeDeadlineSeconds" not in job["spec"]
    assert "activeDeadlineSeconds" not in job["spec"]["template"]["spec"]


def test_a_command_job_runs_its_command_where_it_asked() -> None:
    spec = JobSpec(kind="command", command=["python", "train.py", "--lr", "0.1"], workdir="/work")
    container = _container(valid(job_manifest("c0ffee", spec, SETTINGS)))
    assert container["command"] == ["python", "train.py", "--lr", "0.1"]
    assert container["workingDir"] == "/work"


def test_names_kubernetes_refuses_are_refused_first() -> None:
    spec = JobSpec(kind="command", command=["true"])
    for bad in ("Job_1", "-x", "a" * 60, ""):
        with pytest.raises(InvalidInput, match="job id"):
            job_manifest(bad, spec, SETTINGS)
    with pytest.raises(InvalidInput, match="resources.gpu"):
        job_manifest(
            "ok", JobSpec(kind="command", command=["true"], resources={"gpu": -1}), SETTINGS
        )
