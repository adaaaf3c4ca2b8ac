"""Model serving: one ASGI app on uvicorn per deployment, speaking KServe V2 and MLflow scoring.

A deployment's server is a small supervisor process that owns the listening socket and N worker
processes that share it. Each worker holds every model version it serves (the stable revision,
a canary, and the rollback target) loaded at once, so a deploy or a rollback is one reference
swap after the load: no request sees a gap or a half-loaded model. Workers follow the metadata
store: the committing command wakes each one with a datagram, and a one-row read every 20 ms
catches anything missed. They write a snapshot of what they serve and their traffic every
second, or at once after a swap; `deploy` returns when every worker's snapshot shows the new
revision. The supervisor restarts a worker that dies and judges the canary's rule.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.core.context import Appliance
from appliance.core.inference import (
    BINARY_HEADER,
    ModelRuntime,
    RequestError,
    encode_binary_outputs,
    parse_csv,
    parse_invocations,
    parse_v2_request,
    split_binary_body,
)
from appliance.core.online import FeatureLookup
from appliance.core.prediction_log import PredictionLog
from appliance.core.registry import get_model_version
from appliance.core.traffic import (
    KEEP_SECONDS,
    UNROUTED,
    TrafficStats,
    log_counters,
    merge,
    parse_rule,
    read_snapshots,
    render_prometheus,
    window,
    write_snapshot,
)
from appliance.errors import ApplianceError
from appliance.store.db import utcnow

log = logging.getLogger("appliance.serving")

MAX_BODY = 32 << 20
MAX_BODY_ENV = "APPLIANCE_SERVE_MAX_BODY"  # e.g. 8Mi: larger requests get a 413
FOLLOW_SECONDS = 0.02  # how often a worker looks for a new revision
SNAPSHOT_SECONDS = 1.0
WORKER_READY_TIMEOUT = 60.0


def state_dir(app: Appliance, deployment: str) -> Path:
    """Where a deployment's workers leave their snapshots (runtime state, not history)."""
    return app.settings.home / "run" / "deployments" / deployment


def _dumps(payload: Any) -> bytes:
    import orjson

    return orjson.dumps(payload)


def _loads(raw: bytes) -> Any:
    import orjson

    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        error = exc
    # What orjson refuses but Python's parser reads (huge integers, Infinity) gets a second
    # look, so that the feature checks can name the field instead of a character offset.
    import json

    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise RequestError(400, f"request body is not valid JSON: {error}") from None


@dataclass(frozen=True)
class Routing:
    """What a worker serves, swapped as one reference: requests read it once each."""

    generation: int
    revision: int
    stable: ModelRuntime
    canary: ModelRuntime | None = None
    percent: float = 0.0
    degraded: str | None = None  # why it serves less than the deployment's current revision

    def versions(self) -> list[int]:
        served = [self.stable.version]
        if self.canary is not None:
            served.append(self.canary.version)
        return served


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    served: tuple[int, str] | None = None  # (version, role) of a prediction, for the stats
    logged: tuple[str, int, Any, Any] | None = None  # (request id, rows, inputs, outputs)


def _error(status: int, message: str) -> Response:
    return Response(status, _dumps({"error": message}))


def _header_safe(value: str) -> bool:
    """Whether an id can go back as a header value: printable, no space at either end."""
    return bool(value) and value.isprintable() and value[0] != " " and value[-1] != " "


def _id_headers(log_id: str) -> tuple[tuple[bytes, bytes], ...]:
    """An answer's id as its header; none for an id no header can carry (a newline, a space
    at an end), which is logged all the same: sent, it would make the server drop the
    connection and the answer with it."""
    return ((b"x-request-id", log_id.encode("utf-8", "replace")),) if _header_safe(log_id) else ()


def _echo_id(response: Response, headers: dict[str, str]) -> Response:
    """A refusal carries the client's X-Request-Id back, as an answer does: its row in the
    request log has that id (ASCII only: it goes back as it came)."""
    sent = headers.get("x-request-id", "")[:200]
    if sent.isascii() and _header_safe(sent):
        response.headers = (*response.headers, (b"x-request-id", sent.encode()))
    return response


def wake_address(app: Appliance, deployment: str, pid: int) -> str | None:
    """A worker's wake-up socket: Linux's abstract namespace, so no file and no path-length
    limit; None elsewhere (workers then poll)."""
    if not sys.platform.startswith("linux"):
        return None
    home = zlib.crc32(str(app.settings.home).encode())
    return f"\0appliance-{home:08x}-{deployment}-{pid}"


def _wake_socket(address: str | None) -> socket.socket | None:
    if address is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
    except OSError as exc:
        log.warning("no wake-up socket (%s); polling every %.0f ms", exc, FOLLOW_SECONDS * 1000)
        sock.close()
        return None
    sock.settimeout(FOLLOW_SECONDS)
    return sock


def wake_workers(app: Appliance, deployment: str, pids: list[int]) -> None:
    """Tell workers to read the store now (they would within FOLLOW_SECONDS anyway)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for pid in pids:
            address = wake_address(app, deployment, pid)
            if address is None:
                return
            try:
                sock.sendto(b"w", address)
            except OSError:
                pass  # gone, or its queue is full: it polls anyway


_STATE_SQL = (
    "SELECT d.generation, d.current_revision, d.canary_revision, d.canary_percent, "
    "d.canary_window_s, d.feature_service, d.log_sample, d.log_requests, m.name AS model, "
    "(SELECT mv.version FROM deployment_revisions r JOIN model_versions mv "
    " ON mv.id = r.model_version_id WHERE r.deployment_id = d.id "
    " AND r.revision = d.current_revision) AS version, "
    "(SELECT mv.version FROM deployment_revisions r JOIN model_versions mv "
    " ON mv.id = r.model_version_id WHERE r.deployment_id = d.id "
    " AND r.revision = d.canary_revision) AS canary_version, "
    "(SELECT mv.version FROM deployment_revisions r JOIN model_versions mv "
    " ON mv.id = r.model_version_id WHERE r.deployment_id = d.id "
    " AND r.revision < d.current_revision AND (r.action != 'canary' OR r.outcome = 'promoted') "
    " ORDER BY r.revision DESC LIMIT 1) AS previous_version "
    "FROM deployments d JOIN registered_models m ON m.id = d.model_id WHERE d.name = ?"
)


class EntityInputs:
    """A deployment with a feature service: requests carry entity keys (parsed like feature
    columns by the same V2, MLflow and CSV parsers), and the model's inputs are looked up."""

    has_categories = True  # every key column is parsed on its own, text kept as text

    def __init__(self, lookup: FeatureLookup) -> None:
        self.lookup = lookup
        self.feature_names = list(lookup.join_keys)
        self.categories: dict[str, dict[str, int]] = {k: {} for k in self.feature_names}

    def metadata(self) -> list[dict[str, Any]]:
        types = {}
        for view in self.lookup.views:
            types.update(view["key_types"])
        return [
            {
                "name": k,
                "datatype": "BYTES" if types.get(k) == "VARCHAR" else "INT64",
                "shape": [-1],
            }
            for k in self.feature_names
        ]

    def columns(self, runtime: ModelRuntime, keys: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """The model's input columns for these entity keys, and how many looked-up values
        were missing (not found, outside the ttl, or null: the model sees NaN)."""
        unknown = [k for k in keys if k not in self.feature_names]
        if unknown:
            raise RequestError(
                400,
                f"unknown input(s) {', '.join(map(repr, unknown))[:200]}: this deployment "
                f"takes the entity keys {self.feature_names} and looks up the features",
            )
        entities: dict[str, list[Any]] = {}
        for key in self.feature_names:
            if key not in keys:
                raise RequestError(400, f"missing entity key {key!r}")
            values = keys[key]
            entities[key] = values.tolist() if hasattr(values, "tolist") else list(values)
        entities = self.lookup.typed(entities)
        try:
            _, found = self.lookup.read(entities)
        except ApplianceError as exc:
            raise RequestError(400, exc.message) from None
        columns: dict[str, Any] = dict(entities)  # keys that are model inputs, typed
        missing = 0
        for name, values, statuses, _ in found:
            columns[name] = values
            missing += sum(s != "PRESENT" for s in statuses)
        return {n: columns[n] for n in runtime.feature_names}, missing


class ModelServer:
    """One worker's view of a deployment: routing, loaded versions, traffic, and the routes."""

    def __init__(self, app: Appliance, deployment: str, directory: Path | None = None) -> None:
        self.app = app
        self.deployment = deployment
        self.directory = directory or state_dir(app, deployment)
        self.stats = TrafficStats()
        self.model = ""
        self.routing: Routing | None = None
        self._loaded: dict[int, ModelRuntime] = {}
        self.service: str | None = None  # the deployment's feature service: keys in
        self._inputs: dict[str, EntityInputs] = {}
        self._sync_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self.snapshot_path = self.directory / f"worker-{os.getpid()}.json"
        self.plog = PredictionLog(app.settings.home, deployment)
        # ids for requests that bring none: a random prefix per worker start and a counter
        # (unique across workers and restarts, and far cheaper than a uuid per request)
        self._id_prefix = uuid.uuid4().hex[:16]
        self._ids = itertools.count(1)
        self.feedback_token: str | None = None

    def entity_inputs(self, runtime: ModelRuntime) -> EntityInputs | None:
        """With a feature service, what turns keys into this version's inputs: the service
        version it was trained with (else the deployment's), resolved once and kept."""
        if self.service is None:
            return None
        ref = runtime.feature_service or self.service
        found = self._inputs.get(ref)
        if found is None:
            found = self._inputs[ref] = EntityInputs(FeatureLookup(self.app, ref))
        return found

    # ---- following the deployment ---------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        if self._conn is None:  # its own connection: the follow thread reads while others write
            self._conn = sqlite3.connect(
                f"file:{self.app.settings.metadata_path}?mode=ro",
                uri=True,
                timeout=5,
                check_same_thread=False,
            )
            self._conn.row_factory = sqlite3.Row
        row = self._conn.execute(_STATE_SQL, (self.deployment,)).fetchone()
        if row is None:
            raise ApplianceError(f"deployment {self.deployment!r} not found")
        return dict(row)

    def _runtime(self, version: int) -> ModelRuntime:
        runtime = self._loaded.get(version)
        if runtime is None:
            mv = get_model_version(self.app, f"{self.model}@{version}")
            # get_file verifies the sha256: a damaged file is refused and routing stays as is
            runtime = ModelRuntime(mv, str(self.app.objects.get_file(mv["sha256"])))
            self._loaded[version] = runtime
        return runtime

    def sync(self, snapshot: bool = True) -> bool:
        """Adopt the deployment's current routing if it changed; True when it did. Every model
        it needs is loaded before the swap; a version that fails to load leaves routing as is.
        The snapshot it writes is the worker's "I serve this": at start, only once it listens."""
        with self._sync_lock:
            state = self._state()
            self.plog.configure(float(state["log_sample"] or 0), bool(state["log_requests"]))
            current = self.routing
            if current is not None and int(state["generation"]) == current.generation:
                return False
            self.model = state["model"]
            service = state["feature_service"]
            self.service = service or None
            generation = int(state["generation"])
            degraded = None
            try:
                stable = self._runtime(int(state["version"]))
            except ApplianceError as exc:
                # A worker that starts (after a crash, a reboot) while the current version's
                # file is damaged serves the last live version rather than nothing, and keeps
                # trying; its generation stays behind, so no deploy takes it for done.
                if current is not None or state["previous_version"] is None:
                    raise
                log.error("revision %s cannot be served: %s", state["current_revision"], exc)
                stable = self._runtime(int(state["previous_version"]))
                generation = -1
                degraded = (
                    f"revision {state['current_revision']} cannot be served ({exc.message}); "
                    f"serving version {stable.version}"
                )
            canary = None
            if state["canary_version"] is not None:
                try:
                    canary = self._runtime(int(state["canary_version"]))
                except ApplianceError as exc:
                    if current is not None:
                        raise
                    log.error(
                        "canary revision %s cannot be served: %s", state["canary_revision"], exc
                    )
                    generation = -1
                    degraded = f"canary revision {state['canary_revision']}: {exc.message}"
            keep = {stable.version} | ({canary.version} if canary else set())
            if state["previous_version"] is not None:  # the rollback target stays warm
                try:
                    keep.add(self._runtime(int(state["previous_version"])).version)
                except ApplianceError as exc:
                    log.warning("rollback target not preloaded: %s", exc.message)
            self.routing = Routing(
                generation=generation,
                revision=int(state["current_revision"]),
                stable=stable,
                canary=canary,
                percent=float(state["canary_percent"] or 0.0),
                degraded=degraded,
            )
            window_s = int(state["canary_window_s"] or 0)
            self.stats.keep_seconds = max(KEEP_SECONDS, window_s + 2)
            for version in [v for v in self._loaded if v not in keep]:
                del self._loaded[version]
        log.info("serving %s revision %s", self.model, self.routing.revision)
        if snapshot:
            self.write_snapshot()
        return True

    def write_snapshot(self) -> None:
        routing = self.routing
        write_snapshot(
            self.snapshot_path,
            {
                "pid": os.getpid(),
                "at": time.time(),
                "generation": routing.generation if routing else -1,
                "revision": routing.revision if routing else None,
                "versions": routing.versions() if routing else [],
                "degraded": routing.degraded if routing else None,
                "traffic": self.stats.snapshot(),
                "log": self.plog.counters(),
            },
        )

    def follow(self, stop: threading.Event) -> None:
        """The worker's background thread: a new revision as soon as a command wakes it (a
        datagram after its commit), or within FOLLOW_SECONDS; snapshots every second."""
        last_snapshot = time.monotonic()
        parent = os.getppid()
        wake = _wake_socket(wake_address(self.app, self.deployment, os.getpid()))
        while not stop.is_set():
            if wake is None:
                stop.wait(FOLLOW_SECONDS)
            else:
                try:
                    wake.recv(16)  # releases the GIL while it waits
                except (TimeoutError, OSError):
                    pass
            if stop.is_set():
                return
            if os.getppid() != parent:  # the supervisor is gone: stop serving
                os.kill(os.getpid(), signal.SIGTERM)
                return
            try:
                changed = self.sync()
            except Exception as exc:  # keep serving what is loaded; say why once per change
                log.error("revision not adopted: %s", getattr(exc, "message", exc))
                changed = False
                stop.wait(1.0)
            if not changed and time.monotonic() - last_snapshot >= SNAPSHOT_SECONDS:
                try:
                    self.write_snapshot()
                except OSError as exc:
                    log.warning("snapshot not written: %s", exc)
                last_snapshot = time.monotonic()

    # ---- routing requests -----------------------------------------------------------------
    def pick(self, routing: Routing, request_id: str | None) -> tuple[ModelRuntime, str]:
        """Stable or canary: by the request id's hash when one is given (sticky), else at
        random, in the canary's percentage."""
        if routing.canary is None:
            return routing.stable, "stable"
        if request_id:
            share = zlib.crc32(request_id.encode("utf-8", "surrogateescape")) % 10000 / 100
        else:
            share = random.random() * 100
        if share < routing.percent:
            return routing.canary, "canary"
        return routing.stable, "stable"

    def _model(
        self, routing: Routing, name: str, version: str | None, request_id: str | None
    ) -> tuple[ModelRuntime, str]:
        if name != self.model:
            raise RequestError(
                404, f"model {name[:100]!r} is not served here (serving {self.model!r})"
            )
        if version is None:
            return self.pick(routing, request_id)
        if not (version.isascii() and version.isdigit()) or len(version) > 9:
            raise RequestError(404, f"model version {version[:20]!r} not found")
        for runtime in (routing.stable, routing.canary):
            if runtime is not None and runtime.version == int(version):
                return runtime, "pinned"
        served = ", ".join(map(str, routing.versions()))
        raise RequestError(
            404, f"model {name} version {int(version)} is not served (serving {served})"
        )

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
        """Answer one request; every failure is a JSON error body, never a stack trace."""
        routing = self.routing
        try:
            if routing is None:
                raise RequestError(503, "no model loaded")
            return self._route(routing, method, path, headers, body)
        except RequestError as exc:
            response = _echo_id(_error(exc.status, exc.message), headers)
            response.served = getattr(exc, "served", None)
            return response
        except Exception:
            log.exception("internal error on %s %s", method, path)
            return _echo_id(_error(500, "internal server error"), headers)

    def _route(
        self, routing: Routing, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Response:
        if path.startswith("/v2/models/"):
            parts = path[len("/v2/models/") :].split("/")
            name, version, action = parts[0], None, None
            rest = parts[1:]
            if len(rest) >= 2 and rest[0] == "versions":
                version, rest = rest[1], rest[2:]
            if len(rest) == 1 and rest[0] in ("ready", "infer"):
                action = rest[0]
            elif rest:
                raise RequestError(404, f"no route for {method} {path[:200]}")
            if not name:
                raise RequestError(404, "model name required")
            if action == "infer":
                if method != "POST":
                    raise RequestError(405, f"{method} not allowed on {path[:200]}; use POST")
                return self._infer(routing, name, version, headers, body)
            if method != "GET":
                raise RequestError(405, f"{method} not allowed on {path[:200]}; use GET")
            # the model as a whole is described by its stable version, never a random pick
            runtime, _ = self._model(routing, name, version or str(routing.stable.version), None)
            if action == "ready":
                return Response(200, _dumps({"name": name, "ready": True}))
            meta = runtime.metadata()
            features = self.entity_inputs(runtime)
            if features is not None:
                meta["inputs"] = features.metadata()
                meta["parameters"]["feature_service"] = features.lookup.ref
            if version is None:  # the model, not one version: every version being served
                meta["versions"] = [str(v) for v in routing.versions()]
            return Response(200, _dumps(meta))
        if method == "GET":
            if path == "/v2/health/live":
                return Response(200, _dumps({"live": True}))
            if path in ("/v2/health/ready", "/ping", "/health"):
                return Response(200, _dumps({"ready": True}))
            if path == "/v2":
                return Response(
                    200,
                    _dumps(
                        {
                            "name": "appliance",
                            "version": __version__,
                            "extensions": ["binary_tensor_data"],
                        }
                    ),
                )
            if path == "/version":
                payload = {
                    "version": __version__,
                    "model": self.model,
                    "model_version": routing.stable.version,
                    "revision": routing.revision,
                    "canary_version": routing.canary.version if routing.canary else None,
                    "degraded": routing.degraded,
                }
                return Response(200, _dumps(payload))
            if path == "/metrics":
                return Response(200, self.metrics().encode(), "text/plain; version=0.0.4")
        if path == "/invocations":
            if method != "POST":
                raise RequestError(405, f"{method} not allowed on /invocations; use POST")
            return self._invocations(routing, headers, body)
        if path == "/feedback":
            if method != "POST":
                raise RequestError(405, f"{method} not allowed on /feedback; use POST")
            return self._feedback(headers, body)
        raise RequestError(404, f"no route for {method} {path[:200]}")

    def metrics(self) -> str:
        """Every worker's counters summed (this worker's live ones in place of its file)."""
        own = str(os.getpid())
        snapshots = [s for s in read_snapshots(self.directory) if str(s.get("pid")) != own]
        snapshots.append({"traffic": self.stats.snapshot(), "log": self.plog.counters()})
        return render_prometheus(self.model, merge(snapshots), log_counters(snapshots))

    def _infer(
        self,
        routing: Routing,
        name: str,
        version: str | None,
        headers: dict[str, str],
        raw: bytes,
    ) -> Response:
        header, binary = split_binary_body(raw, headers.get(BINARY_HEADER.lower()))
        if BINARY_HEADER.lower() not in headers:
            _require_json(headers)
        body = _loads(header)
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        request_id = body.get("id") if isinstance(body.get("id"), str) else None
        runtime, role = self._model(
            routing, name, version, request_id or headers.get("x-request-id")
        )
        log_id = (request_id or headers.get("x-request-id") or self._new_id())[:200]
        missing = 0
        try:
            features = self.entity_inputs(runtime)  # its first use reads the registry
            if features is None:
                columns, outputs = parse_v2_request(body, runtime, binary)
            else:
                keys, outputs = parse_v2_request(body, features, binary)
                columns, missing = features.columns(runtime, keys)
            predictions = runtime.predict_matrix(runtime.matrix(columns))
        except RequestError as exc:
            exc.served = (runtime.version, role)  # type: ignore[attr-defined]
            raise
        except Exception as exc:
            raise _internal_error(runtime, role) from exc
        shape = list(predictions.shape)
        response: dict[str, Any] = {
            "model_name": runtime.model,
            "model_version": str(runtime.version),
            "outputs": [
                {"name": out, "shape": shape, "datatype": "FP64", "data": predictions}
                for out in outputs
            ],
        }
        if features is not None:
            response["parameters"] = {
                "feature_service": features.lookup.ref,
                "features_missing": missing,
            }
        if request_id is not None:
            response["id"] = request_id
        served = (runtime.version, role)
        inputs = columns if isinstance(columns, dict) else (runtime.feature_names, columns)
        logged = (log_id, int(shape[0]) if shape else 0, inputs, predictions)
        id_headers = _id_headers(log_id)
        if _wants_binary(body):
            data, length = encode_binary_outputs(response)
            return Response(
                200,
                data,
                "application/octet-stream",
                ((BINARY_HEADER.encode(), str(length).encode()), *id_headers),
                served,
                logged,
            )
        for out in response["outputs"]:
            out["data"] = predictions.reshape(-1).tolist()
        return Response(200, _dumps(response), headers=id_headers, served=served, logged=logged)

    def _new_id(self) -> str:
        """An id for a request that brought none, when it is logged (feedback names it)."""
        return f"{self._id_prefix}{next(self._ids):010x}" if self.plog.active else ""

    def _feedback(self, headers: dict[str, str], raw: bytes) -> Response:
        """Labels for logged predictions, with the home's feedback token; spooled for the
        agent to store (401 without the token, 400 naming the bad item)."""
        import hmac

        from appliance.core.feedback import feedback_token, spool_feedback

        if self.feedback_token is None:
            self.feedback_token = feedback_token(self.app.settings.home, create=False)
        given = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not self.feedback_token or not hmac.compare_digest(given, self.feedback_token):
            raise RequestError(401, "feedback needs the home's token: Authorization: Bearer …")
        _require_json(headers)
        routing = self.routing
        if routing is None:
            raise RequestError(503, "no model loaded")
        model = routing.stable  # labels are checked against the model being served
        try:
            taken = spool_feedback(
                self.app.settings.home, self.deployment, _loads(raw), model.objective, model.labels
            )
        except ApplianceError as exc:
            raise RequestError(400, exc.message) from None
        return Response(202, _dumps(taken))

    def _invocations(self, routing: Routing, headers: dict[str, str], raw: bytes) -> Response:
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("application/json", "text/csv"):
            raise RequestError(415, "Content-Type must be application/json or text/csv")
        runtime, role = self.pick(routing, headers.get("x-request-id"))
        try:
            features = self.entity_inputs(runtime)  # its first use reads the registry
            spec: Any = runtime if features is None else features
            if content_type == "text/csv":
                columns = parse_csv(raw, spec)
            else:
                columns = parse_invocations(_loads(raw), spec)
            if features is not None:
                columns, _ = features.columns(runtime, columns)
            predictions = runtime.predict(columns)
        except RequestError as exc:
            exc.served = (runtime.version, role)  # type: ignore[attr-defined]
            raise
        except Exception as exc:
            raise _internal_error(runtime, role) from exc
        log_id = (headers.get("x-request-id") or self._new_id())[:200]
        return Response(
            200,
            _dumps({"predictions": predictions}),
            headers=_id_headers(log_id),
            served=(runtime.version, role),
            logged=(log_id, len(predictions), columns, predictions),
        )


def _internal_error(runtime: ModelRuntime, role: str) -> RequestError:
    """A defect past routing (the model raised): a 500 counted, and logged, against the
    version that was chosen, so a failing canary shows as itself and not as unrouted."""
    log.exception("internal error in %s version %s", runtime.model, runtime.version)
    error = RequestError(500, "internal server error")
    error.served = (runtime.version, role)  # type: ignore[attr-defined]
    return error


def _require_json(headers: dict[str, str]) -> None:
    content_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", "application/octet-stream", ""):
        raise RequestError(
            415, f"Content-Type {content_type!r}: send application/json (or the binary extension)"
        )


def _wants_binary(body: dict[str, Any]) -> bool:
    """The binary extension's output request: per output, or for all outputs."""
    params = body.get("parameters") or {}
    if isinstance(params, dict) and params.get("binary_data_output") is True:
        return True
    return any(
        isinstance(o, dict)
        and isinstance(o.get("parameters"), dict)
        and o["parameters"].get("binary_data") is True
        for o in body.get("outputs") or []
    )


Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class InferenceApp:
    """The ASGI app: reads the body (within the limit), lets ModelServer answer, counts."""

    def __init__(self, server: ModelServer, max_body: int = MAX_BODY) -> None:
        self.server = server
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":  # server_config turns it off
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            status = 400 if not length.isdigit() else 413
            message = (
                f"request body over the {self.max_body}-byte limit"
                if status == 413
                else "Content-Length must be a byte count"
            )
            await self._send(send, _echo_id(_error(status, message), headers), close=True)
            self._count_refused(scope["path"], status, started, headers)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:  # chunked, with no Content-Length to refuse up front
                refused = _error(413, f"request body over the {self.max_body}-byte limit")
                await self._send(send, _echo_id(refused, headers), True)
                self._count_refused(scope["path"], 413, started, headers)
                return
            if chunk:
                chunks.append(chunk)
            more = message.get("more_body", False)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        response = self.server.handle(scope["method"], scope["path"], headers, body)
        await self._send(send, response)
        if response.served is not None:
            version, role = response.served
            seconds = time.perf_counter() - started
            self.server.stats.observe(version, role, response.status, seconds)
            routing = self.server.routing
            request_id, rows, columns, outputs = response.logged or (
                headers.get("x-request-id", "")[:200],
                0,
                None,
                None,
            )
            self.server.plog.record(
                request_id,
                version,
                routing.revision if routing else 0,
                role,
                response.status,
                seconds,
                rows,
                columns,
                outputs,
            )
        else:
            self._count_refused(scope["path"], response.status, started, headers)

    def _count_refused(
        self, path: str, status: int, started: float, headers: dict[str, str]
    ) -> None:
        """A prediction request refused before a version was chosen still counts: in the
        live counters and in the request log, as version 0 and role "unrouted" (an error
        rate judged on the log must see a client's malformed bodies and a worker with no
        model)."""
        if path == "/invocations" or path.endswith("/infer"):
            seconds = time.perf_counter() - started
            self.server.stats.observe(*UNROUTED, status, seconds)
            routing = self.server.routing
            self.server.plog.record(
                headers.get("x-request-id", "")[:200],
                UNROUTED[0],
                routing.revision if routing else 0,
                UNROUTED[1],
                status,
                seconds,
                0,
                None,
                None,
            )

    @staticmethod
    async def _send(send: Send, response: Response, close: bool = False) -> None:
        headers = [
            (b"content-type", response.content_type.encode()),
            (b"content-length", str(len(response.body)).encode()),
            *response.headers,
        ]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})


def _max_body() -> int:
    from appliance.core.jobs import parse_memory

    return parse_memory(os.environ.get(MAX_BODY_ENV, MAX_BODY), MAX_BODY_ENV)


def server_config(asgi: Any, **where: Any) -> Any:
    """How every model server runs on uvicorn (a local worker, a k3s pod): the fastest loop
    and parser there are, no access log or per-response date and server headers, a short
    graceful shutdown. `where`: host and port, when uvicorn binds the socket itself."""
    import uvicorn

    return uvicorn.Config(
        asgi,
        loop=uvicorn_loop(),
        http=uvicorn_http(),
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,
        server_header=False,
        date_header=False,
        **where,
    )


def serve_worker(app: Appliance, name: str, fd: int | None = None, bind: str | None = None) -> int:
    """One worker: load the deployment's models, then answer on the inherited socket (`fd`)
    or on a socket of its own on the supervisor's `host:port` (`bind`, SO_REUSEPORT)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _die_with_supervisor()
    # The follow thread must get the GIL quickly from a busy event loop: a swap takes a few
    # hand-offs (store read, load, snapshot), each of which would otherwise wait up to 5 ms.
    sys.setswitchinterval(0.001)
    server = ModelServer(app, name)
    server.sync(snapshot=False)
    config = server_config(InferenceApp(server, _max_body()))
    if bind is not None:
        host, _, port = bind.rpartition(":")
        sock = _bind(host.strip("[]"), int(port))
    else:
        sock = socket.socket(fileno=fd)
    # Listening now: connections wait in the backlog until uvicorn accepts, none is refused,
    # so this is when the worker may say it is ready.
    server.write_snapshot()
    # What is loaded by now lives as long as the worker: the collector's full passes skip
    # it. Without this, request logging (whose queued items live long enough to reach the
    # oldest generation) triggers a full pass every few seconds, a stall of tens of ms.
    gc.collect()
    gc.freeze()
    stop = threading.Event()
    threading.Thread(target=server.follow, args=(stop,), daemon=True).start()
    writer = threading.Thread(target=server.plog.run, args=(stop,), daemon=True)
    writer.start()
    exit_after_graceful_stop()
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        stop.set()
        writer.join(timeout=5)
    return 0


def exit_after_graceful_stop() -> None:
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown: with this, the process
    then exits through its `finally` (status 0), so what it logged reaches the spool."""

    def stopped(signum: int, frame: object) -> None:
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopped)


PARENT_ENV = "APPLIANCE_SERVE_SUPERVISOR"


def _die_with_supervisor() -> None:
    """A worker must not outlive its supervisor (killed -9, say): it would hold the port
    and serve a deployment that nothing follows. Linux tells us by signal; elsewhere the
    follow thread notices the new parent."""
    parent = int(os.environ.get(PARENT_ENV, "0") or 0)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if parent and os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def uvicorn_loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def uvicorn_http() -> str:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


REUSEPORT = hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux")


def _bind(host: str, port: int, listen: bool = True) -> socket.socket:
    """A TCP socket on host:port. With SO_REUSEPORT each worker listens on a socket of its
    own and the kernel spreads new connections across them; one shared socket instead lets
    the worker that happens to be waiting take them all."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if REUSEPORT:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    return sock


class _Workers:
    """The supervisor's worker processes: started on the shared socket, restarted when they
    die (with backoff), stopped together."""

    def __init__(self, app: Appliance, name: str, sock: socket.socket, count: int) -> None:
        self.app, self.name, self.sock, self.count = app, name, sock, count
        self.directory = state_dir(app, name)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.failures = 0
        self.not_before = 0.0

    def snapshot(self, proc: subprocess.Popen[bytes]) -> Path:
        return self.directory / f"worker-{proc.pid}.json"

    def spawn(self) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "APPLIANCE_HOME": str(self.app.settings.home),
            PARENT_ENV: str(os.getpid()),
        }
        # Several workers on few cores: OpenMP threads that spin would starve each other.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        command = [sys.executable, "-m", "appliance.runner", "serve-worker", self.name]
        if REUSEPORT:  # the worker listens on host:port itself, once its models are loaded
            host, port = self.sock.getsockname()[:2]
            command += ["--bind", f"{host}:{port}"]
            fds: tuple[int, ...] = ()
        else:  # every worker accepts on the supervisor's socket
            command += ["--fd", str(self.sock.fileno())]
            fds = (self.sock.fileno(),)
        proc = subprocess.Popen(command, pass_fds=fds, stdin=subprocess.DEVNULL, env=env)
        self.procs.append(proc)
        return proc

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WORKER_READY_TIMEOUT
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise ApplianceError(
                    f"deployment {self.name}: a worker exited with code {dead[0].returncode} "
                    "while loading its model"
                )
            ready = {p.pid for p in self.procs if self.snapshot(p).exists()}
            if len(ready) == len(self.procs):
                return
            time.sleep(0.02)
        raise ApplianceError(f"deployment {self.name}: workers not ready after 60s")

    def reap(self) -> None:
        for proc in [p for p in self.procs if p.poll() is not None]:
            self.procs.remove(proc)
            self.snapshot(proc).unlink(missing_ok=True)
            self.failures += 1
            self.not_before = time.monotonic() + min(30.0, 0.5 * 2 ** min(self.failures, 6))
            log.error("worker %s exited with code %s", proc.pid, proc.returncode)
        if len(self.procs) < self.count and time.monotonic() >= self.not_before:
            self.spawn()
            log.info("worker restarted (%d in all)", self.failures)

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            # a worker killed after the timeout cannot remove its snapshot: done here
            self.snapshot(proc).unlink(missing_ok=True)


def judge_canary(app: Appliance, name: str, directory: Path) -> str | None:
    """Roll the canary back when its rule breaks over its window (its own traffic only:
    nothing from before it started); returns the reason."""
    from datetime import datetime

    from appliance.core.deployments import end_canary

    row = app.db.one(
        "SELECT d.canary_revision, d.canary_rule, d.canary_window_s, mv.version, "
        "r.created_at FROM deployments d JOIN deployment_revisions r "
        "ON r.deployment_id = d.id AND r.revision = d.canary_revision "
        "JOIN model_versions mv ON mv.id = r.model_version_id WHERE d.name = ?",
        (name,),
    )
    if row is None or not row["canary_rule"]:
        return None
    started = datetime.fromisoformat(row["created_at"]).timestamp()
    stats = window(
        merge(read_snapshots(directory)),
        float(row["canary_window_s"] or 60),
        role="canary",
        version=int(row["version"]),
        since=started,
    )
    reason = parse_rule(row["canary_rule"]).breach(stats)
    if reason is None:
        return None
    reason = f"auto-rollback: {reason}"
    if end_canary(app, name, "aborted", reason, "server", expected=row["canary_revision"]) is None:
        return None  # it ended meanwhile (promoted, aborted): not ours to judge any more
    wake_workers(app, name, [int(s["pid"]) for s in read_snapshots(directory) if s.get("pid")])
    log.warning("canary revision %s rolled back: %s", row["canary_revision"], reason)
    return reason


def serve_deployment(app: Appliance, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
    """Run a deployment's server in the foreground until SIGTERM/SIGINT: bind, start the
    workers, supervise them and judge the canary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _max_body()  # a bad limit fails here, before anything listens
    row = app.db.one("SELECT workers FROM deployments WHERE name = ?", (name,))
    if row is None:
        raise ApplianceError(f"deployment {name!r} not found")
    directory = state_dir(app, name)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("worker-*.json"):
        stale.unlink(missing_ok=True)
    sock = _bind(host, port, listen=not REUSEPORT)  # with REUSEPORT: holds the port only
    if not REUSEPORT:
        sock.set_inheritable(True)
    workers = _Workers(app, name, sock, max(1, int(row["workers"] or 1)))
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    pid = os.getpid()
    try:
        for _ in range(workers.count):
            workers.spawn()
        workers.wait_ready()
        bound_host, bound_port = sock.getsockname()[:2]
        app.db.execute(
            "UPDATE deployments SET host = ?, port = ?, pid = ?, status = 'serving', "
            "updated_at = ? WHERE name = ?",
            (bound_host, bound_port, pid, utcnow(), name),
        )
        log.info(
            "listening on http://%s:%s with %d worker(s)", bound_host, bound_port, workers.count
        )
        while not stop.wait(0.5):
            workers.reap()
            try:
                judge_canary(app, name, directory)
            except Exception:
                log.exception("canary check failed")
    finally:
        workers.stop()
        sock.close()
        app.db.execute(
            "UPDATE deployments SET status = 'stopped', pid = NULL, updated_at = ? "
            "WHERE name = ? AND pid = ?",
            (utcnow(), name, pid),
        )
