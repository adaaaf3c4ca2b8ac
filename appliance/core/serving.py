"""Model serving: one HTTP process per deployment, speaking KServe V2 and MLflow's /invocations.

The process holds every model version it has loaded; a deploy or rollback is a pointer swap
after the new version is loaded, so requests never see a gap. It learns of a new revision from
POST /admin/reload (token required) and, as a fallback, by polling the metadata store.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import re
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.core.context import Appliance
from appliance.core.registry import get_model_version
from appliance.errors import ApplianceError
from appliance.store.db import utcnow

log = logging.getLogger("appliance.serving")

MAX_BODY = 32 << 20
POLL_SECONDS = 1.0
PREDICT_OUTPUT = "predict"
_NUMERIC_TYPES = {
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
}


class RequestError(Exception):
    """A client error: answered with `status` and {"error": message}, never a stack trace."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ModelRuntime:
    """A loaded model version and its input signature; validates what it is asked to predict."""

    def __init__(self, version: dict[str, Any], model_file: str) -> None:
        self.model = version["model"]
        self.version = int(version["version"])
        signature = version["signature"]
        self.features: list[dict[str, Any]] = signature["signature"]
        self.objective = signature.get("objective", "binary")
        self.labels = list(signature.get("labels") or [])
        self.feature_names = [f["name"] for f in self.features]
        self._categories = {
            f["name"]: {c: i for i, c in enumerate(f["categories"])}
            for f in self.features
            if f["type"] == "category"
        }
        self.flavor = version.get("flavor", "lightgbm")
        if (
            self.flavor == "mlp"
        ):  # numpy forward pass: serving needs neither torch nor training code
            from appliance.core.mlp import MlpModel

            self.booster: Any = MlpModel.load(Path(model_file))
        else:
            import lightgbm as lgb

            self.booster = lgb.Booster(model_file=model_file)

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.model,
            "versions": [str(self.version)],
            "platform": self.flavor,
            "inputs": [
                {
                    "name": f["name"],
                    "datatype": "BYTES" if f["type"] == "category" else "FP64",
                    "shape": [-1],
                }
                for f in self.features
            ],
            "outputs": [
                {
                    "name": PREDICT_OUTPUT,
                    "datatype": "FP64",
                    # multiclass: one probability per class, in the order of `labels`
                    "shape": [-1, len(self.labels)] if self.objective == "multiclass" else [-1],
                }
            ],
            "parameters": {"objective": self.objective, "labels": json.dumps(self.labels)},
        }

    def _column(self, name: str, values: list[Any]) -> list[float]:
        index = self._categories.get(name)
        out: list[float] = []
        if index is not None:
            for value in values:
                if value is None:
                    out.append(math.nan)
                elif isinstance(value, str | int | float) and not isinstance(value, bool):
                    out.append(float(index.get(str(value), -1)))  # unseen category -> missing
                else:
                    raise RequestError(400, f"feature {name!r}: expected a category, got {value!r}")
            return [math.nan if v < 0 else v for v in out]
        for row, value in enumerate(values):
            if value is None:
                out.append(math.nan)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                try:
                    number = float(value)  # NaN means missing, as in LightGBM
                except OverflowError:
                    number = math.inf
                if math.isinf(number):
                    raise RequestError(
                        400, f"feature {name!r} row {row}: {str(value)[:20]} is out of range"
                    )
                out.append(number)
            else:
                raise RequestError(
                    400, f"feature {name!r} row {row}: expected a number, got {value!r}"
                )
        return out

    def matrix(self, columns: dict[str, list[Any]]) -> Any:
        """Validated feature columns as the float64 matrix the booster takes."""
        import numpy as np

        missing = [n for n in self.feature_names if n not in columns]
        if missing:
            raise RequestError(400, f"missing feature column(s): {', '.join(missing)}")
        lengths = {len(columns[n]) for n in self.feature_names}
        if len(lengths) != 1:
            raise RequestError(400, "feature columns have different lengths")
        matrix = np.empty((lengths.pop(), len(self.features)), dtype=np.float64)
        for j, name in enumerate(self.feature_names):
            matrix[:, j] = self._column(name, columns[name])
        return matrix

    def predict(self, columns: dict[str, list[Any]]) -> list[Any]:
        """One value per row, or one list of class probabilities per row (multiclass)."""
        matrix = self.matrix(columns)
        if matrix.shape[0] == 0:
            return []
        return [
            [float(p) for p in row] if hasattr(row, "__len__") else float(row)
            for row in self.booster.predict(matrix)
        ]


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(d, list) for d in data):
        return data
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item))
    return flat


def parse_v2_request(body: Any, runtime: ModelRuntime) -> tuple[dict[str, list[Any]], list[str]]:
    """V2 inputs -> feature columns; one tensor per feature, or one [N, F] tensor in order."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, "inputs: required, a non-empty list of tensors")
    tensors: list[tuple[str, list[int], list[Any]]] = []
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise RequestError(400, f"inputs[{i}]: must be an object")
        name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
        if not isinstance(name, str):
            raise RequestError(400, f"inputs[{i}].name: required string")
        if any(name == seen for seen, _, _ in tensors):
            raise RequestError(400, f"input {name!r} appears more than once")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise RequestError(
                400, f"input {name!r}: shape must be a list of non-negative integers"
            )
        if datatype not in _NUMERIC_TYPES and datatype != "BYTES":
            raise RequestError(400, f"input {name!r}: unknown datatype {datatype!r}")
        if "data" not in tensor:
            raise RequestError(400, f"input {name!r}: data is required")
        data = _flatten(tensor["data"])
        expected = math.prod(shape)
        if len(data) != expected:
            raise RequestError(
                400, f"input {name!r}: shape {shape} needs {expected} values, got {len(data)}"
            )
        if datatype in _NUMERIC_TYPES:
            for j, value in enumerate(data):
                if not isinstance(value, int | float) or (
                    isinstance(value, bool) and datatype != "BOOL"
                ):
                    raise RequestError(
                        400, f"input {name!r}: datatype {datatype} but element {j} is {value!r}"
                    )
        tensors.append((name, shape, data))

    columns: dict[str, list[Any]] = {}
    width = len(runtime.feature_names)
    if len(tensors) == 1 and tensors[0][0] not in runtime.feature_names:
        name, shape, data = tensors[0]
        if len(shape) != 2 or shape[1] != width:
            raise RequestError(
                400,
                f"input {name!r}: not a feature name; a single tensor must have shape "
                f"[N, {width}] with columns {runtime.feature_names}",
            )
        for j, feature in enumerate(runtime.feature_names):
            columns[feature] = data[j::width]
    else:
        for name, shape, data in tensors:
            if name not in runtime.feature_names:
                raise RequestError(400, f"unknown input {name!r}; expected {runtime.feature_names}")
            if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
                raise RequestError(400, f"input {name!r}: shape must be [N] or [N, 1]")
            columns[name] = data
    requested = body.get("outputs")
    names = [PREDICT_OUTPUT]
    if requested is not None:
        if not isinstance(requested, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested
        ):
            raise RequestError(400, 'outputs: must be a list of {"name": ...} objects')
        names = [o["name"] for o in requested]
        unknown = [n for n in names if n != PREDICT_OUTPUT]
        if unknown:
            raise RequestError(
                400, f"unknown output(s) {unknown}; this model has {PREDICT_OUTPUT!r}"
            )
    return columns, names


def parse_invocations(body: Any, runtime: ModelRuntime) -> dict[str, list[Any]]:
    """MLflow scoring format: exactly one of dataframe_split or dataframe_records."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    keys = [k for k in ("dataframe_split", "dataframe_records", "instances", "inputs") if k in body]
    if len(keys) != 1:
        raise RequestError(
            400, "request must have exactly one of 'dataframe_split' or 'dataframe_records'"
        )
    key = keys[0]
    if key == "dataframe_split":
        split = body[key]
        if not isinstance(split, dict) or not isinstance(split.get("columns"), list):
            raise RequestError(400, "dataframe_split.columns: required list of column names")
        data = split.get("data")
        if not isinstance(data, list) or not all(isinstance(r, list) for r in data):
            raise RequestError(400, "dataframe_split.data: required list of rows")
        cols = split["columns"]
        for i, row in enumerate(data):
            if len(row) != len(cols):
                raise RequestError(
                    400, f"dataframe_split.data[{i}]: {len(row)} values for {len(cols)} columns"
                )
        return {str(c): [row[j] for row in data] for j, c in enumerate(cols)}
    if key == "dataframe_records":
        records = body[key]
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise RequestError(400, "dataframe_records: required list of objects")
        columns: dict[str, list[Any]] = {}
        for name in runtime.feature_names:
            values = []
            for i, record in enumerate(records):
                if name not in record:
                    raise RequestError(400, f"dataframe_records[{i}]: missing feature {name!r}")
                values.append(record[name])
            columns[name] = values
        return columns
    raise RequestError(400, f"{key!r} is not supported; use dataframe_split or dataframe_records")


class ModelServer:
    """What the HTTP handler serves: the deployment's current version plus loaded others."""

    def __init__(self, app: Appliance, deployment: str, token: str) -> None:
        self.app = app
        self.deployment = deployment
        self.token = token
        self.model = ""
        self.revision = 0
        self.current: ModelRuntime | None = None
        self._loaded: dict[int, ModelRuntime] = {}
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()

    def runtime_for(self, version: int) -> ModelRuntime:
        with self._lock:
            runtime = self._loaded.get(version)
        if runtime is not None:
            return runtime
        try:
            mv = get_model_version(self.app, f"{self.model}@{version}")
        except ApplianceError as exc:
            raise RequestError(404, exc.message) from exc
        runtime = ModelRuntime(mv, str(self.app.objects.get_file(mv["sha256"])))
        with self._lock:
            return self._loaded.setdefault(version, runtime)

    def sync(self) -> bool:
        """Adopt the deployment's current revision; True if it changed."""
        row = self.app.db.one(
            "SELECT d.current_revision, m.name AS model, mv.version FROM deployments d "
            "JOIN registered_models m ON m.id = d.model_id "
            "JOIN deployment_revisions r ON r.deployment_id = d.id "
            "AND r.revision = d.current_revision "
            "JOIN model_versions mv ON mv.id = r.model_version_id WHERE d.name = ?",
            (self.deployment,),
        )
        if row is None:
            raise ApplianceError(f"deployment {self.deployment!r} not found")
        with self._sync_lock:  # the poll thread and /admin/reload must not interleave
            if int(row["current_revision"]) <= self.revision:
                return False  # revisions only grow: never step back to an older read
            self.model = row["model"]
            runtime = self.runtime_for(int(row["version"]))  # load before the swap
            self.current, self.revision = runtime, int(row["current_revision"])
        log.info("serving %s@%s (revision %s)", self.model, runtime.version, self.revision)
        return True


_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"appliance/{__version__}"
    model_server: ModelServer  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, payload: Any) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):
            raise RequestError(411, "Content-Length header required")
        size = int(length)
        if size > MAX_BODY:
            self.close_connection = True
            raise RequestError(413, f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(size)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
            raise RequestError(400, f"request body is not valid JSON: {reason}") from exc

    def _dispatch(self, method: str) -> None:
        try:
            status, payload = self._route(method, self.path.split("?", 1)[0])
        except RequestError as exc:
            status, payload = exc.status, {"error": exc.message}
        except Exception:  # never leak a stack trace to the client
            log.exception("internal error on %s %s", method, self.path)
            status, payload = 500, {"error": "internal server error"}
        self._send(status, payload)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _model_runtime(self, name: str, version: str | None) -> ModelRuntime:
        ms = self.model_server
        if name != ms.model or ms.current is None:
            raise RequestError(404, f"model {name!r} is not served here (serving {ms.model!r})")
        if version is None:
            return ms.current
        if not (version.isascii() and version.isdigit()) or len(version) > 9:
            raise RequestError(404, f"model version {version[:20]!r} not found")
        return ms.runtime_for(int(version))

    def _route(self, method: str, path: str) -> tuple[int, Any]:
        ms = self.model_server
        if method == "GET":
            if path == "/v2/health/live":
                return 200, {"live": True}
            if path in ("/v2/health/ready", "/ping", "/health"):
                if ms.current is None:
                    raise RequestError(503, "no model loaded")
                return 200, {"ready": True}
            if path == "/v2":
                return 200, {"name": "appliance", "version": __version__, "extensions": []}
        match = _MODEL_PATH.match(path)
        if match:
            name, version, action = match.groups()
            runtime = self._model_runtime(name, version)
            if method == "GET" and action is None:
                return 200, runtime.metadata()
            if method == "GET" and action == "/ready":
                return 200, {"name": name, "ready": True}
            if method == "POST" and action == "/infer":
                body = self._read_json()
                columns, outputs = parse_v2_request(body, runtime)
                predictions = runtime.predict(columns)
                shape, flat = [len(predictions)], predictions
                if predictions and isinstance(predictions[0], list):  # [N, classes], row-major
                    shape = [len(predictions), len(predictions[0])]
                    flat = [p for row in predictions for p in row]
                response: dict[str, Any] = {
                    "model_name": runtime.model,
                    "model_version": str(runtime.version),
                    "outputs": [
                        {
                            "name": out,
                            "shape": shape,
                            "datatype": "FP64",
                            "data": flat,
                        }
                        for out in outputs
                    ],
                }
                if isinstance(body.get("id"), str):
                    response["id"] = body["id"]
                return 200, response
            raise RequestError(405, f"{method} not allowed on {path}")
        if method == "POST" and path == "/invocations":
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if content_type != "application/json":
                raise RequestError(415, "Content-Type must be application/json")
            runtime = self._model_runtime(ms.model, None)
            columns = parse_invocations(self._read_json(), runtime)
            return 200, {"predictions": runtime.predict(columns)}
        if method == "POST" and path == "/admin/reload":
            supplied = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
            if not supplied or not hmac.compare_digest(
                supplied.encode("utf-8", "surrogateescape"), ms.token.encode()
            ):
                raise RequestError(401, "admin token required")
            ms.sync()
            assert ms.current is not None
            return 200, {"revision": ms.revision, "model_version": ms.current.version}
        raise RequestError(404, f"no route for {method} {path}")


def serve_deployment(app: Appliance, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
    """Run a deployment's model server in the foreground until SIGTERM/SIGINT."""
    from appliance.core.deployments import read_token

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = ModelServer(app, name, read_token(app, name))
    server.sync()
    handler = type("Handler", (_Handler,), {"model_server": server})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    bound_host, bound_port = httpd.server_address[:2]
    pid = os.getpid()
    app.db.execute(
        "UPDATE deployments SET host = ?, port = ?, pid = ?, status = 'serving', updated_at = ? "
        "WHERE name = ?",
        (bound_host, bound_port, pid, utcnow(), name),
    )
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(POLL_SECONDS):
            try:
                server.sync()
            except Exception:
                log.exception("revision poll failed")

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=poll, daemon=True).start()
    log.info("listening on http://%s:%s", bound_host, bound_port)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        stop.set()
        httpd.server_close()
        app.db.execute(
            "UPDATE deployments SET status = 'stopped', pid = NULL, updated_at = ? "
            "WHERE name = ? AND pid = ?",
            (utcnow(), name, pid),
        )
