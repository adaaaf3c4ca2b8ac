"""The model server over real HTTP on 127.0.0.1: V2 and /invocations, bad input, rollback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.core import deployments
from appliance.core.context import Appliance
from appliance.core.quickstart import sample_rows
from appliance.errors import Conflict

NAME = "serve-test"


@pytest.fixture(scope="module")
def served(trained_home: Path) -> Iterator[tuple[Appliance, dict[str, Any]]]:
    app = Appliance.open(trained_home)
    dep = deployments.create_deployment(app, NAME, "churn@1")
    yield app, dep
    deployments.stop_deployment(app, NAME)
    app.close()


def call(
    url: str,
    payload: Any = None,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    data = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
    request = urllib.request.Request(
        url,
        data=data,
        method=method if data is not None or method == "GET" else "GET",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        assert "Traceback" not in body
        return exc.code, json.loads(body)


def v2_inputs(features: list[str], rows: list[list[Any]]) -> list[dict[str, Any]]:
    out = []
    for j, name in enumerate(features):
        column = [r[j] for r in rows]
        datatype = "BYTES" if any(isinstance(v, str) for v in column) else "FP64"
        out.append({"name": name, "shape": [len(rows)], "datatype": datatype, "data": column})
    return out


@pytest.fixture(scope="module")
def sample() -> tuple[list[str], list[list[Any]]]:
    return sample_rows(4)


def test_health_and_metadata(served, sample) -> None:  # type: ignore[no-untyped-def]
    _, dep = served
    url = dep["url"]
    assert url.startswith("http://127.0.0.1:")
    assert call(f"{url}/v2/health/live", method="GET")[0] == 200
    assert call(f"{url}/v2/health/ready", method="GET")[0] == 200
    status, server = call(f"{url}/v2", method="GET")
    assert status == 200 and server["extensions"] == ["binary_tensor_data"]
    assert server["name"] == "appliance"
    status, meta = call(f"{url}/v2/models/churn", method="GET")
    assert status == 200
    assert [i["name"] for i in meta["inputs"]] == sample[0]
    assert meta["outputs"][0]["name"] == "predict"
    assert call(f"{url}/v2/models/churn/ready", method="GET")[0] == 200
    assert call(f"{url}/v2/models/nope/ready", method="GET")[0] == 404


def test_v2_infer_and_invocations_agree(served, sample) -> None:  # type: ignore[no-untyped-def]
    _, dep = served
    features, rows = sample
    status, v2 = call(
        f"{dep['url']}/v2/models/churn/infer", {"id": "abc", "inputs": v2_inputs(features, rows)}
    )
    assert status == 200
    assert v2["id"] == "abc" and v2["model_name"] == "churn" and v2["model_version"] == "1"
    out = v2["outputs"][0]
    assert out["shape"] == [4] and out["datatype"] == "FP64" and len(out["data"]) == 4
    assert all(0.0 <= p <= 1.0 for p in out["data"])

    status, split = call(
        f"{dep['url']}/invocations", {"dataframe_split": {"columns": features, "data": rows}}
    )
    assert status == 200 and split["predictions"] == pytest.approx(out["data"])
    records = [dict(zip(features, r, strict=True)) for r in rows]
    status, recs = call(f"{dep['url']}/invocations", {"dataframe_records": records})
    assert status == 200 and recs["predictions"] == pytest.approx(out["data"])


def test_v2_nested_data_and_single_matrix_tensor(served, sample) -> None:  # type: ignore[no-untyped-def]
    _, dep = served
    features, rows = sample
    _, flat = call(f"{dep['url']}/v2/models/churn/infer", {"inputs": v2_inputs(features, rows)})
    nested = v2_inputs(features, rows)
    for tensor in nested:
        tensor["shape"] = [len(rows), 1]
        tensor["data"] = [[v] for v in tensor["data"]]
    status, body = call(f"{dep['url']}/v2/models/churn/infer", {"inputs": nested})
    assert status == 200 and body["outputs"][0]["data"] == flat["outputs"][0]["data"]
    matrix = {  # one BYTES tensor for mixed columns: V2 BYTES hold text, numbers too
        "name": "input-0",
        "shape": [len(rows), len(features)],
        "datatype": "BYTES",
        "data": [[str(v) for v in row] for row in rows],
    }
    status, body = call(f"{dep['url']}/v2/models/churn/infer", {"inputs": [matrix]})
    assert status == 200 and body["outputs"][0]["data"] == flat["outputs"][0]["data"]


def test_versioned_path_serves_only_versions_being_served(served, sample) -> None:  # type: ignore[no-untyped-def]
    _, dep = served
    inputs = v2_inputs(*sample)
    status, body = call(f"{dep['url']}/v2/models/churn/versions/1/infer", {"inputs": inputs})
    assert status == 200 and body["model_version"] == "1"
    # Registered but not deployed: a request must not load arbitrary versions into the server.
    status, body = call(f"{dep['url']}/v2/models/churn/versions/2/infer", {"inputs": inputs})
    assert status == 404 and "not served (serving 1)" in body["error"]
    status, body = call(f"{dep['url']}/v2/models/churn/versions/99/ready", method="GET")
    assert status == 404 and "error" in body


def _without(inputs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [t for t in inputs if t["name"] != name]


def _with_value(inputs: list[dict[str, Any]], name: str, value: Any) -> list[dict[str, Any]]:
    return [
        {**t, "data": [value, *t["data"][1:]], "datatype": "BYTES"} if t["name"] == name else t
        for t in inputs
    ]


@pytest.mark.parametrize(
    "mutate, status, needle",
    [
        (lambda i: _without(i, "tenure_months"), 400, "tenure_months"),
        (lambda i: _with_value(i, "monthly_charges", "lots"), 400, "monthly_charges"),
        (lambda i: [{**i[0], "shape": [3]}, *i[1:]], 400, "shape"),
        (lambda i: [{**i[0], "datatype": "FP128"}, *i[1:]], 400, "datatype"),
        (
            lambda i: [*i, {"name": "extra", "shape": [4], "datatype": "FP64", "data": [1] * 4}],
            400,
            "extra",
        ),
        (lambda i: [{**i[0], "datatype": "FP64", "data": ["x"] * 4}, *i[1:]], 400, "element"),
    ],
)
def test_v2_bad_input_is_a_400_naming_the_field(served, sample, mutate, status, needle) -> None:  # type: ignore[no-untyped-def]
    _, dep = served
    code, body = call(f"{dep['url']}/v2/models/churn/infer", {"inputs": mutate(v2_inputs(*sample))})
    assert code == status
    assert needle in body["error"]


@pytest.mark.parametrize(
    "payload, needle",
    [
        ({"dataframe_records": [{"tenure_months": 3}]}, "contract"),
        ({"dataframe_split": {"columns": ["tenure_months"], "data": [["ten"]]}}, "missing"),
        ({"dataframe_split": {"columns": ["a", "b"], "data": [[1]]}}, "data[0]"),
        ({"instances": [], "dataframe_records": []}, "exactly one"),
        ([1, 2, 3], "JSON object"),
    ],
)
def test_invocations_bad_input_is_a_400(served, payload, needle) -> None:  # type: ignore[no-untyped-def]
    _, dep = served
    code, body = call(f"{dep['url']}/invocations", payload)
    assert code == 400 and needle in body["error"]


def test_string_for_number_in_records_names_the_field(served, sample) -> None:  # type: ignore[no-untyped-def]
    _, dep = served
    features, rows = sample
    record = dict(zip(features, rows[0], strict=True))
    record["tenure_months"] = "twelve"
    code, body = call(f"{dep['url']}/invocations", {"dataframe_records": [record]})
    assert code == 400 and "tenure_months" in body["error"] and "twelve" in body["error"]


def test_protocol_errors(served) -> None:  # type: ignore[no-untyped-def]
    _, dep = served
    url = dep["url"]
    assert call(f"{url}/v2/models/churn/infer", raw=b"{not json")[0] == 400
    assert call(f"{url}/v2/models/other/infer", {"inputs": []})[0] == 404
    assert call(f"{url}/nowhere", method="GET")[0] == 404
    code, _ = call(f"{url}/invocations", raw=b"a,b\n1,2", headers={"Content-Type": "text/plain"})
    assert code == 415
    code, body = call(f"{url}/invocations", raw=b"a,b\n1,2", headers={"Content-Type": "text/csv"})
    assert code == 400 and "missing feature column" in body["error"]
    assert call(f"{url}/admin/reload", {})[0] == 404  # no admin endpoint: the CLI acts
    assert call(f"{url}/v2/models/churn/infer", method="GET")[0] == 405
    code, body = call(f"{url}/v2/models/churn/infer", raw=b"{}", headers={"Content-Type": "x/y"})
    assert code == 415 and "Content-Type" in body["error"]


def test_deploy_and_rollback_switch_versions_immediately(served, sample) -> None:  # type: ignore[no-untyped-def]
    app, dep = served
    inputs = v2_inputs(*sample)
    infer = f"{dep['url']}/v2/models/churn/infer"
    _, before = call(infer, {"inputs": inputs})
    deployments.deploy(app, NAME, "churn@2")
    _, after_deploy = call(infer, {"inputs": inputs})  # no sleep: the reload is synchronous
    assert (before["model_version"], after_deploy["model_version"]) == ("1", "2")
    rolled = deployments.rollback(app, NAME)
    _, after_rollback = call(infer, {"inputs": inputs})
    assert after_rollback["model_version"] == "1"
    assert after_rollback["outputs"] == before["outputs"]
    revisions = deployments.list_revisions(app, NAME)
    assert [(r["model_version"], r["action"]) for r in revisions] == [
        (1, "deploy"),
        (2, "deploy"),
        (1, "rollback"),
    ]
    assert rolled["current_revision"] == 3


def test_rollback_without_earlier_revision_is_refused(trained_home: Path) -> None:
    app = Appliance.open(trained_home)
    deployments.create_deployment(app, "single", "churn@1", start=False)
    before = deployments.list_revisions(app, "single")
    with pytest.raises(Conflict, match="no earlier revision"):
        deployments.rollback(app, "single")
    assert deployments.list_revisions(app, "single") == before
    app.close()


def _raw(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("POST", parts.path, skip_accept_encoding=True)
    for key, value in headers.items():
        conn.putheader(key, value.encode("utf-8"))
    conn.endheaders(body)
    response = conn.getresponse()
    payload = response.read().decode()
    conn.close()
    assert "Traceback" not in payload
    # The HTTP parser itself refuses a malformed request line or header, before any route.
    return response.status, json.loads(payload) if payload.startswith("{") else {"error": payload}


def test_hostile_requests_get_4xx_not_500(served, sample) -> None:  # type: ignore[no-untyped-def]
    _, dep = served
    infer = f"{dep['url']}/v2/models/churn/infer"
    inputs = v2_inputs(*sample)
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert call(infer, raw=deep)[0] == 400
    assert call(infer, raw=b'{"inputs": [' + b"9" * 5000 + b"]}")[0] == 400
    big = [
        {**t, "data": [10**400, *t["data"][1:]], "datatype": "INT64"}
        if t["name"] == "tenure_months"
        else t
        for t in inputs
    ]
    code, body = call(infer, {"inputs": big})
    assert code == 400 and "tenure_months" in body["error"]
    infinite = [
        {**t, "data": [float("inf"), *t["data"][1:]]} if t["name"] == "tenure_months" else t
        for t in inputs
    ]
    code, body = call(infer, {"inputs": infinite})  # json.dumps writes Infinity
    assert code == 400 and "out of range" in body["error"]
    long_version = f"{dep['url']}/v2/models/churn/versions/{'9' * 30}/infer"
    assert call(long_version, {"inputs": inputs})[0] == 404
    assert call(infer, {"inputs": [*inputs, inputs[0]]})[0] == 400  # duplicate tensor
    assert call(infer, {"inputs": [{**inputs[0], "shape": [True]}]})[0] == 400
    assert _raw(infer, b"{}", {"Content-Length": "\u00b2"})[0] == 400
    assert call(f"{dep['url']}/v2/health/ready", method="GET")[0] == 200  # still serving


def test_concurrent_starts_leave_one_server(trained_home: Path) -> None:
    import subprocess
    import sys

    app = Appliance.open(trained_home)
    deployments.create_deployment(app, "racer", "churn@1", start=False)
    command = [
        sys.executable,
        "-m",
        "appliance",
        "deployments",
        "start",
        "racer",
        "--home",
        str(trained_home),
        "--json",
    ]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    try:
        urls = {json.loads(p.communicate(timeout=120)[0])["url"] for p in procs}
        assert len(urls) == 1
        servers = subprocess.run(
            ["pgrep", "-f", "appliance.runner serve racer"], capture_output=True, text=True
        ).stdout.split()
        assert len(servers) == 1
    finally:
        deployments.stop_deployment(app, "racer")
        app.close()


def _post_raw(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("POST", parts.path, body=body, headers=headers)
        response = conn.getresponse()
        # HTTP header names are case-insensitive; uvicorn sends them in lower case
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _binary_inputs(features: list[str], rows: list[list[Any]]) -> tuple[list[dict], bytes]:
    """Per-feature tensors in the binary extension: FP64 little-endian, BYTES length-prefixed."""
    import struct

    tensors, chunks = [], []
    for j, name in enumerate(features):
        column = [r[j] for r in rows]
        if any(isinstance(v, str) for v in column):
            chunk = b"".join(
                struct.pack("<I", len(str(v).encode())) + str(v).encode() for v in column
            )
            datatype = "BYTES"
        else:
            chunk = struct.pack(f"<{len(column)}d", *map(float, column))
            datatype = "FP64"
        tensors.append(
            {
                "name": name,
                "shape": [len(rows)],
                "datatype": datatype,
                "parameters": {"binary_data_size": len(chunk)},
            }
        )
        chunks.append(chunk)
    return tensors, b"".join(chunks)


def test_v2_binary_tensor_extension_in_and_out(served, sample) -> None:  # type: ignore[no-untyped-def]
    import struct

    _, dep = served
    features, rows = sample
    url = f"{dep['url']}/v2/models/churn/infer"
    _, as_json = call(url, {"inputs": v2_inputs(features, rows)})
    expected = as_json["outputs"][0]["data"]

    tensors, tail = _binary_inputs(features, rows)
    header = json.dumps(
        {"inputs": tensors, "outputs": [{"name": "predict", "parameters": {"binary_data": True}}]}
    ).encode()
    status, headers, body = _post_raw(
        url,
        header + tail,
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    assert status == 200, body[:200]
    length = int(headers["inference-header-content-length"])
    meta = json.loads(body[:length])
    output = meta["outputs"][0]
    assert "data" not in output and output["parameters"]["binary_data_size"] == 8 * len(rows)
    values = struct.unpack(f"<{len(rows)}d", body[length:])
    assert list(values) == pytest.approx(expected)

    # A JSON-only header still gets JSON back; binary inputs and a JSON answer mix freely.
    plain = json.dumps({"inputs": tensors}).encode()
    status, _, body = _post_raw(
        url, plain + tail, {"Inference-Header-Content-Length": str(len(plain))}
    )
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == pytest.approx(expected)

    for bad_header, extra, needle in [
        (str(len(plain) + len(tail) + 1), b"", "larger than"),
        ("abc", b"", "byte count"),
        (str(len(plain)), b"\x00", "belong to no input"),
    ]:
        status, _, body = _post_raw(
            url, plain + tail + extra, {"Inference-Header-Content-Length": bad_header}
        )
        assert status == 400 and needle in json.loads(body)["error"], body
    short = json.dumps({"inputs": tensors}).encode()
    status, _, body = _post_raw(
        url, short + tail[:-3], {"Inference-Header-Content-Length": str(len(short))}
    )
    assert status == 400 and "runs past the body's end" in json.loads(body)["error"]


def test_invocations_instances_inputs_and_csv_agree(served, sample) -> None:  # type: ignore[no-untyped-def]
    _, dep = served
    features, rows = sample
    url = f"{dep['url']}/invocations"
    _, split = call(url, {"dataframe_split": {"columns": features, "data": rows}})
    expected = split["predictions"]
    records = [dict(zip(features, r, strict=True)) for r in rows]
    columns = {f: [r[j] for r in rows] for j, f in enumerate(features)}
    for payload in ({"instances": records}, {"instances": rows}, {"inputs": columns}):
        status, body = call(url, payload)
        assert status == 200 and body["predictions"] == pytest.approx(expected), payload
    csv_body = ",".join(features) + "\n" + "\n".join(",".join(map(str, r)) for r in rows)
    status, body = call(url, raw=csv_body.encode(), headers={"Content-Type": "text/csv"})
    assert status == 200 and body["predictions"] == pytest.approx(expected)
    status, body = call(url, {"instances": [records[0], rows[0]]})
    assert status == 400 and "all be objects or all be lists" in body["error"]
    status, body = call(url, raw=b"a,b\n1", headers={"Content-Type": "text/csv"})
    assert status == 400 and "CSV line 2" in body["error"]


def test_version_and_prometheus_metrics(served, sample) -> None:  # type: ignore[no-untyped-def]
    _, dep = served
    features, rows = sample
    status, version = call(f"{dep['url']}/version", method="GET")
    assert status == 200 and version["model"] == "churn" and version["version"]
    call(f"{dep['url']}/v2/models/churn/infer", {"inputs": v2_inputs(features, rows)})
    call(f"{dep['url']}/v2/models/churn/infer", {"inputs": "nope"})
    with urllib.request.urlopen(f"{dep['url']}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    served_version = str(call(f"{dep['url']}/version", method="GET")[1]["model_version"])
    labels = f'model="churn",version="{served_version}",role="stable"'
    ok = f'appliance_requests_total{{{labels},code="200"}}'
    bad = f'appliance_requests_total{{{labels},code="400"}}'
    assert ok in text and bad in text
    assert "# TYPE appliance_request_seconds histogram" in text
    # what the prediction log dropped is a counter too (its queue and spool are bounded)
    assert 'appliance_prediction_log_dropped_total{model="churn"} 0' in text
    # a refusal carries the client's request id back, as the log row it makes does
    for path, body, sent, back in (
        ("/v2/models/nope/infer", b"{}", "mine-1", "mine-1"),
        ("/v2/models/churn/infer", b"[", "mine-2", "mine-2"),
        ("/v2/models/churn/infer", b"[", "mine-3 ", None),  # no header value ends in a space
    ):
        request = urllib.request.Request(
            f"{dep['url']}{path}",
            body,
            {"Content-Type": "application/json", "X-Request-Id": sent},
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (400, 404)
        assert refused.value.headers["x-request-id"] == back, path
    # an id no header can carry (a newline, a space at an end) is answered all the same,
    # without the header
    for odd_id in ("two\nlines", "ends in a space "):
        odd = json.dumps({"id": odd_id, "inputs": v2_inputs(features, rows)}).encode()
        request = urllib.request.Request(
            f"{dep['url']}/v2/models/churn/infer", odd, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as answered:
            assert answered.status == 200 and answered.headers["x-request-id"] is None
            assert json.loads(answered.read())["id"] == odd_id
    assert 'le="+Inf"' in text and "appliance_request_seconds_count" in text


def test_types_are_checked_against_the_signature_and_the_datatype(served, sample) -> None:  # type: ignore[no-untyped-def]
    _, dep = served
    features, rows = sample
    infer = f"{dep['url']}/v2/models/churn/infer"
    category = next(f for j, f in enumerate(features) if isinstance(rows[0][j], str))
    numeric = next(f for j, f in enumerate(features) if not isinstance(rows[0][j], str))
    inputs = v2_inputs(features, rows)

    def replaced(name: str, **change: Any) -> list[dict[str, Any]]:
        return [{**t, **change} if t["name"] == name else t for t in inputs]

    cases = [
        (replaced(category, datatype="FP64", data=[1.5] * 4), f"feature {category!r} row 0"),
        (replaced(category, datatype="BYTES", data=[7] * 4), "datatype BYTES but element 0"),
        (replaced(numeric, datatype="INT8", data=[1000] * 4), "not a valid INT8"),
        (replaced(numeric, datatype="INT64", data=[1.5] * 4), "not a valid INT64"),
        (replaced(numeric, datatype="FP16", data=[1e6] * 4), "out of range for FP16"),
        (replaced(numeric, datatype="FP64", data=[True] * 4), "datatype FP64 but element 0"),
        (replaced(numeric, datatype="BOOL", data=[5] * 4), "not a valid BOOL"),
    ]
    for tensors, needle in cases:
        code, body = call(infer, {"inputs": tensors})
        assert code == 400 and needle in body["error"], (needle, body)
    # nested [N, 1] rows take the fast path; anything unusual in them falls back to the checks
    n = len(rows)
    assert call(infer, {"inputs": replaced(numeric, shape=[n, 1], data=[[3.0]] * n)})[0] == 200
    assert call(infer, {"inputs": replaced(numeric, shape=[n, 1], data=[[None]] * n)})[0] == 200
    ragged = [[1.0], [2.0, 3.0]] + [[1.0]] * (n - 2)
    code, body = call(infer, {"inputs": replaced(numeric, shape=[n, 1], data=ragged)})
    assert code == 400 and f"needs {n} values" in body["error"]
    code, body = call(infer, {"inputs": replaced(numeric, shape=[n, 1], data=[[True]] * n)})
    assert code == 400 and "element 0 is True" in body["error"]
    # one numeric [N, F] tensor for a model with category features: the categories are wrong
    matrix = [[0.0] * len(features) for _ in rows]
    tensor = {"name": "m", "shape": [len(rows), len(features)], "datatype": "FP64", "data": matrix}
    code, body = call(infer, {"inputs": [tensor]})
    assert code == 400 and "expected a category" in body["error"]
    # unseen levels are missing values (as LightGBM treats them), not errors
    assert call(infer, {"inputs": replaced(category, data=["never-seen"] * 4)})[0] == 200


def test_health_aliases_and_a_huge_csv_field(served) -> None:  # type: ignore[no-untyped-def]
    _, dep = served
    for path in ("/ping", "/health", "/v2/health/ready", "/v2/health/live"):
        assert call(dep["url"] + path, method="GET")[0] == 200, path
    huge = b"a,b\n" + b"x" * 200_000 + b",1\n"
    code, body = call(f"{dep['url']}/invocations", raw=huge, headers={"Content-Type": "text/csv"})
    assert code == 400 and "CSV body" in body["error"]
    # category columns keep their text in CSV: a number-like level is a level (here unseen)
    features, rows = sample_rows(1)
    category = next(f for j, f in enumerate(features) if isinstance(rows[0][j], str))
    row = [("02134" if f == category else str(v)) for f, v in zip(features, rows[0], strict=True)]
    csv_body = (",".join(features) + "\n" + ",".join(row) + "\n").encode()
    code, _ = call(f"{dep['url']}/invocations", raw=csv_body, headers={"Content-Type": "text/csv"})
    assert code == 200


def test_small_batches_predict_on_one_thread_with_the_same_numbers(trained_home: Path) -> None:
    """Up to SMALL_BATCH rows skip LightGBM's thread team; every row must come out exactly as
    the team gives it, at the limit, on either side of it and alone, and each call must take
    the branch its size calls for."""
    import lightgbm as lgb
    import numpy as np

    from appliance.core import inference, registry
    from appliance.core.inference import ModelRuntime

    app = Appliance.open(trained_home)
    try:
        mv = registry.get_model_version(app, "churn@1")
        model_file = str(app.objects.get_file(mv["sha256"]))
        runtime = ModelRuntime(mv, model_file)
        features, rows = sample_rows(3 * inference.SMALL_BATCH)
    finally:
        app.close()
    matrix = runtime.matrix({f: [r[j] for r in rows] for j, f in enumerate(features)})
    want = lgb.Booster(model_file=model_file).predict(matrix)  # the team, as before
    threads: list[tuple[int, Any]] = []
    predict = runtime.booster.predict

    def spy(data: Any, **kwargs: Any) -> Any:
        threads.append((len(data), kwargs.get("num_threads")))
        return predict(data, **kwargs)

    runtime.booster.predict = spy
    for n in (1, inference.SMALL_BATCH, inference.SMALL_BATCH + 1, len(matrix)):
        got = np.concatenate(
            [runtime.predict_matrix(matrix[i : i + n]) for i in range(0, len(matrix), n)]
        )
        assert got.tobytes() == want.tobytes(), n
    assert {t for _, t in threads} == {1, None}  # both branches were taken, each by its size
    assert all((t == 1) == (size <= inference.SMALL_BATCH) for size, t in threads)
