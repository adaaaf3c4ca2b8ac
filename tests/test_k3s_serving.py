"""Deployments on k3s: every manifest validated against the Kubernetes schemas (strict); deploy,
rollback, stop and start against a recording fake `kubectl` first on PATH (argv and the
applied manifest on stdin recorded, answers in real `kubectl -o json` shapes); the rollout
status mapped from those shapes; failures leave the registry as it was; and the pod's own
process serving a version from S3 (moto) without the metadata database."""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from appliance.config import K3sSettings, S3Settings, Settings
from appliance.core import deployments
from appliance.core.context import Appliance
from appliance.core.k3s_jobs import S3_SECRET
from appliance.core.k3s_serving import (
    MODEL_ENV,
    REVISION_ANNOTATION,
    check_backend,
    deployment_manifests,
    kube_name,
    rollout_state,
)
from appliance.errors import InvalidInput
from appliance.store.objects import S3ObjectStore
from tests.clients import predict
from tests.conftest import free_port

from .test_objects import s3_endpoint  # noqa: F401  (module-scoped moto server fixture)

K8S = "1.32"  # the Kubernetes of the k3s release the bundle pins (v1.32.3+k3s1)
BUCKET = "k3s-serving"
KEYS = {"access_key": "test", "secret_key": "testtest"}  # moto's; never in a manifest

# `kubectl get deployment -o json` as k3s prints it (trimmed to metadata, spec and status).
_META = {
    "name": "serve-scoring",
    "namespace": "appliance",
    "uid": "5f0c9a4e-2d1b-4c8e-9a51-0b7d3e6f1a22",
    "resourceVersion": "48213",
    "creationTimestamp": "2026-11-26T10:00:00Z",
    "labels": {"app.kubernetes.io/name": "appliance-model-server"},
    "annotations": {"deployment.kubernetes.io/revision": "2", REVISION_ANNOTATION: "2"},
}
_SPEC = {
    "replicas": 2,
    "progressDeadlineSeconds": 300,
    "revisionHistoryLimit": 10,
    "selector": {"matchLabels": {"app.kubernetes.io/name": "appliance-model-server"}},
    "strategy": {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    },
}
_AVAILABLE_CONDITION = {
    "type": "Available",
    "status": "True",
    "reason": "MinimumReplicasAvailable",
    "message": "Deployment has minimum availability.",
    "lastTransitionTime": "2026-11-26T10:00:09Z",
    "lastUpdateTime": "2026-11-26T10:00:09Z",
}
AVAILABLE = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {**_META, "generation": 2},
    "spec": _SPEC,
    "status": {
        "observedGeneration": 2,
        "replicas": 2,
        "updatedReplicas": 2,
        "readyReplicas": 2,
        "availableReplicas": 2,
        "conditions": [
            _AVAILABLE_CONDITION,
            {
                "type": "Progressing",
                "status": "True",
                "reason": "NewReplicaSetAvailable",
                "message": 'ReplicaSet "serve-scoring-6d4cf56db6" has successfully progressed.',
                "lastTransitionTime": "2026-11-26T10:00:00Z",
                "lastUpdateTime": "2026-11-26T10:00:12Z",
            },
        ],
    },
}


def _mid_rollout(progressing: dict[str, Any]) -> dict[str, Any]:
    """Revision 3 rolling out over revision 2's pods: one of three updated, as kubectl shows
    it, with the Progressing condition given."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {**_META, "generation": 3},
        "spec": _SPEC,
        "status": {
            "observedGeneration": 3,
            "replicas": 3,
            "updatedReplicas": 1,
            "readyReplicas": 2,
            "availableReplicas": 2,
            "unavailableReplicas": 1,
            "conditions": [_AVAILABLE_CONDITION, {"type": "Progressing", **progressing}],
        },
    }


PROGRESSING = _mid_rollout(
    {
        "status": "True",
        "reason": "ReplicaSetUpdated",
        "message": 'ReplicaSet "serve-scoring-7b9f8c6d5c" is progressing.',
        "lastTransitionTime": "2026-11-26T10:05:00Z",
        "lastUpdateTime": "2026-11-26T10:05:01Z",
    }
)
FAILED = _mid_rollout(
    {
        "status": "False",
        "reason": "ProgressDeadlineExceeded",
        "message": 'ReplicaSet "serve-scoring-7b9f8c6d5c" has timed out progressing.',
        "lastTransitionTime": "2026-11-26T10:10:01Z",
        "lastUpdateTime": "2026-11-26T10:10:01Z",
    }
)
SHAPES = {"available": AVAILABLE, "progressing": PROGRESSING, "failed": FAILED}

FAKE = r"""#!PYTHON
import json, os, sys
args = sys.argv[1:]
stdin = sys.stdin.read() if "-" in args else None
with open(os.environ["FAKE_KUBE_LOG"], "a") as log:
    log.write(json.dumps({"argv": [os.path.basename(sys.argv[0]), *args], "stdin": stdin}) + "\n")
if os.environ.get("FAKE_KUBE_FAIL"):
    print("E1126 10:00:00.000000  4242 memcache.go:265] couldn't get current server API "
          "group list", file=sys.stderr)
    print(os.environ["FAKE_KUBE_FAIL"], file=sys.stderr)
    sys.exit(1)
if args[:1] == ["--kubeconfig"]:
    args = args[2:]
state = os.environ["FAKE_KUBE_STATE"]
applied = os.path.join(state, "applied.json")
if args[:5] == ["apply", "-f", "-", "-o", "json"]:
    document = json.loads(stdin)
    for i, item in enumerate(document["items"]):  # what the API server adds
        item["metadata"].update(uid="uid-%d" % i, resourceVersion="4821%d" % i, generation=1)
        if item["kind"] == "Service":
            item["spec"]["clusterIP"] = "10.43.17.201"
            item["spec"]["clusterIPs"] = ["10.43.17.201"]
            for port in item["spec"]["ports"]:
                port.setdefault("nodePort", 31080)
    json.dump(document, open(applied, "w"))
    print(json.dumps(document, indent=4))
elif args[:2] == ["get", "deployment"]:
    if not os.path.exists(applied):
        print('Error from server (NotFound): deployments.apps "%s" not found' % args[2],
              file=sys.stderr)
        sys.exit(1)
    shape_file = os.environ.get("FAKE_ROLLOUT", "available") + ".json"
    shape = json.load(open(os.path.join(state, shape_file)))
    live = [i for i in json.load(open(applied))["items"] if i["kind"] == "Deployment"][0]
    shape["metadata"]["name"] = live["metadata"]["name"]
    shape["metadata"]["annotations"] = dict(live["metadata"]["annotations"])
    shape["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "2"
    print(json.dumps(shape, indent=4))
elif args[:1] == ["delete"]:
    if os.path.exists(applied):
        os.remove(applied)
    for resource in args[1:3]:
        kind, name = resource.split("/")
        print('%s "%s" deleted' % ({"deployment": "deployment.apps"}.get(kind, kind), name))
else:
    print("error: unknown command " + " ".join(args), file=sys.stderr)
    sys.exit(1)
"""


def valid(manifest: dict[str, Any]) -> dict[str, Any]:
    kubernetes_validate.validate(manifest, K8S, strict=True)
    return manifest


# ---- manifests --------------------------------------------------------------------------------

SETTINGS = Settings(
    home=Path("unused"),
    store="s3",
    s3=S3Settings(endpoint="10.0.0.5:9000", access_key="never-in-a-manifest", secret_key="x"),
    executor="k3s",
    k3s=K3sSettings(namespace="models", image="appliance-runtime:0.2.0"),
)
VERSION = {
    "id": 7,
    "model": "churn",
    "version": 2,
    "ref": "churn@2",
    "sha256": "ab" * 32,
    "flavor": "lightgbm",
    "signature": {
        "signature": [
            {"name": "tenure_months", "type": "double"},
            {"name": "contract", "type": "category", "categories": ["monthly", "two-year"]},
        ],
        "objective": "binary",
        "labels": [],
        "target": "churned",
    },
    "feature_service": None,
}


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return objects[0]["spec"]["template"]["spec"]["containers"][0]


def test_a_revision_is_a_deployment_and_a_nodeport_service() -> None:
    objects = [valid(o) for o in deployment_manifests("churn", 3, VERSION, SETTINGS, replicas=2)]
    deployment, service = objects
    assert [o["kind"] for o in objects] == ["Deployment", "Service"]
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "serve-churn"
    assert deployment["metadata"]["namespace"] == service["metadata"]["namespace"] == "models"
    labels = deployment["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "appliance-model-server"
    assert labels["appliance.dev/deployment"] == "churn"
    assert deployment["metadata"]["annotations"] == {
        "appliance.dev/deployment": "churn",
        "appliance.dev/revision": "3",
        "appliance.dev/model": "churn@2",
    }
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"] == selector
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    pod = spec["template"]["spec"]
    assert "runtimeClassName" not in pod
    assert pod["terminationGracePeriodSeconds"] == 60  # time to post the log at a stop
    container = _container(objects)
    assert container["image"] == "appliance-runtime:0.2.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["command"] == [
        "python",
        "-m",
        "appliance.runner",
        "serve-pod",
        "--port",
        "8080",
    ]
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["resources"] == {
        "requests": {"cpu": "1000m", "memory": "1024Mi"},
        "limits": {"memory": "1024Mi"},
    }
    env = {e["name"]: e for e in container["env"]}
    # the pod gets the resolved version, not the metadata database
    assert json.loads(env[MODEL_ENV]["value"]) == {
        "deployment": "churn",
        "revision": 3,
        "model": "churn",
        "version": 2,
        "ref": "churn@2",
        "sha256": "ab" * 32,
        "flavor": "lightgbm",
        "signature": VERSION["signature"],
    }
    assert env["APPLIANCE_STORE"]["value"] == "s3"
    assert env["APPLIANCE_S3_ENDPOINT"]["value"] == "10.0.0.5:9000"
    assert env["APPLIANCE_S3_SECRET_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": S3_SECRET, "key": "secret_key"}
    }
    assert "never-in-a-manifest" not in json.dumps(objects)  # credentials come from the Secret
    # strict: a misspelt field does not pass
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S, strict=True)


def test_a_gpu_revision_gets_the_device_the_nvidia_runtime_and_a_pinned_node_port() -> None:
    objects = deployment_manifests(
        "Fraud_v2",
        1,
        VERSION,
        SETTINGS,
        resources={"cpu": "500m", "memory": "3Gi", "gpu": 1},
        node_port=30080,
    )
    deployment, service = (valid(o) for o in objects)
    assert deployment["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    assert _container(objects)["resources"] == {
        "requests": {"cpu": "500m", "memory": "3072Mi"},
        "limits": {"memory": "3072Mi", "nvidia.com/gpu": 1},
    }
    assert service["spec"]["ports"][0]["nodePort"] == 30080
    # a name that is not a DNS label gets a safe one, told apart by a hash of the name
    name = deployment["metadata"]["name"]
    assert name == kube_name("Fraud_v2") and name.startswith("serve-fraud-v2-")
    assert deployment["metadata"]["annotations"]["appliance.dev/deployment"] == "Fraud_v2"
    assert kube_name("fraud-v2") != name and len(kube_name("x" * 63)) <= 63


def test_what_k3s_serving_refuses_before_anything_is_written() -> None:
    with pytest.raises(InvalidInput, match="resources.gpu"):
        deployment_manifests("churn", 1, VERSION, SETTINGS, resources={"gpu": -1})
    with pytest.raises(InvalidInput, match="set store = 's3'"):
        check_backend(Settings(home=Path("unused"), executor="k3s"), None, None)
    with pytest.raises(InvalidInput, match="--feature-service"):
        check_backend(SETTINGS, "driver_model", None)
    with pytest.raises(InvalidInput, match="--port 8080: on k3s the port is the Service's node"):
        check_backend(SETTINGS, None, 8080)


# ---- rollout status ---------------------------------------------------------------------------


def test_rollout_status_from_real_deployment_shapes() -> None:
    assert rollout_state(AVAILABLE) == {
        "state": "available",
        "desired": 2,
        "updated": 2,
        "ready": 2,
        "available": 2,
        "manifest_revision": 2,
        "message": 'ReplicaSet "serve-scoring-6d4cf56db6" has successfully progressed.',
    }
    assert rollout_state(PROGRESSING) == {
        "state": "progressing",
        "desired": 2,
        "updated": 1,
        "ready": 2,
        "available": 2,
        "manifest_revision": 2,
        "message": "1 of 2 new replicas updated",
    }
    assert rollout_state(FAILED) == {
        "state": "failed",
        "desired": 2,
        "updated": 1,
        "ready": 2,
        "available": 2,
        "manifest_revision": 2,
        "message": 'ReplicaSet "serve-scoring-7b9f8c6d5c" has timed out progressing.',
    }
    unobserved = copy.deepcopy(AVAILABLE)
    unobserved["metadata"]["generation"] = 3  # applied, not yet seen by the controller
    assert rollout_state(unobserved)["state"] == "progressing"
    assert "observe" in rollout_state(unobserved)["message"]
    old_pods = copy.deepcopy(AVAILABLE)
    old_pods["status"]["replicas"] = 3
    assert rollout_state(old_pods)["message"] == "1 old replica(s) pending termination"


# ---- against the fake cluster -----------------------------------------------------------------


def _copy_database(source: Path, target: Path) -> None:
    src = sqlite3.connect(source)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


@pytest.fixture(scope="module")
def k3s_objects(trained_home: Path, s3_endpoint: str, tmp_path_factory: Any) -> str:  # noqa: F811
    """The trained home's objects (its model files), in the S3 bucket k3s homes use."""
    store = S3ObjectStore(
        endpoint=s3_endpoint,
        bucket=BUCKET,
        secure=False,
        cache_dir=tmp_path_factory.mktemp("upload-cache"),
        **KEYS,
    )
    for path in (trained_home / "objects").rglob("*"):
        if path.is_file():
            store.put_file(path)
    return s3_endpoint


@pytest.fixture
def cluster(
    trained_home: Path, k3s_objects: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """A home in cluster mode (executor k3s, objects in S3) holding the trained home's
    registry, and a recording fake kubectl first on PATH."""
    home = tmp_path / "home"
    home.mkdir()
    _copy_database(trained_home / "metadata.db", home / "metadata.db")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE.replace("PYTHON", sys.executable, 1))
    kubectl.chmod(0o755)
    state = tmp_path / "cluster"
    state.mkdir()
    for shape, body in SHAPES.items():
        (state / f"{shape}.json").write_text(json.dumps(body))
    kubeconfig = tmp_path / "k3s.yaml"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    (home / "appliance.toml").write_text(
        'executor = "k3s"\nstore = "s3"\n'
        f'[s3]\nendpoint = "{k3s_objects}"\nbucket = "{BUCKET}"\nsecure = false\n'
        f'access_key = "{KEYS["access_key"]}"\nsecret_key = "{KEYS["secret_key"]}"\n'
        f'[k3s]\nkubeconfig = "{kubeconfig}"\n'
    )
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_KUBE_LOG", str(log))
    monkeypatch.setenv("FAKE_KUBE_STATE", str(state))
    monkeypatch.setenv("APPLIANCE_K3S_POLL", "0.05")
    app = Appliance.open(home)

    class Cluster:
        def __init__(self) -> None:
            self.app = app
            self.home = ["--home", str(home)]
            self.kube = ["kubectl", "--kubeconfig", str(kubeconfig)]

        def calls(self) -> list[dict[str, Any]]:
            if not log.exists():
                return []
            return [json.loads(line) for line in log.read_text().splitlines()]

        def argv(self) -> list[list[str]]:
            return [c["argv"] for c in self.calls()]

        def forget(self) -> None:
            log.unlink(missing_ok=True)

        def rollout(self, shape: str) -> None:
            monkeypatch.setenv("FAKE_ROLLOUT", shape)

        def fail(self, stderr: str | None) -> None:
            if stderr is None:
                monkeypatch.delenv("FAKE_KUBE_FAIL", raising=False)
            else:
                monkeypatch.setenv("FAKE_KUBE_FAIL", stderr)

        def stored(self, name: str, revision: int) -> str | None:
            return app.db.scalar(
                "SELECT r.manifest_json FROM deployment_revisions r JOIN deployments d "
                "ON d.id = r.deployment_id WHERE d.name = ? AND r.revision = ?",
                (name, revision),
            )

        def revisions(self, name: str) -> list[tuple[int, int, str]]:
            rows = deployments.list_revisions(app, name)
            return [(r["revision"], r["model_version"], r["action"]) for r in rows]

    yield Cluster()
    app.close()


def _apply(c: Any) -> list[str]:
    return [*c.kube, "apply", "-f", "-", "-o", "json"]


def _get(c: Any, name: str) -> list[str]:
    return [*c.kube, "get", "deployment", name, "-n", "appliance", "-o", "json"]


def _applied(call: dict[str, Any]) -> list[dict[str, Any]]:
    document = json.loads(call["stdin"])
    assert document["kind"] == "List" and document["apiVersion"] == "v1"
    return [valid(item) for item in document["items"]]


def _model_env(objects: list[dict[str, Any]]) -> dict[str, Any]:
    env = {e["name"]: e.get("value") for e in _container(objects)["env"]}
    return dict(json.loads(env[MODEL_ENV]))


def test_deploy_and_rollback_apply_the_revisions_stored_manifests(cluster: Any, cli: Any) -> None:
    c = cluster
    created = cli("deploy", "churn/1", "--name", "scoring", "--workers", "2", "--json", *c.home)
    assert created.code == 0, created.err
    dep = created.json()
    assert dep["backend"] == "k3s" and dep["status"] == "serving"
    assert dep["current_revision"] == 1 and dep["model_version"] == 1
    assert dep["url"] == "http://127.0.0.1:31080"  # the node port the cluster gave the Service
    assert dep["rollout"]["state"] == "available" and dep["rollout"]["manifest_revision"] == 1
    calls = c.calls()
    assert [x["argv"] for x in calls] == [_apply(c), _get(c, "serve-scoring")]
    assert calls[0]["stdin"] == c.stored("scoring", 1)  # what was applied is what is stored
    first = _applied(calls[0])
    assert first[0]["spec"]["replicas"] == 2
    assert _model_env(first)["version"] == 1 and _model_env(first)["revision"] == 1
    assert "testtest" not in calls[0]["stdin"]

    c.forget()
    second = cli("deploy", "churn/2", "--name", "scoring", "--json", *c.home)
    assert second.code == 0, second.err
    assert second.json()["current_revision"] == 2 and second.json()["model_version"] == 2
    calls = c.calls()
    assert [x["argv"] for x in calls] == [_apply(c), _get(c, "serve-scoring")]
    assert calls[0]["stdin"] == c.stored("scoring", 2)
    objects = _applied(calls[0])
    assert objects[0]["metadata"]["annotations"][REVISION_ANNOTATION] == "2"
    assert _model_env(objects)["version"] == 2
    assert objects[1]["spec"]["ports"][0]["nodePort"] == 31080  # the address stays

    c.forget()
    back = cli("deployments", "rollback", "scoring", "--json", *c.home)
    assert back.code == 0, back.err
    assert back.json()["current_revision"] == 3 and back.json()["model_version"] == 1
    calls = c.calls()
    assert [x["argv"] for x in calls] == [_apply(c), _get(c, "serve-scoring")]
    # exactly revision 1's manifest, from the registry; never `kubectl rollout undo`
    assert calls[0]["stdin"] == c.stored("scoring", 1) == c.stored("scoring", 3)
    assert json.loads(calls[0]["stdin"])["items"] == first
    assert not any("rollout" in argv for argv in c.argv())
    assert c.revisions("scoring") == [(1, 1, "deploy"), (2, 2, "deploy"), (3, 1, "rollback")]
    status = cli("deployments", "status", "scoring", "--json", *c.home).json()
    assert status["revision"] == 3 and status["manifest_revision"] == 1

    c.forget()  # rolling back to revision 2 applies revision 2's manifest
    again = deployments.rollback(c.app, "scoring", to_revision=2)
    assert again["current_revision"] == 4 and again["model_version"] == 2
    assert c.calls()[0]["stdin"] == c.stored("scoring", 2)


def test_rollout_status_show_and_wait(cluster: Any, cli: Any) -> None:
    c = cluster
    assert cli("deploy", "churn/1", "--name", "scoring", *c.home).code == 0
    c.forget()
    status = cli("deployments", "status", "scoring", "--json", *c.home)
    assert status.json() == {
        "name": "scoring",
        "backend": "k3s",
        "revision": 1,
        "model_version": 1,
        "state": "available",
        "desired": 2,
        "updated": 2,
        "ready": 2,
        "available": 2,
        "manifest_revision": 1,
        "message": 'ReplicaSet "serve-scoring-6d4cf56db6" has successfully progressed.',
    }
    assert c.argv() == [_get(c, "serve-scoring")]
    c.rollout("progressing")
    shown = cli("deployments", "show", "scoring", "--json", *c.home).json()
    assert shown["rollout"]["state"] == "progressing"
    assert shown["rollout"]["message"] == "1 of 2 new replicas updated"
    assert [r["revision"] for r in shown["revisions"]] == [1]
    waited = cli("deployments", "status", "scoring", "--wait", "--timeout", "1", *c.home)
    assert waited.code == 1 and "did not complete within 1s: 1 of 2 new replicas" in waited.err
    c.rollout("failed")
    failed = cli("deployments", "status", "scoring", "--json", *c.home)
    assert failed.code == 0 and failed.json()["state"] == "failed"
    # a deploy whose rollout fails says so; the revision stays recorded (roll back to undo it)
    broken = cli("deploy", "churn/2", "--name", "scoring", *c.home)
    assert broken.code == 1
    assert "revision 2 applied, but its rollout failed: ReplicaSet" in broken.err
    assert "deployments rollback scoring" in broken.err
    assert c.revisions("scoring") == [(1, 1, "deploy"), (2, 2, "deploy")]
    c.fail("The connection to the server 127.0.0.1:6443 was refused")
    unknown = cli("deployments", "show", "scoring", "--json", *c.home).json()
    assert (
        unknown["rollout"]["state"] == "unknown" and "was refused" in unknown["rollout"]["message"]
    )


def test_a_refused_manifest_records_nothing(cluster: Any, cli: Any) -> None:
    c = cluster
    c.fail('Error from server (Forbidden): deployments.apps "serve-scoring" is forbidden')
    created = cli("deploy", "churn/1", "--name", "scoring", *c.home)
    assert created.code == 7
    assert created.err.strip() == (
        "error: deployment 'scoring': revision 1 not recorded, the cluster did not take "
        f"revision 1's manifest: `{' '.join(_apply(c))}` failed (exit 1): "
        "E1126 10:00:00.000000  4242 memcache.go:265] couldn't get current server API "
        'group list | Error from server (Forbidden): deployments.apps "serve-scoring" is forbidden'
    )
    assert c.app.db.scalar("SELECT count(*) FROM deployments WHERE name = 'scoring'") == 0

    c.fail(None)
    assert cli("deploy", "churn/1", "--name", "scoring", *c.home).code == 0
    assert cli("deploy", "churn/2", "--name", "scoring", *c.home).code == 0
    before = deployments.get_deployment(c.app, "scoring")
    c.fail("error: timed out waiting for the condition")
    c.forget()
    for args, revision in (
        (("deploy", "churn/1", "--name", "scoring"), 3),
        (("deployments", "rollback", "scoring"), 3),
    ):
        refused = cli(*args, *c.home)
        assert refused.code == 7, refused.err
        assert f"revision {revision} not recorded" in refused.err
        assert "timed out waiting for the condition" in refused.err
    assert all(argv == _apply(c) for argv in c.argv())
    after = deployments.get_deployment(c.app, "scoring")
    assert after["current_revision"] == before["current_revision"] == 2
    assert after["generation"] == before["generation"]
    assert c.revisions("scoring") == [(1, 1, "deploy"), (2, 2, "deploy")]
    refs = [
        r["ref"]
        for r in c.app.db.rows("SELECT ref FROM lineage_executions WHERE ref LIKE '%:scoring#%'")
    ]
    assert sorted(refs) == ["deploy:scoring#1", "deploy:scoring#2"]


def test_without_k3s_a_deploy_says_how_to_install_it(
    cluster: Any, cli: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # neither kubectl nor k3s
    result = cli("deploy", "churn/1", "--name", "scoring", *cluster.home)
    assert result.code == 7
    assert "k3s is not installed on this machine" in result.err
    assert "revision 1 not recorded" in result.err
    assert cluster.app.db.scalar("SELECT count(*) FROM deployments WHERE name = 'scoring'") == 0


def test_stop_deletes_and_start_applies_the_current_manifest_again(cluster: Any, cli: Any) -> None:
    c = cluster
    assert cli("deploy", "churn/1", "--name", "scoring", "--port", "30080", *c.home).code == 0
    assert cli("deploy", "churn/2", "--name", "scoring", *c.home).code == 0
    c.forget()
    stopped = cli("deployments", "stop", "scoring", "--json", *c.home)
    assert stopped.code == 0, stopped.err
    assert stopped.json()["status"] == "stopped" and stopped.json()["url"] is None
    assert c.argv() == [
        [
            *c.kube,
            "delete",
            "deployment/serve-scoring",
            "service/serve-scoring",
            "-n",
            "appliance",
            "--ignore-not-found",
            "--wait=false",
        ]
    ]
    # the agent leaves it alone: the cluster, not a local process, serves a k3s deployment
    assert "scoring" not in [d["name"] for d in deployments.crashed_deployments(c.app)]
    status = cli("deployments", "status", "scoring", "--json", *c.home).json()
    assert status["state"] == "stopped"
    # a revision deployed while stopped is recorded and applied when it starts
    c.forget()
    assert cli("deploy", "churn/1", "--name", "scoring", *c.home).code == 0
    assert c.argv() == [] and c.stored("scoring", 3) is not None
    c.fail("The connection to the server 127.0.0.1:6443 was refused")
    down = cli("deployments", "start", "scoring", *c.home)
    assert down.code == 7 and "not started, the cluster did not take revision 3's" in down.err
    assert deployments.get_deployment(c.app, "scoring")["status"] == "stopped"
    c.fail(None)
    c.forget()
    started = cli("deployments", "start", "scoring", "--json", *c.home)
    assert started.code == 0, started.err
    assert started.json()["url"] == "http://127.0.0.1:30080"  # pinned by --port
    calls = c.calls()
    assert [x["argv"] for x in calls] == [_apply(c), _get(c, "serve-scoring")]
    assert calls[0]["stdin"] == c.stored("scoring", 3)
    assert _applied(calls[0])[1]["spec"]["ports"][0]["nodePort"] == 30080
    refused = cli("deployments", "start", "scoring", "--workers", "3", *c.home)
    assert refused.code == 4 and "fixes its replicas" in refused.err


def test_an_alias_move_applies_the_followers_new_revision(cluster: Any, cli: Any) -> None:
    c = cluster
    home = c.home
    assert cli("models", "alias", "set", "churn", "live", "1", *home).code == 0
    followed = cli("deploy", "churn@live", "--name", "scoring", "--follow-alias", *home)
    assert followed.code == 0, followed.err
    c.forget()
    assert cli("models", "alias", "set", "churn", "live", "2", *home).code == 0
    calls = c.calls()
    assert [x["argv"] for x in calls] == [_apply(c), _get(c, "serve-scoring")]
    assert calls[0]["stdin"] == c.stored("scoring", 2)
    assert _model_env(_applied(calls[0]))["version"] == 2
    assert c.revisions("scoring") == [(1, 1, "deploy"), (2, 2, "follow")]
    # the cluster refusing it refuses the move: the alias and the deployment stay as they were
    c.fail('error: the server doesn\'t have a resource type "deployments"')
    moved = cli("models", "alias", "set", "churn", "live", "1", *home)
    assert moved.code == 7 and "revision 3 not recorded" in moved.err
    assert c.revisions("scoring") == [(1, 1, "deploy"), (2, 2, "follow")]
    assert "live" in cli("models", "show", "churn/2", "--json", *home).json()["aliases"]


def test_a_local_deployment_stays_local_and_k3s_refuses_what_it_cannot_serve(
    cluster: Any, cli: Any
) -> None:
    c = cluster
    # the trained home's 'churn' was created locally: it stays a local deployment
    result = cli("deploy", "churn/2", "--name", "churn", "--json", *c.home)
    assert result.code == 0, result.err
    assert result.json()["backend"] == "local" and result.json()["model_version"] == 2
    assert c.argv() == [] and c.stored("churn", result.json()["current_revision"]) is None
    assert cli("deploy", "churn/1", "--name", "scoring", *c.home).code == 0
    canary = cli("deploy", "churn/2", "--name", "scoring", "--canary", "10", *c.home)
    assert canary.code == 2 and "canaries are served by the local backend" in canary.err
    assert c.revisions("scoring") == [(1, 1, "deploy")]
    bad_port = cli("deploy", "churn/1", "--name", "other", "--port", "8080", *c.home)
    assert bad_port.code == 2 and "node port" in bad_port.err
    gpus = cli("deploy", "churn/1", "--name", "other", "--gpus", "1", "--cpus", "2", *c.home)
    assert gpus.code == 0, gpus.err
    container = _container(_applied(c.calls()[-2]))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["cpu"] == "2000m"
    kept = cli("deploy", "churn/2", "--name", "other", "--gpus", "0", *c.home)
    assert kept.code == 4 and "keeps its pods' resources" in kept.err


# ---- the pod ------------------------------------------------------------------------------


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise AssertionError("the pod's server did not become ready")


def test_the_pod_serves_its_version_from_s3_without_the_metadata_database(
    cluster: Any, cli: Any, tmp_path: Path
) -> None:
    import duckdb

    from appliance.core.prediction_log import log_files, posted_box, ship_logs

    c = cluster
    deployed = cli("deploy", "churn/2", "--name", "scoring", "--log-sample", "1", *c.home)
    assert deployed.code == 0, deployed.err
    objects = json.loads(c.stored("scoring", 1) or "")["items"]
    container = _container(objects)
    # the container's environment as the kubelet builds it: Secret values filled in
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for item in container["env"]:
        if "valueFrom" in item:
            env[item["name"]] = KEYS[item["valueFrom"]["secretKeyRef"]["key"]]
        else:
            env[item["name"]] = item["value"]
    pod_home = tmp_path / "pod"
    env["APPLIANCE_HOME"] = str(pod_home)  # the emptyDir
    env["APPLIANCE_SHIP_SECONDS"] = env["APPLIANCE_LOG_ROTATE_SECONDS"] = "0.3"
    port = free_port()
    command = [sys.executable, *container["command"][1:-1], str(port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    box = posted_box("scoring")
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc)
        assert predict(url, "first") == "2"
        with urllib.request.urlopen(url + "/v2/health/live", timeout=5) as response:
            assert json.loads(response.read()) == {"live": True}
        with urllib.request.urlopen(url + "/version", timeout=5) as response:
            version = json.loads(response.read())
        assert version["model_version"] == 2 and version["revision"] == 1
        # the pod posts its closed log files to the store while it serves
        deadline = time.monotonic() + 20
        while not c.app.objects.inbox(box) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.app.objects.inbox(box), "the pod posted no log file"
        # a logging change reaches the running pod through the store: inputs off
        assert cli("deployments", "logging", "scoring", "--sample", "0", *c.home).code == 0
        time.sleep(1.5)  # the pod reads the settings every 0.3 s
        assert predict(url, "later") == "2"
    finally:
        proc.terminate()  # the kubelet's stop: what the pod logged is posted before it exits
        assert proc.wait(timeout=10) == 0
    assert not (pod_home / "metadata.db").exists()
    # the agent's pass (or a reader's) takes the posted files and ships them
    assert ship_logs(c.app, "scoring")["failed"] == 0
    assert c.app.objects.inbox(box) == []
    requests = ", ".join(f"'{f}'" for f in log_files(c.app, "scoring", "requests"))
    inputs = ", ".join(f"'{f}'" for f in log_files(c.app, "scoring", "inputs"))
    assert duckdb.sql(
        f"SELECT request_id, version, revision, role, status FROM read_parquet([{requests}]) "
        "ORDER BY ts"
    ).fetchall() == [("first", 2, 1, "stable", 200), ("later", 2, 1, "stable", 200)]
    logged = duckdb.sql(f"SELECT request_id FROM read_parquet([{inputs}])").fetchall()
    assert logged == [("first",)]  # sampled before the change, not after


def test_a_pod_posts_what_it_can_and_keeps_the_rest(app: Appliance) -> None:
    """A store away keeps the pod's files for the next round; a file the pod's other round
    posted meanwhile is passed over; a restarted container's open files are adopted."""
    from appliance.core.prediction_log import (
        PredictionLog,
        adopt_orphans,
        post_spool,
        posted_box,
        spool_dir,
    )
    from appliance.errors import StoreUnavailable

    plog = PredictionLog(app.settings.home, "pod", sample=0.0)
    for i in range(2):  # each flush closes its file: two closed files
        plog.record(f"r{i}", 1, 1, "stable", 200, 0.001, 1, None, None)
        plog.flush()
    spool = spool_dir(app.settings.home, "pod")
    files = sorted(p.name for p in spool.glob("*.frames"))
    assert len(files) == 2
    real = app.objects.post
    calls = []

    def away(box: str, name: str, path: Path) -> None:
        calls.append(name)
        raise StoreUnavailable("object store s3://x: connection refused")

    app.objects.post = away  # type: ignore[method-assign]
    assert post_spool(app, "pod") == (0, "object store s3://x: connection refused")
    assert sorted(p.name for p in spool.glob("*.frames")) == files  # kept, tried again
    assert calls == files[:1]  # the first failure ends the round

    def raced(box: str, name: str, path: Path) -> None:
        if name == files[0]:  # the pod's other round posted and removed it first
            path.unlink()
            raise StoreUnavailable(f"could not post {name}: no such file")
        real(box, name, path)

    app.objects.post = raced  # type: ignore[method-assign]
    assert post_spool(app, "pod") == (1, None)
    assert app.objects.inbox(posted_box("pod")) == files[1:]
    # an open file whose pid lives again (a container restarted in place, its pid reused)
    plog.record("again", 1, 1, "stable", 200, 0.001, 1, None, None)
    plog.flush()
    (closed,) = spool.glob("*.frames")
    part = spool / f"requests-2026010100-{os.getpid()}-9abc.frames.part"
    part.write_bytes(closed.read_bytes())
    closed.unlink()
    assert adopt_orphans(spool) == []
    assert part.exists()  # a live pid: a running worker's open file, left alone
    stuck = spool / "inputs-2026010100-1-5x.frames.part"
    stuck.mkdir()  # one that cannot be read is said, and holds up none of the others
    # the pod's start, before its writer
    assert adopt_orphans(spool, every=True) == [f"{stuck.name} not adopted: Is a directory"]
    assert not part.exists() and (spool / part.name.removesuffix(".part")).exists()


def test_logging_settings_reach_the_store_after_the_registry(
    cluster: Any, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Published once committed, from the committed row: with the store away the registry
    keeps the change and the error says how to hand it on; a plain `deployments logging`
    does, and so does every rollout."""
    from appliance.core.deployments import set_logging
    from appliance.core.k3s_serving import pod_logging, republish_logging
    from appliance.errors import StoreUnavailable

    c = cluster
    assert cli("deploy", "churn/2", "--name", "scoring", *c.home).code == 0
    assert pod_logging(c.app, "scoring") == (0.0, True)  # published by the rollout
    real = c.app.objects.post

    def away(*args: Any) -> None:
        raise StoreUnavailable("object store s3://x: connection refused")

    monkeypatch.setattr(c.app.objects, "post", away)
    with pytest.raises(StoreUnavailable, match=r"run `appliance deployments logging scoring`"):
        set_logging(c.app, "scoring", sample=0.5, requests=False)
    assert deployments.get_deployment(c.app, "scoring")["status"] == "serving"
    row = c.app.db.one("SELECT log_sample, log_requests FROM deployments WHERE name = 'scoring'")
    assert row is not None and (row["log_sample"], row["log_requests"]) == (0.5, 0)
    # a rollout with the store away is served all the same, and says why pods lag
    deployed = deployments.deploy(c.app, "scoring", "churn/1")
    assert "could not be given them" in deployed["logging_note"]
    monkeypatch.setattr(c.app.objects, "post", real)
    assert pod_logging(c.app, "scoring") == (0.0, True)  # the pods still have the old ones
    set_logging(c.app, "scoring")  # shows them, and hands them on
    assert pod_logging(c.app, "scoring") == (0.5, False)
    # a publisher that died between its commit and its publish: the agent's pass repairs it
    c.app.db.execute("UPDATE deployments SET log_sample = 0.25 WHERE name = 'scoring'")
    republish_logging(c.app)
    assert pod_logging(c.app, "scoring") == (0.25, False)
    posts = []
    monkeypatch.setattr(c.app.objects, "post", lambda *args: posts.append(args))
    republish_logging(c.app)  # already the registry's: nothing written
    assert posts == []
