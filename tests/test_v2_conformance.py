"""KServe V2 conformance with a real, unmodified client: Triton's `tritonclient.http`, which
speaks the Open Inference Protocol over REST and uses the binary tensor data extension by
default. Every endpoint, JSON and binary tensors, several datatypes, and errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from appliance.core import deployments
from appliance.core.context import Appliance
from appliance.core.quickstart import sample_rows


@pytest.fixture(scope="module")
def client(trained_home: Path) -> Iterator[Any]:
    app = Appliance.open(trained_home)
    dep = deployments.create_deployment(app, "conformance", "churn@1")
    triton = httpclient.InferenceServerClient(url=f"127.0.0.1:{dep['port']}")
    yield triton
    triton.close()
    deployments.stop_deployment(app, "conformance")
    app.close()


def _inputs(binary: bool, numeric: str = "FP64") -> list[Any]:
    features, rows = sample_rows(4)
    out = []
    for j, name in enumerate(features):
        column = [r[j] for r in rows]
        if any(isinstance(v, str) for v in column):
            tensor = httpclient.InferInput(name, [len(rows)], "BYTES")
            tensor.set_data_from_numpy(np.array(column, dtype=np.object_), binary_data=binary)
        else:
            dtype = {"FP64": np.float64, "FP32": np.float32, "INT64": np.int64}[numeric]
            if numeric == "INT64" and any(float(v) != int(v) for v in column):
                dtype = np.float64  # keep fractional features exact
            array = np.array(column, dtype=dtype)
            tensor = httpclient.InferInput(name, [len(rows)], _triton_type(array.dtype))
            tensor.set_data_from_numpy(array, binary_data=binary)
        out.append(tensor)
    return out


def _triton_type(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)


def test_health_server_and_model_metadata(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    server = client.get_server_metadata()
    assert server["name"] == "appliance" and "binary_tensor_data" in server["extensions"]
    assert client.is_model_ready("churn") and client.is_model_ready("churn", "1")
    assert not client.is_model_ready("churn", "2")  # registered, not served here
    meta = client.get_model_metadata("churn")
    assert meta["name"] == "churn" and meta["versions"] == ["1"]
    features, _ = sample_rows(1)
    assert [i["name"] for i in meta["inputs"]] == features
    assert meta["outputs"][0] == {"name": "predict", "datatype": "FP64", "shape": [-1]}
    assert client.get_model_metadata("churn", model_version="1")["versions"] == ["1"]


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_json_and_binary_tensors_agree(
    client: Any, binary_in: bool, binary_out: bool
) -> None:
    reference = client.infer("churn", _inputs(binary=False)).as_numpy("predict")
    result = client.infer(
        "churn",
        _inputs(binary=binary_in),
        outputs=[httpclient.InferRequestedOutput("predict", binary_data=binary_out)],
        request_id="conformance-1",
    )
    response = result.get_response()
    assert response["model_name"] == "churn" and response["model_version"] == "1"
    assert response["id"] == "conformance-1"
    predictions = result.as_numpy("predict")
    assert predictions.dtype == np.float64 and predictions.shape == (4,)
    assert np.allclose(predictions, reference) and ((0 <= predictions) & (predictions <= 1)).all()


@pytest.mark.parametrize("datatype", ["FP32", "INT64"])
def test_other_numeric_datatypes(client: Any, datatype: str) -> None:
    reference = client.infer("churn", _inputs(binary=False)).as_numpy("predict")
    got = client.infer("churn", _inputs(binary=True, numeric=datatype)).as_numpy("predict")
    assert np.allclose(got, reference, atol=1e-4)


def test_versioned_infer_and_errors_reach_the_client(client: Any) -> None:
    got = client.infer("churn", _inputs(binary=True), model_version="1")
    assert got.get_response()["model_version"] == "1"
    with pytest.raises(InferenceServerException, match="not served"):
        client.infer("churn", _inputs(binary=True), model_version="2")
    with pytest.raises(InferenceServerException, match="not served here"):
        client.infer("nope", _inputs(binary=True))
    with pytest.raises(InferenceServerException, match="not served here"):
        client.get_model_metadata("nope")
    bad = _inputs(binary=True)[1:]  # the first feature missing
    with pytest.raises(InferenceServerException, match="missing feature"):
        client.infer("churn", bad)
