"""Deployments on k3s: a revision as a Deployment and a Service, applied from the registry.

A deployment created while `executor = "k3s"` records `backend = 'k3s'` and stays there (one
created locally stays local, whatever the setting says later). Each of its revisions is built
into a manifest when it is appended, stored with it (`deployment_revisions.manifest_json`) and
applied with `kubectl apply -f -` in the revision's own transaction: the revision is recorded
if and only if the cluster accepted its manifest. A rollback applies the target revision's
stored manifest again, unchanged (never `kubectl rollout undo`: the registry, not the
cluster's ReplicaSet history, is the source of truth), and its new revision stores that same
manifest. Pod templates that are equal hash alike, so Kubernetes scales the old ReplicaSet
back up.

What the pod serves: the model version is resolved from the registry at deploy time and
passed whole in `APPLIANCE_SERVE_MODEL` (deployment, revision, model, version, sha256,
flavor, signature). The pod runs `python -m appliance.runner serve-pod` from the runtime
image: it fetches the model file from the object store by sha256 (S3, verified on read,
credentials from the `appliance-s3` Secret), loads it with the same `ModelRuntime` and answers
with the same `ModelServer` routes as a local worker (KServe V2, `/invocations`, health,
`/metrics`) on port 8080. It never opens the metadata database, which stays on the server
node. Only once the model is loaded does the pod listen, so `/v2/health/ready` answering is
readiness. A new revision is a new pod template, rolled out one surge pod at a time with
none unavailable; a canary or a feature service (whose online store is node-local) is served
by the local backend only.

The Service is a NodePort, because callers of an appliance are mostly outside the cluster
(inside it, `serve-NAME.NAMESPACE.svc:8080`): any node answers on the node port. `--port` pins
it (30000-32767); otherwise the deployment records the one the API server allocated, and later
revisions pin that one, so the address outlives a stop and a start. The URL shown is
`http://HOST:NODE_PORT`, HOST being `--host` (default 127.0.0.1: this node).

Prediction logs: a pod logs as a local worker does, into a spool in its emptyDir, and every
few seconds posts the closed files to the deployment's box in the object store; the agent
(or a reader that ships first) takes them from there and ships them as a local spool's. The
pod reads its logging settings from the store too (`publish_logging`, after each change and
each rollout), so a change reaches running pods within seconds, with no new revision. A pod
killed without its graceful stop, or stopped while the store is away, loses what it had not
posted; a container restarted in place posts what its predecessor had written.

Stopping deletes the Deployment and the Service; starting applies the current revision's
stored manifest again. A k3s deployment's `serving` state means "applied": the cluster, not
the agent, restarts its pods. kubectl's timeout (15 s) is below the metadata store's busy
timeout (30 s): other writers wait for an apply rather than fail.

Rollout status is read from the Deployment as `kubectl rollout status` reads it: a spec the
controller has not observed yet, or fewer updated or available replicas than desired, is
`progressing`; a `Progressing` condition with reason `ProgressDeadlineExceeded` is `failed`;
otherwise `available` (the condition's reason then is `NewReplicaSetAvailable`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.config import Settings
from appliance.core.jobs import Request
from appliance.core.k3s_jobs import pod_resources, pod_store_env
from appliance.core.kube import ClusterUnavailable, Kube
from appliance.errors import ApplianceError, InvalidInput

if TYPE_CHECKING:
    from appliance.core.context import Appliance
    from appliance.core.serving import ModelServer

log = logging.getLogger("appliance.k3s_serving")

PORT = 8080
MODEL_ENV = "APPLIANCE_SERVE_MODEL"  # the resolved model version the pod serves (JSON)
POD_HOME = "/var/lib/appliance"  # an emptyDir: the object cache, nothing else
APP_NAME = "appliance-model-server"
NAME_LABEL = "app.kubernetes.io/name"
DEPLOYMENT_LABEL = "appliance.dev/deployment"
REVISION_ANNOTATION = "appliance.dev/revision"
MODEL_ANNOTATION = "appliance.dev/model"
NAME_ANNOTATION = "appliance.dev/deployment"  # the deployment's own name, as typed
DEFAULT_RESOURCES = {"cpu": 1.0, "memory": 2**30, "gpu": 0}
NODE_PORTS = (30000, 32767)
PROGRESS_DEADLINE_S = 300  # the cluster marks a rollout failed after this long stuck
# A pod's graceful stop: uvicorn's (5 s), the writer's and the poster's last rounds (5 s
# each at most), then a last post of its log, whose calls time out after about 15 s when
# the store is away. The kubelet's default, 30 s, could kill it before it says so.
STOP_GRACE_S = 60
ROLLOUT_TIMEOUT = 180.0  # how long deploy and rollback wait for the rollout
POLL_SECONDS = 1.0  # APPLIANCE_K3S_POLL overrides (a fake cluster answers at once)
MAX_MODEL_ENV = 64 << 10  # an environment string is limited (128 KiB on Linux)
LOGGING_BOX = "logging"  # the store's box of each k3s deployment's logging settings
_PREFIX = "serve-"
_UNSAFE = re.compile(r"[^a-z0-9-]+")


def kube_name(name: str) -> str:
    """The Deployment's and Service's name: `serve-NAME` when NAME is already a DNS label,
    else a lowercase form with a short hash of NAME, so two deployments never share one."""
    slug = _UNSAFE.sub("-", name.lower()).strip("-")
    if slug == name and len(_PREFIX) + len(slug) <= 63:
        return _PREFIX + slug
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{_PREFIX}{slug[:48].rstrip('-')}-{digest}".replace("--", "-")


def check_resources(resources: dict[str, Any] | None) -> dict[str, Any]:
    """The pods' requests as numbers (cores, bytes, GPUs), defaults filled in; the same keys
    and checks as a job's `resources`."""
    from appliance.core.jobs import JobSpec

    given = {k: v for k, v in (resources or {}).items() if v is not None}
    request = JobSpec(kind="serve", resources={**DEFAULT_RESOURCES, **given}).request()
    if request.memory <= 0:
        raise InvalidInput("resources.memory: a model server needs memory, e.g. '1Gi'")
    return {"cpu": request.cpu, "memory": request.memory, "gpu": request.gpu}


def check_backend(settings: Settings, feature_service: str | None, node_port: int | None) -> None:
    """What a new k3s deployment needs, refused before anything is written."""
    if settings.store != "s3":
        raise InvalidInput(
            "executor 'k3s' serves deployments on the cluster, whose pods read models from the "
            "object store: set store = 's3' (the cluster's MinIO), or executor = 'local'"
        )
    if feature_service is not None:
        raise InvalidInput(
            "--feature-service: the online store is a file on this machine; deployments with "
            "a feature service are served by the local backend (executor = 'local')"
        )
    if node_port and not NODE_PORTS[0] <= node_port <= NODE_PORTS[1]:
        raise InvalidInput(
            f"--port {node_port}: on k3s the port is the Service's node port, between "
            f"{NODE_PORTS[0]} and {NODE_PORTS[1]} (default: one the cluster picks)"
        )


def model_spec(name: str, revision: int, mv: dict[str, Any]) -> dict[str, Any]:
    """What a pod needs to serve a version without the metadata database."""
    return {
        "deployment": name,
        "revision": revision,
        "model": mv["model"],
        "version": int(mv["version"]),
        "ref": mv["ref"],
        "sha256": mv["sha256"],
        "flavor": mv.get("flavor", "lightgbm"),
        "signature": mv["signature"],
    }


def deployment_manifests(
    name: str,
    revision: int,
    model_version: dict[str, Any],
    settings: Settings,
    replicas: int = 1,
    resources: dict[str, Any] | None = None,
    node_port: int | None = None,
) -> list[dict[str, Any]]:
    """A revision of deployment `name` serving `model_version` (a registry version row) as a
    Deployment and its NodePort Service, in `settings.k3s.namespace`."""
    request = check_resources(resources)
    spec = json.dumps(model_spec(name, revision, model_version), sort_keys=True)
    if len(spec) > MAX_MODEL_ENV:
        raise InvalidInput(
            f"model {model_version['ref']}: its signature is too large to hand to a pod "
            f"({len(spec)} bytes of JSON, at most {MAX_MODEL_ENV})"
        )
    kname = kube_name(name)
    namespace = settings.k3s.namespace
    selector = {NAME_LABEL: APP_NAME, DEPLOYMENT_LABEL: kname[len(_PREFIX) :]}
    labels = {
        **selector,
        "app.kubernetes.io/instance": kname,
        "app.kubernetes.io/managed-by": "appliance",
    }
    annotations = {
        NAME_ANNOTATION: name,
        REVISION_ANNOTATION: str(revision),
        MODEL_ANNOTATION: model_version["ref"],
    }
    env = [{"name": MODEL_ENV, "value": spec}, *pod_store_env(settings, POD_HOME, store="s3")]
    container: dict[str, Any] = {
        "name": "server",
        "image": settings.k3s.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "appliance.runner", "serve-pod", "--port", str(PORT)],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": pod_resources(Request(**request)),  # over its memory it is restarted
        # fetching and loading the model may take a while; liveness only starts after it
        "startupProbe": _probe("/v2/health/ready", period=2, failures=60),
        "readinessProbe": _probe("/v2/health/ready", period=2, failures=3),
        "livenessProbe": _probe("/v2/health/live", period=10, failures=3),
        "volumeMounts": [{"name": "home", "mountPath": POD_HOME}],
    }
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "home", "emptyDir": {}}],
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": STOP_GRACE_S,
    }
    if request["gpu"]:
        pod["runtimeClassName"] = "nvidia"
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": kname,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            # no request fails during a rollout: a new pod is ready before an old one goes
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "progressDeadlineSeconds": PROGRESS_DEADLINE_S,
            "revisionHistoryLimit": 10,
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": pod,
            },
        },
    }
    port: dict[str, Any] = {"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}
    if node_port:
        port["nodePort"] = node_port
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": kname,
            "namespace": namespace,
            "labels": labels,
            "annotations": {NAME_ANNOTATION: name},
        },
        "spec": {"type": "NodePort", "selector": selector, "ports": [port]},
    }
    return [deployment, service]


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def as_document(objects: list[dict[str, Any]]) -> str:
    """The manifest as stored with the revision and sent to `kubectl apply -f -`: a v1 List."""
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})


# ---- in the revision's transaction (called from deployments) ---------------------------------


def _deployment_row(conn: sqlite3.Connection, deployment_id: int) -> dict[str, Any]:
    row = conn.execute(
        "SELECT status, workers, resources_json, port FROM deployments WHERE id = ?",
        (deployment_id,),
    ).fetchone()
    return {
        "status": row[0],
        "workers": int(row[1] or 1),
        "resources": json.loads(row[2]) if row[2] else None,
        "port": row[3],
    }


def build_revision(
    settings: Settings,
    conn: sqlite3.Connection,
    deployment_id: int,
    name: str,
    revision: int,
    mv: dict[str, Any],
) -> str:
    """The manifest of a new revision, from the deployment's recorded replicas (workers),
    resources and node port (pinned by `--port`, else the one the cluster gave it first)."""
    dep = _deployment_row(conn, deployment_id)
    objects = deployment_manifests(
        name, revision, mv, settings, dep["workers"], dep["resources"], dep["port"]
    )
    return as_document(objects)


def apply_revision(
    settings: Settings,
    conn: sqlite3.Connection,
    deployment_id: int,
    name: str,
    revision: int,
    manifest: str,
    starting: bool = False,
) -> None:
    """Apply a revision's manifest when the deployment is meant to serve, and record the node
    port the cluster gave its Service; a refusal raises, so the transaction writes nothing
    (`starting`: the revision is recorded already, and the deployment stays stopped)."""
    if _deployment_row(conn, deployment_id)["status"] != "serving":
        return  # a stopped deployment's revision is applied when it starts
    try:
        stored = Kube.for_settings(settings).apply(json.loads(manifest))
    except ClusterUnavailable as exc:
        outcome = "not started" if starting else f"revision {revision} not recorded"
        raise ClusterUnavailable(
            f"deployment {name!r}: {outcome}, the cluster did not take revision {revision}'s "
            f"manifest: {exc.message}"
        ) from exc
    items = stored["items"] if stored.get("kind") == "List" else [stored]
    for item in items:
        if item.get("kind") == "Service":
            ports = (item.get("spec") or {}).get("ports") or [{}]
            if ports[0].get("nodePort"):
                conn.execute(
                    "UPDATE deployments SET port = ? WHERE id = ?",
                    (int(ports[0]["nodePort"]), deployment_id),
                )


def delete(settings: Settings, name: str) -> None:
    """Take the deployment off the cluster: its Deployment (and so its pods) and Service."""
    kname = kube_name(name)
    Kube.for_settings(settings).delete(
        settings.k3s.namespace, f"deployment/{kname}", f"service/{kname}"
    )


# ---- rollout status ---------------------------------------------------------------------------


def rollout_state(deployment: dict[str, Any]) -> dict[str, Any]:
    """A Deployment object (`kubectl get deployment -o json`) as a small status: state
    (progressing | available | failed), desired, updated, ready, available replicas, the
    revision whose manifest the cluster runs (a rollback's is its target's), and a message."""
    meta = deployment.get("metadata") or {}
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    desired = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas") or 0)
    ready = int(status.get("readyReplicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    total = int(status.get("replicas") or 0)
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    progressing = conditions.get("Progressing") or {}
    revision = (meta.get("annotations") or {}).get(REVISION_ANNOTATION)
    state = "progressing"
    if int(meta.get("generation") or 0) > int(status.get("observedGeneration") or 0):
        message = "waiting for the cluster to observe the new manifest"
    elif progressing.get("reason") == "ProgressDeadlineExceeded":
        state = "failed"
        message = progressing.get("message") or "the rollout exceeded its progress deadline"
    elif updated < desired:
        message = f"{updated} of {desired} new replicas updated"
    elif total > updated:
        message = f"{total - updated} old replica(s) pending termination"
    elif available < updated:
        message = f"{available} of {updated} updated replicas available"
    else:
        state = "available"
        message = progressing.get("message") or f"{available} of {desired} replicas available"
    return {
        "state": state,
        "desired": desired,
        "updated": updated,
        "ready": ready,
        "available": available,
        "manifest_revision": int(revision) if revision and revision.isdigit() else None,
        "message": message,
    }


def rollout_status(settings: Settings, name: str) -> dict[str, Any]:
    """The deployment's rollout on the cluster, read now."""
    kname = kube_name(name)
    found = Kube.for_settings(settings).get("deployment", kname, "-n", settings.k3s.namespace)
    return rollout_state(found)


def wait_rollout(
    settings: Settings, name: str, revision: int, timeout: float | None = None
) -> dict[str, Any]:
    """Poll the rollout until it is available; a failed rollout or the timeout raises (the
    revision stays recorded and applied: `deployments status` follows it, `rollback` undoes
    it). A kubectl call that fails is tried again until the timeout."""
    limit = ROLLOUT_TIMEOUT if timeout is None else timeout
    poll = float(os.environ.get("APPLIANCE_K3S_POLL", POLL_SECONDS))
    deadline = time.monotonic() + limit
    while True:
        try:
            status = rollout_status(settings, name)
            last = status["message"]
        except ClusterUnavailable as exc:
            status, last = None, exc.message
        if status is not None and status["state"] == "available":
            return status
        if status is not None and status["state"] == "failed":
            raise ApplianceError(
                f"deployment {name}: revision {revision} applied, but its rollout failed: "
                f"{last}; the pods of the previous revision keep serving "
                f"(`appliance deployments rollback {name}`)"
            )
        if time.monotonic() >= deadline:
            raise ApplianceError(
                f"deployment {name}: revision {revision} applied, but its rollout did not "
                f"complete within {limit:g}s: {last} (`appliance deployments status {name}`)"
            )
        time.sleep(poll)


def publish_logging(app: Appliance, name: str) -> None:
    """A k3s deployment's logging settings as the registry holds them, where its pods read
    them (the object store). After the registry's change commits, and one publisher at a
    time: each reads the committed row under the lock, so the last one published is never
    older than the last one committed."""
    from appliance.core.processes import exclusive

    app.settings.cache_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(app.settings.home / "locks" / f"logging-{name}.lock"):
        row = app.db.one("SELECT log_sample, log_requests FROM deployments WHERE name = ?", (name,))
        if row is None:
            return
        settings = {"sample": float(row["log_sample"] or 0), "requests": bool(row["log_requests"])}
        with tempfile.TemporaryDirectory(dir=app.settings.cache_dir) as tmp:
            path = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps(settings))
            try:
                app.objects.post(LOGGING_BOX, path.name, path)
            except ApplianceError as exc:
                raise type(exc)(
                    f"deployment {name!r}: its logging settings are recorded, but its pods "
                    f"could not be given them (the object store: {exc.message}); run "
                    f"`appliance deployments logging {name}` once the store is back"
                ) from exc


def republish_logging(app: Appliance) -> None:
    """The agent's pass: each k3s deployment's published settings made the registry's again
    where they differ (a publisher that died between commit and publish, a store that was
    away). One read of the store per deployment."""
    for row in app.db.rows(
        "SELECT name, log_sample, log_requests FROM deployments WHERE backend = 'k3s'"
    ):
        wanted = (float(row["log_sample"] or 0), bool(row["log_requests"]))
        try:
            if pod_logging(app, row["name"]) != wanted:
                publish_logging(app, row["name"])
        except ApplianceError:  # the store away: the next pass tries again
            continue


def pod_logging(app: Appliance, name: str) -> tuple[float, bool]:
    """The logging settings a pod of `name` follows: published ones, or the defaults
    (request metadata on, no inputs) when none are."""
    app.settings.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=app.settings.cache_dir) as tmp:
        path = Path(tmp) / "logging.json"
        if not app.objects.fetch(LOGGING_BOX, f"{name}.json", path):
            return 0.0, True
        try:
            data = json.loads(path.read_text())
            return float(data["sample"]), bool(data["requests"])
        except (ValueError, KeyError, TypeError) as exc:  # written by hand, say
            log.warning("logging settings of %s unreadable (%s): the defaults apply", name, exc)
            return 0.0, True


# ---- in the pod ----------------------------------------------------------------------------


def pod_server(app: Appliance, spec: dict[str, Any]) -> ModelServer:
    """The ModelServer of one pod: the version in `spec` fetched from the object store by
    sha256 (verified) and loaded; routing fixed, no metadata database."""
    from appliance.core.inference import ModelRuntime
    from appliance.core.serving import ModelServer, Routing

    path = app.objects.get_file(spec["sha256"])
    runtime = ModelRuntime({**spec, "feature_service": None}, str(path))
    server = ModelServer(app, spec["deployment"], directory=app.settings.home / "run")
    server.model = spec["model"]
    server.routing = Routing(generation=0, revision=int(spec["revision"]), stable=runtime)
    server.plog.configure(*pod_logging(app, spec["deployment"]))
    return server


def _follow_logging(
    app: Appliance, server: ModelServer, stop: threading.Event, interval: float
) -> None:
    """The pod's logging thread: every ship interval, the published settings, and the
    closed log files posted to the store (a store away: both wait for the next round)."""
    from appliance.core.prediction_log import post_spool

    name = server.deployment
    said = None
    while not stop.wait(interval):
        try:
            server.plog.configure(*pod_logging(app, name))
            error = post_spool(app, name)[1]
        except ApplianceError as exc:
            error = exc.message
        except Exception as exc:  # the thread lives: the next round tries again
            error = f"{type(exc).__name__}: {exc}"
        if error and error != said:
            log.warning("prediction logs not posted: %s", error)
        said = error


def serve_pod(host: str = "0.0.0.0", port: int = PORT) -> int:  # noqa: S104 (the pod's own)
    """The pod's process (`runner serve-pod`): load the model named in APPLIANCE_SERVE_MODEL,
    then listen."""
    import uvicorn

    from appliance.core.agent import ship_seconds
    from appliance.core.context import Appliance
    from appliance.core.jobs import parse_memory
    from appliance.core.prediction_log import adopt_orphans, post_spool, spool_dir
    from appliance.core.serving import (
        MAX_BODY,
        MAX_BODY_ENV,
        InferenceApp,
        exit_after_graceful_stop,
        server_config,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    raw = os.environ.get(MODEL_ENV)
    if not raw:
        print(f"{MODEL_ENV} is not set: nothing to serve", file=sys.stderr)
        return 2
    spec = json.loads(raw)
    max_body = parse_memory(os.environ.get(MAX_BODY_ENV, MAX_BODY), MAX_BODY_ENV)
    interval = min(ship_seconds(), 3600.0)  # how often it posts its logs; wait() takes no inf
    app = Appliance.open(os.environ.get("APPLIANCE_HOME"))
    try:
        server = pod_server(app, spec)
    except ApplianceError as exc:
        print(f"model {spec.get('ref')} cannot be served: {exc.message}", file=sys.stderr)
        return 1
    log.info(
        "serving %s (deployment %s revision %s) on port %s",
        spec["ref"],
        spec["deployment"],
        spec["revision"],
        port,
    )
    config = server_config(InferenceApp(server, max_body), host=host, port=port)
    # a container restarted in place finds its predecessor's open files in the emptyDir (one
    # container per pod: the kubelet starts it once the old one has ended)
    # (one it cannot read is a log to lose, not a reason not to serve)
    for line in adopt_orphans(spool_dir(app.settings.home, spec["deployment"]), every=True):
        log.warning("an open log file of the previous container: %s", line)
    stop = threading.Event()
    writer = threading.Thread(target=server.plog.run, args=(stop,), daemon=True)
    writer.start()
    follower = threading.Thread(
        target=_follow_logging, args=(app, server, stop, interval), daemon=True
    )
    follower.start()
    exit_after_graceful_stop()  # the kubelet's SIGTERM: what the pod logged is posted first
    try:
        uvicorn.Server(config).run()
    finally:
        stop.set()
        writer.join(timeout=5)
        follower.join(timeout=5)  # a round of posting under way ends first
        error = post_spool(app, spec["deployment"])[1]
        if error:
            log.warning("prediction logs not posted at exit: %s", error)
    return 0
