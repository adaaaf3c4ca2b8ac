"""The feature server: online lookups over HTTP, in Feast's request and response shape.

`POST /get-online-features` takes `{"feature_service": NAME[@V], "entities": {key: [values]}}`
and answers like `get_online_features`; `GET /health`; `GET /metrics` (Prometheus: requests by
code, latency). An ASGI app on uvicorn, bound to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import time
from typing import Any

from appliance.core.context import Appliance
from appliance.core.serving import MAX_BODY, Receive, Send
from appliance.core.traffic import TrafficStats, merge, render_prometheus
from appliance.errors import ApplianceError, NotFound


def _dumps(payload: Any) -> bytes:
    import orjson

    return orjson.dumps(payload)


class FeatureServerApp:
    """The ASGI app; lookups are a few SQLite reads, answered inline on the event loop."""

    def __init__(self, app: Appliance, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.max_body = max_body
        self.stats = TrafficStats()

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes, str]:
        import orjson

        from appliance.core.online import get_online_features

        if method == "GET" and path == "/health":
            return 200, _dumps({"status": "ok"}), "application/json"
        if method == "GET" and path == "/metrics":
            text = render_prometheus("features", merge([{"traffic": self.stats.snapshot()}]))
            return 200, text.encode(), "text/plain; version=0.0.4"
        if path != "/get-online-features":
            return 404, _dumps({"error": f"no route for {method} {path[:200]}"}), "application/json"
        if method != "POST":
            return 405, _dumps({"error": "use POST"}), "application/json"
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return (
                400,
                _dumps({"error": f"request body is not valid JSON: {exc}"}),
                "application/json",
            )
        if not isinstance(request, dict) or not isinstance(request.get("feature_service"), str):
            message = 'expected {"feature_service": NAME, "entities": {key: [values]}}'
            return 400, _dumps({"error": message}), "application/json"
        try:
            answer = get_online_features(
                self.app, request["feature_service"], request.get("entities")
            )
        except NotFound as exc:
            return 404, _dumps({"error": exc.message}), "application/json"
        except ApplianceError as exc:
            return 400, _dumps({"error": exc.message}), "application/json"
        return 200, _dumps(answer), "application/json"

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_body:
                status, body, kind = (
                    413,
                    _dumps({"error": "request body too large"}),
                    "application/json",
                )
                break
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        else:
            status, body, kind = self.handle(scope["method"], scope["path"], b"".join(chunks))
        headers = [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        if scope["path"] == "/get-online-features":
            self.stats.observe(0, "lookup", status, time.perf_counter() - started)


def serve_features(app: Appliance, host: str = "127.0.0.1", port: int = 6566) -> None:
    """Run the feature server in the foreground until interrupted."""
    import gc

    import uvicorn

    from appliance.core.serving import uvicorn_http, uvicorn_loop

    server = FeatureServerApp(app)
    gc.freeze()  # what is loaded by now lives as long as the server: no collector passes over it
    uvicorn.run(
        server,
        host=host,
        port=port,
        loop=uvicorn_loop(),
        http=uvicorn_http(),
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
