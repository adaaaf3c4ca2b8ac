"""Inference: a loaded model version and the request formats it answers.

Both protocols (KServe V2 tensors, MLflow's /invocations) become the same thing here: feature
columns checked against the version's signature, then one float64 matrix for the model. Every
problem is a RequestError naming the field, answered as a 4xx, never as a stack trace.
"""

from __future__ import annotations

import json
import math
from itertools import chain
from pathlib import Path
from typing import Any

PREDICT_OUTPUT = "predict"
# Up to this many rows LightGBM predicts on one thread: waking its OpenMP team and joining
# it again costs more than the trees (on 2 cores, a 1-row predict took 116 us with the team,
# passive as the serving workers set it, and 25 us without; 32 rows 163 and 55 us; from 512
# rows the team is faster).
SMALL_BATCH = 64
_PLAIN_NUMBERS = {int, float}
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
        self.feature_service: str | None = version.get("feature_service")
        signature = version["signature"]
        self.features: list[dict[str, Any]] = signature["signature"]
        self.objective = signature.get("objective", "binary")
        self.labels = list(signature.get("labels") or [])
        self.feature_names = [f["name"] for f in self.features]
        self._positions = {name: j for j, name in enumerate(self.feature_names)}
        self.has_categories = any(f["type"] == "category" for f in self.features)
        self.categories = {
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

    def _column(self, name: str, values: Any) -> Any:
        """One feature column as float64: categories become their codes (unseen or null ->
        NaN, LightGBM's missing value), numbers are checked to be numbers and finite."""
        import numpy as np

        index = self.categories.get(name)
        if index is not None:
            return self._category_column(name, index, values)
        if isinstance(values, np.ndarray):  # binary tensors and V2 numeric tensors
            column = values.astype(np.float64, copy=False)
        elif set(map(type, values)) <= _PLAIN_NUMBERS:  # the common case, checked in C
            try:
                column = np.array(values, dtype=np.float64)
            except OverflowError:
                column = _floats(name, values)
        else:
            column = _floats(name, values)
        if not np.isfinite(column).all() and np.isinf(column).any():
            row = int(np.flatnonzero(np.isinf(column))[0])
            raise RequestError(400, f"feature {name!r} row {row}: {values[row]!r} is out of range")
        return column

    @staticmethod
    def _category_column(name: str, index: dict[str, int], values: Any) -> Any:
        """Levels as their codes. A level the model never saw is missing (NaN), as LightGBM
        treats it; a number is accepted only when it spells a known level (CSV reads "1" as
        1.0), anything else is the wrong type."""
        import numpy as np

        if isinstance(values, np.ndarray):
            values = values.tolist()
        out = np.empty(len(values), dtype=np.float64)
        for row, value in enumerate(values):
            if value is None:
                out[row] = math.nan
            elif isinstance(value, str):
                out[row] = index.get(value, math.nan)
            elif (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and float(value).is_integer()
                and str(int(value)) in index
            ):
                out[row] = index[str(int(value))]
            else:
                example = next(iter(index), "")
                raise RequestError(
                    400,
                    f"feature {name!r} row {row}: expected a category (a string such as "
                    f"{example!r}), got {value!r}",
                )
        return out

    def matrix(self, columns: Any) -> Any:
        """Validated feature columns (or an [N, F] float64 array in the signature's column
        order) as the float64 matrix the model takes."""
        import numpy as np

        if isinstance(columns, np.ndarray):  # one numeric [N, F] tensor: checked as a whole
            if not np.isfinite(columns).all() and np.isinf(columns).any():
                row, col = (int(i[0]) for i in np.nonzero(np.isinf(columns)))
                raise RequestError(
                    400, f"feature {self.feature_names[col]!r} row {row}: out of range"
                )
            return columns
        missing = [n for n in self.feature_names if n not in columns]
        if missing:
            raise RequestError(400, f"missing feature column(s): {', '.join(missing)}")
        extra = [n for n in columns if n not in self._positions]
        if extra:
            raise RequestError(
                400, f"unknown feature column(s): {', '.join(map(str, extra))[:200]}"
            )
        lengths = {len(columns[n]) for n in self.feature_names}
        if len(lengths) != 1:
            raise RequestError(400, "feature columns have different lengths")
        matrix = np.empty((lengths.pop(), len(self.features)), dtype=np.float64)
        for j, name in enumerate(self.feature_names):
            matrix[:, j] = self._column(name, columns[name])
        return matrix

    def predict_matrix(self, matrix: Any) -> Any:
        """Model output for a validated matrix: shape [N], or [N, classes] for multiclass."""
        import numpy as np

        if matrix.shape[0] == 0:
            width = len(self.labels) if self.objective == "multiclass" else 0
            return np.empty((0, width) if width else (0,), dtype=np.float64)
        if self.flavor == "mlp":
            return np.asarray(self.booster.predict(matrix), dtype=np.float64)
        if matrix.shape[0] <= SMALL_BATCH:  # one thread: the same numbers, without the team
            return self.booster.predict(matrix, num_threads=1)
        return self.booster.predict(matrix)

    def predict(self, columns: dict[str, Any]) -> list[Any]:
        """One value per row, or one list of class probabilities per row (multiclass)."""
        return self.predict_matrix(self.matrix(columns)).tolist()


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


def _decode_binary(name: str, datatype: str, shape: list[int], chunk: bytes) -> Any:
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
    return np.frombuffer(chunk, dtype=dtype).astype(np.float64, copy=False)


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


_INTEGER_RANGES = {
    "BOOL": (0, 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
}
_FLOAT_LIMITS = {"FP16": 65504.0, "FP32": 3.4028234663852886e38}


def _numeric_tensor(name: str, datatype: str, data: list[Any]) -> Any:
    """A numeric tensor's JSON values as float64, checked against the declared datatype:
    bools only in BOOL tensors, whole numbers in range for INT/UINT, FP16/FP32 in range;
    null is NaN (a missing value)."""
    import numpy as np

    kinds = set(map(type, data))
    array = None
    if kinds <= _PLAIN_NUMBERS or (datatype == "BOOL" and kinds <= {bool}):
        try:
            array = np.array(data, dtype=np.float64)
        except OverflowError:
            pass  # a huge integer: the loop below names it
    if array is None:
        for j, value in enumerate(data):
            if value is None:
                continue
            if not isinstance(value, int | float) or (
                isinstance(value, bool) and datatype != "BOOL"
            ):
                raise RequestError(
                    400, f"input {name!r}: datatype {datatype} but element {j} is {value!r}"
                )
            if isinstance(value, int) and abs(value) > 2**1023:
                raise RequestError(
                    400, f"input {name!r}: element {j} ({str(value)[:20]}…) is out of range"
                )
        array = np.array([math.nan if v is None else v for v in data], dtype=np.float64)
    _check_range(name, datatype, array)
    return array


def _check_range(name: str, datatype: str, array: Any) -> None:
    import numpy as np

    bounds = _INTEGER_RANGES.get(datatype)
    finite = array[np.isfinite(array)] if not np.isfinite(array).all() else array
    if bounds is not None:
        bad = np.flatnonzero(
            (finite != np.floor(finite)) | (finite < bounds[0]) | (finite > bounds[1])
        )
        if bad.size:
            value = float(finite[bad[0]])
            raise RequestError(
                400,
                f"input {name!r}: {value:g} is not a valid {datatype} "
                f"(a whole number, {bounds[0]}..{bounds[1]})",
            )
    limit = _FLOAT_LIMITS.get(datatype)
    if limit is not None and finite.size and np.abs(finite).max() > limit:
        raise RequestError(400, f"input {name!r}: a value is out of range for {datatype}")


_FLOAT_TYPES = {"FP16", "FP32", "FP64"}


def _rows_of_numbers(data: Any) -> Any:
    """The common batch, rows of plain numbers ([[...], [...]]), straight to a flat float64
    array: one type pass and one conversion in C. None when it is anything else (the general
    path then names what is wrong)."""
    import numpy as np

    if not (isinstance(data, list) and data and isinstance(data[0], list)):
        return None
    if not set(map(type, chain.from_iterable(data))) <= _PLAIN_NUMBERS:
        return None  # bools, strings, nulls, deeper nesting, or rows mixed with scalars
    try:
        array = np.array(data, dtype=np.float64)
    except (ValueError, OverflowError):  # ragged rows, huge integers
        return None
    return array.reshape(-1) if array.ndim == 2 else None


def _flatten(data: Any) -> list[Any]:
    """Row-major values of nested lists; level by level in C while every item is a list."""
    if not isinstance(data, list):
        return [data]
    while True:
        kinds = set(map(type, data))
        if list not in kinds:
            return data
        if kinds != {list}:  # scalars beside lists: ragged, element by element
            flat: list[Any] = []
            for item in data:
                flat.extend(_flatten(item))
            return flat
        data = list(chain.from_iterable(data))


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
    tensors: list[tuple[str, list[int], Any]] = []
    texts: set[str] = set()  # BYTES tensors: their numeric features arrive as strings
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
            if datatype == "BYTES":
                texts.add(name)
            continue
        if "data" not in tensor:
            raise RequestError(400, f"input {name!r}: data is required")
        data = _rows_of_numbers(tensor["data"]) if datatype in _FLOAT_TYPES else None
        if data is None:
            data = _flatten(tensor["data"])
        expected = math.prod(shape)
        if len(data) != expected:
            raise RequestError(
                400, f"input {name!r}: shape {shape} needs {expected} values, got {len(data)}"
            )
        if datatype in _NUMERIC_TYPES and not hasattr(data, "dtype"):
            data = _numeric_tensor(name, datatype, data)
        elif datatype in _NUMERIC_TYPES:
            _check_range(name, datatype, data)
        elif not set(map(type, data)) <= {str, type(None)}:
            j, value = next((j, v) for j, v in enumerate(data) if not isinstance(v, str | None))
            raise RequestError(400, f"input {name!r}: datatype BYTES but element {j} is {value!r}")
        tensors.append((name, shape, data))
        if datatype == "BYTES":
            texts.add(name)
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
        if hasattr(data, "reshape") and not runtime.has_categories:
            return data.reshape(-1, width), _output_names(body)  # no per-column pass
        for j, feature in enumerate(runtime.feature_names):
            columns[feature] = data[j::width]
            if name in texts and feature not in runtime.categories:
                columns[feature] = _floats(feature, columns[feature], text=True)
    else:
        for name, shape, data in tensors:
            if name not in runtime.feature_names:
                raise RequestError(400, f"unknown input {name!r}; expected {runtime.feature_names}")
            if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
                raise RequestError(400, f"input {name!r}: shape must be [N] or [N, 1]")
            if name in texts and name not in runtime.categories:
                data = _floats(name, data, text=True)
            columns[name] = data
    return columns, _output_names(body)


def _floats(feature: str, values: list[Any], text: bool = False) -> Any:
    """Element by element, naming the row that is wrong: numbers (null is NaN), or with
    `text` the strings of a BYTES tensor ("12.5" is 12.5, "" is NaN)."""
    import numpy as np

    out = np.empty(len(values), dtype=np.float64)
    for row, value in enumerate(values):
        if value is None or (text and value == ""):
            out[row] = math.nan
            continue
        if (text and isinstance(value, str)) or (
            not text and isinstance(value, int | float) and not isinstance(value, bool)
        ):
            try:
                out[row] = float(value)
                continue
            except OverflowError:
                raise RequestError(
                    400, f"feature {feature!r} row {row}: {str(value)[:20]} is out of range"
                ) from None
            except ValueError:
                pass
        raise RequestError(400, f"feature {feature!r} row {row}: expected a number, got {value!r}")
    return out


def _output_names(body: dict[str, Any]) -> list[str]:
    """The outputs a V2 request asks for (default: all, which is `predict`)."""
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
    return names


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
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:  # e.g. a field over the csv module's size limit
        raise RequestError(400, f"CSV body: {exc}") from exc
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

    # category columns keep their text: "02134" and "1.5" are levels, not numbers
    return {
        name: [(row[j] or None) if name in runtime.categories else value(row[j]) for row in data]
        for j, name in enumerate(header)
    }
