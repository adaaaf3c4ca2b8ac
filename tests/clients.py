"""Small HTTP clients the serving tests share."""

from __future__ import annotations

import json
import urllib.request
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
