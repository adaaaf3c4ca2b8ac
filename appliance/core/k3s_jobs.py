"""A job spec as a Kubernetes Job: the k3s executor's half of "the same spec means the same
thing on both executors".

The Job runs the appliance runtime image with the spec in `APPLIANCE_JOB_SPEC`, exactly as
the local supervisor's child gets it; the job reads and writes the object store (S3
credentials from a Secret, never in the manifest) and reports through stdout, which the
executor will read from the pod's log with the same line parser. Resources become requests
and limits, a GPU request becomes an `nvidia.com/gpu` limit on the `nvidia` RuntimeClass, the
timeout becomes `activeDeadlineSeconds` and retries `backoffLimit`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from appliance.config import Settings
from appliance.core.jobs import SPEC_ENV, JobSpec
from appliance.errors import InvalidInput

NAMESPACE = "appliance"
S3_SECRET = "appliance-s3"  # keys: access_key, secret_key (written by install.sh --server)
JOB_LABEL = "appliance.dev/job-id"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
RUNTIME_IMAGE = "appliance-runtime:0.1.0"  # imported from the bundle: never pulled


def _quantity_memory(value: int) -> str:
    """Bytes as a Kubernetes quantity, in whole MiB when exact (readable in `kubectl get`)."""
    return f"{value // 2**20}Mi" if value % 2**20 == 0 else str(value)


def job_manifest(
    job_id: str,
    spec: JobSpec,
    settings: Settings,
    image: str = RUNTIME_IMAGE,
) -> dict[str, Any]:
    """The Job for one attempt-set of a job spec (Kubernetes retries it `retries` times)."""
    if not _DNS_LABEL.fullmatch(job_id) or len(job_id) > 59:  # "job-" + id: a DNS label
        raise InvalidInput(f"job id {job_id!r}: lowercase letters, digits and '-' (at most 59)")
    spec.validate()
    request = spec.request()
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": f"{math.ceil(request.cpu * 1000)}m"},
        "limits": {},
    }
    if request.memory:
        memory = _quantity_memory(request.memory)
        resources["requests"]["memory"] = memory
        resources["limits"]["memory"] = memory  # a job over its memory is killed, as locally
    if request.gpu:
        resources["limits"]["nvidia.com/gpu"] = request.gpu
    if not resources["limits"]:
        del resources["limits"]
    s3 = settings.s3
    env = [
        {"name": SPEC_ENV, "value": spec.to_json()},
        {"name": "APPLIANCE_JOB_ID", "value": job_id},
        {"name": "APPLIANCE_HOME", "value": "/var/lib/appliance"},
        {"name": "APPLIANCE_STORE", "value": settings.store},
        {"name": "APPLIANCE_S3_ENDPOINT", "value": s3.endpoint},
        {"name": "APPLIANCE_S3_BUCKET", "value": s3.bucket},
        {"name": "APPLIANCE_S3_SECURE", "value": "true" if s3.secure else "false"},
        {"name": "APPLIANCE_S3_REGION", "value": s3.region},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *(
            {
                "name": f"APPLIANCE_S3_{key.upper()}",
                "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": key}},
            }
            for key in ("access_key", "secret_key")
        ),
        *({"name": k, "value": v} for k, v in sorted(spec.env.items())),
    ]
    command = list(spec.command) if spec.kind == "command" else None
    container: dict[str, Any] = {
        "name": "job",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "resources": resources,
    }
    if command is not None:
        container["command"] = command
        if spec.workdir:
            container["workingDir"] = spec.workdir
    else:
        container["command"] = ["python", "-m", "appliance.runner", "run"]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
    }
    if request.gpu:
        pod["runtimeClassName"] = "nvidia"
    labels = {JOB_LABEL: job_id, "app.kubernetes.io/managed-by": "appliance"}
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"job-{job_id}", "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "backoffLimit": spec.retries,
            "ttlSecondsAfterFinished": 86_400,  # the metadata store keeps the record
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
    if spec.timeout is not None:
        job["spec"]["activeDeadlineSeconds"] = max(1, math.ceil(spec.timeout))
    return job
