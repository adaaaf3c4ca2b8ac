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
import time
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
MAX_BODY_ENV = "APPLIANCE_SERVE_MAX_BODY"  # e.g. 8Mi: larger requests get a 413
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


BINARY_HEADER = "Inference-Header-Content-Length"
_BINARY_DTYPES = {
    "BOOL": "<?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}


def split_binary_body(raw: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The V2 binary data extension: a JSON header of `header_length` bytes, then tensor bytes."""
    if header_length is None:
        return raw, b""
    if not (header_length.isascii() and header_length.isdigit()):
        raise RequestError(400, f"{BINARY_HEADER}: expected a byte count, got {header_length!r}")
    size = int(header_length)
    if size > len(raw):
        raise RequestError(400, f"{BINARY_HEADER}: {size} is larger than the {len(raw)}-byte body")
    return raw[:size], raw[size:]


def _decode_binary(name: str, datatype: str, shape: list[int], chunk: bytes) -> list[Any]:
    """One tensor's values from its little-endian bytes (BYTES: 4-byte length, then bytes)."""
    import numpy as np

    count = math.prod(shape)
    if datatype == "BYTES":
        values: list[Any] = []
        offset = 0
        while offset < len(chunk):
            if offset + 4 > len(chunk):
                raise RequestError(400, f"input {name!r}: truncated BYTES element length")
            length = int.from_bytes(chunk[offset : offset + 4], "little")
            offset += 4
            if offset + length > len(chunk):
                raise RequestError(400, f"input {name!r}: truncated BYTES element")
            values.append(chunk[offset : offset + length].decode("utf-8", "replace"))
            offset += length
        if len(values) != count:
            raise RequestError(
                400, f"input {name!r}: shape {shape} needs {count} values, got {len(values)}"
            )
        return values
    dtype = np.dtype(_BINARY_DTYPES[datatype])
    if len(chunk) != count * dtype.itemsize:
        raise RequestError(
            400,
            f"input {name!r}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, "
            f"got {len(chunk)}",
        )
    return np.frombuffer(chunk, dtype=dtype).astype(np.float64).tolist()


def encode_binary_outputs(response: dict[str, Any]) -> tuple[bytes, int]:
    """Outputs as FP64 bytes after the JSON header (each output's binary_data_size says how
    many); returns the body and the header length for Inference-Header-Content-Length."""
    import numpy as np

    chunks = []
    for output in response["outputs"]:
        data = np.asarray(output.pop("data"), dtype="<f8").tobytes()
        output.setdefault("parameters", {})["binary_data_size"] = len(data)
        chunks.append(data)
    header = json.dumps(response, separators=(",", ":")).encode()
    return header + b"".join(chunks), len(header)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(d, list) for d in data):
        return data
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item))
    return flat


def parse_v2_request(
    body: Any, runtime: ModelRuntime, binary: bytes = b""
) -> tuple[dict[str, list[Any]], list[str]]:
    """V2 inputs -> feature columns; one tensor per feature, or one [N, F] tensor in order.
    Tensors with a `binary_data_size` parameter take their values from `binary`, in order."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, "inputs: required, a non-empty list of tensors")
    tensors: list[tuple[str, list[int], list[Any]]] = []
    binary_offset = 0
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
        params = tensor.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(400, f"input {name!r}: parameters must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RequestError(400, f"input {name!r}: binary_data_size must be a byte count")
            if binary_offset + size > len(binary):
                raise RequestError(
                    400, f"input {name!r}: binary_data_size {size} runs past the body's end"
                )
            chunk = binary[binary_offset : binary_offset + size]
            binary_offset += size
            tensors.append((name, shape, _decode_binary(name, datatype, shape, chunk)))
            continue
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
    if binary_offset != len(binary):
        raise RequestError(
            400, f"{len(binary) - binary_offset} bytes of binary data belong to no input"
        )

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
        for o in requested:
            if not isinstance(o.get("parameters", {}), dict):
                raise RequestError(400, f"outputs {o['name']!r}: parameters must be an object")
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
            400,
            "request must have exactly one of 'dataframe_split', 'dataframe_records', "
            "'instances' or 'inputs'",
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
    payload = body[key]
    if isinstance(payload, dict):  # {"inputs": {"column": [values...], ...}}
        if not all(isinstance(v, list) for v in payload.values()):
            raise RequestError(400, f"{key}: each column must be a list of values")
        return {str(k): list(v) for k, v in payload.items()}
    if not isinstance(payload, list):
        raise RequestError(400, f"{key}: expected a list of rows or an object of columns")
    if all(isinstance(r, dict) for r in payload):
        return parse_invocations({"dataframe_records": payload}, runtime)
    if all(isinstance(r, list) for r in payload):  # rows in the signature's column order
        return parse_invocations(
            {"dataframe_split": {"columns": runtime.feature_names, "data": payload}}, runtime
        )
    raise RequestError(400, f"{key}: rows must all be objects or all be lists")


def parse_csv(raw: bytes, runtime: ModelRuntime) -> dict[str, list[Any]]:
    """text/csv for /invocations: a header row, then rows; numbers are numbers, empty is null."""
    import csv
    import io

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"CSV body is not UTF-8: {exc.reason}") from exc
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or not rows[0]:
        raise RequestError(400, "CSV body needs a header row")
    header, data = rows[0], [r for r in rows[1:] if r]
    for i, row in enumerate(data, start=2):
        if len(row) != len(header):
            raise RequestError(400, f"CSV line {i}: {len(row)} values for {len(header)} columns")

    def value(text: str) -> Any:
        if text == "":
            return None
        try:
            return float(text)
        except ValueError:
            return text

    return {name: [value(row[j]) for row in data] for j, name in enumerate(header)}


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class RequestStats:
    """Prometheus counters: requests by version and status code, latency by version."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[tuple[str, str], list[float]] = {}  # bucket counts, then sum, count

    def observe(self, model: str, version: str, status: int, seconds: float) -> None:
        with self.lock:
            key = (model, version, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            hist = self.latency.setdefault((model, version), [0.0] * (len(LATENCY_BUCKETS) + 2))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    hist[i] += 1
            hist[-2] += seconds
            hist[-1] += 1

    def render(self) -> str:
        lines = [
            "# HELP appliance_requests_total Prediction requests by model version and status.",
            "# TYPE appliance_requests_total counter",
        ]
        with self.lock:
            for (model, version, status), n in sorted(self.requests.items()):
                labels = f'model="{model}",version="{version}",code="{status}"'
                lines.append(f"appliance_requests_total{{{labels}}} {n}")
            lines += [
                "# HELP appliance_request_seconds Prediction latency by model version.",
                "# TYPE appliance_request_seconds histogram",
            ]
            for (model, version), hist in sorted(self.latency.items()):
                base = f'model="{model}",version="{version}"'
                for bound, n in zip(LATENCY_BUCKETS, hist, strict=False):
                    lines.append(f'appliance_request_seconds_bucket{{{base},le="{bound}"}} {n:.0f}')
                lines.append(f'appliance_request_seconds_bucket{{{base},le="+Inf"}} {hist[-1]:.0f}')
                lines.append(f"appliance_request_seconds_sum{{{base}}} {hist[-2]:.6f}")
                lines.append(f"appliance_request_seconds_count{{{base}}} {hist[-1]:.0f}")
        return "\n".join(lines) + "\n"


class ModelServer:
    """What the HTTP handler serves: the deployment's current version plus loaded others."""

    def __init__(self, app: Appliance, deployment: str, token: str) -> None:
        self.app = app
        self.deployment = deployment
        self.stats = RequestStats()
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
    max_body: int = MAX_BODY

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, payload: Any) -> None:
        if isinstance(payload, Raw):
            body, content_type, extra = payload.body, payload.content_type, payload.headers
        else:
            body = json.dumps(payload, separators=(",", ":")).encode()
            content_type, extra = "application/json", {}
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):
            raise RequestError(411, "Content-Length header required")
        size = int(length)
        if size > self.max_body:
            self.close_connection = True
            raise RequestError(413, f"request body over the {self.max_body}-byte limit")
        return self.rfile.read(size)

    def _read_json(self, raw: bytes | None = None) -> Any:
        raw = self._read_body() if raw is None else raw
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
            raise RequestError(400, f"request body is not valid JSON: {reason}") from exc

    def _dispatch(self, method: str) -> None:
        started = time.perf_counter()
        self.served_version = ""
        try:
            status, payload = self._route(method, self.path.split("?", 1)[0])
        except RequestError as exc:
            status, payload = exc.status, {"error": exc.message}
        except Exception:  # never leak a stack trace to the client
            log.exception("internal error on %s %s", method, self.path)
            status, payload = 500, {"error": "internal server error"}
        self._send(status, payload)
        if self.served_version:  # prediction routes only
            self.model_server.stats.observe(
                self.model_server.model, self.served_version, status, time.perf_counter() - started
            )

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
                return 200, {
                    "name": "appliance",
                    "version": __version__,
                    "extensions": ["binary_tensor_data"],
                }
            if path == "/version":
                current = ms.current.version if ms.current else None
                return 200, {"version": __version__, "model": ms.model, "model_version": current}
            if path == "/metrics":
                return 200, Raw(ms.stats.render().encode(), "text/plain; version=0.0.4")
        match = _MODEL_PATH.match(path)
        if match:
            name, version, action = match.groups()
            runtime = self._model_runtime(name, version)
            if method == "GET" and action is None:
                return 200, runtime.metadata()
            if method == "GET" and action == "/ready":
                return 200, {"name": name, "ready": True}
            if method == "POST" and action == "/infer":
                self.served_version = str(runtime.version)
                header, binary = split_binary_body(
                    self._read_body(), self.headers.get(BINARY_HEADER)
                )
                body = self._read_json(header)
                columns, outputs = parse_v2_request(body, runtime, binary)
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
                if _wants_binary(body):
                    data, length = encode_binary_outputs(response)
                    return 200, Raw(data, "application/octet-stream", {BINARY_HEADER: str(length)})
                return 200, response
            raise RequestError(405, f"{method} not allowed on {path}")
        if method == "POST" and path == "/invocations":
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if content_type not in ("application/json", "text/csv"):
                raise RequestError(415, "Content-Type must be application/json or text/csv")
            runtime = self._model_runtime(ms.model, None)
            self.served_version = str(runtime.version)
            if content_type == "text/csv":
                columns = parse_csv(self._read_body(), runtime)
            else:
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


class Raw:
    """A response body that is not JSON (metrics text, binary tensors)."""

    def __init__(self, body: bytes, content_type: str, headers: dict[str, str] | None = None):
        self.body, self.content_type, self.headers = body, content_type, headers or {}


def _wants_binary(body: dict[str, Any]) -> bool:
    """The binary extension's output request: per output, or for all outputs."""
    params = body.get("parameters") or {}
    if isinstance(params, dict) and params.get("binary_data_output") is True:
        return True
    return any(
        isinstance(o, dict) and (o.get("parameters") or {}).get("binary_data") is True
        for o in body.get("outputs") or []
    )


def serve_deployment(app: Appliance, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
    """Run a deployment's model server in the foreground until SIGTERM/SIGINT."""
    from appliance.core.deployments import read_token

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from appliance.core.jobs import parse_memory

    limit = parse_memory(os.environ.get(MAX_BODY_ENV, MAX_BODY), MAX_BODY_ENV)
    server = ModelServer(app, name, read_token(app, name))
    server.sync()
    handler = type("Handler", (_Handler,), {"model_server": server, "max_body": limit})
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
