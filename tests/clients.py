"""Small HTTP clients the serving tests share."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.core.quickstart import sample_rows


def predict(url: str, request_id: str | None = None, version: int | None = None) -> str:
    """The model version that answered one prediction."""
    features, rows = sample_rows(1)
    inputs = [
        {
            "name": f,
            "shape": [1],
            "datatype": "BYTES" if isinstance(v, str) else "FP64",
            "data": [v],
        }
        for f, v in zip(features, rows[0], strict=True)
    ]
    body: dict[str, Any] = {"inputs": inputs}
    if request_id is not None:
        body["id"] = request_id
    path = f"/v2/models/churn/versions/{version}/infer" if version else "/v2/models/churn/infer"
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["model_version"]


@contextmanager
def feature_server(home: Path) -> Iterator[str]:
    """`appliance features serve` on a free 127.0.0.1 port, ready; yields its URL, stops it."""
    import subprocess
    import sys
    import time
    import urllib.error

    from tests.conftest import free_port

    port = free_port()
    command = [sys.executable, "-m", "appliance", "features", "serve", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--home", str(home)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except (urllib.error.URLError, OSError):
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "the feature server did not start"
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)
