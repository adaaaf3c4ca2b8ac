"""A small closed-loop HTTP/1.1 load generator: N keep-alive connections, each sending the next
request as soon as the previous answer is read (wrk's model), over asyncio.

It is used by the serving benchmark and by the load test; it talks to 127.0.0.1 only. A status
other than 200 or a dropped connection counts as a failure (the first few are kept in `errors`).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    requests: int = 0
    failures: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def http_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """One POST as raw bytes, built once and sent many times."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {"Content-Type": "application/json"}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _connection(
    port: int,
    request: Callable[[], bytes],
    stop: Callable[[], bool],
    result: LoadResult,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while not stop():
            payload = request()
            started = time.perf_counter()
            writer.write(payload)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                match = re.search(rb"(?i)content-length:\s*(\d+)", head)
                body = await reader.readexactly(int(match.group(1)) if match else 0)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
                result.failures += 1
                result.errors.append(f"connection: {exc!r}")
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            elapsed = time.perf_counter() - started
            result.requests += 1
            result.latencies.append(elapsed)
            if status != 200:
                result.failures += 1
                if len(result.errors) < 20:
                    result.errors.append(f"{status}: {body[:200]!r}")
    finally:
        writer.close()


async def _run(
    port: int,
    request: Callable[[], bytes],
    connections: int,
    seconds: float,
    during: Callable[[], None] | None,
) -> LoadResult:
    result = LoadResult()
    deadline = time.perf_counter() + seconds
    done = {"flag": False}

    def stop() -> bool:
        return done["flag"] or time.perf_counter() >= deadline

    started = time.perf_counter()
    tasks = [
        asyncio.create_task(_connection(port, request, stop, result)) for _ in range(connections)
    ]
    if during is not None:  # e.g. deploy/rollback cycles, run in a thread beside the load
        await asyncio.to_thread(during)
        done["flag"] = True
    await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - started
    return result


def run_load(
    port: int,
    request: bytes | Callable[[], bytes],
    connections: int = 8,
    seconds: float = 10.0,
    during: Callable[[], None] | None = None,
) -> LoadResult:
    """Closed-loop load on 127.0.0.1:port for `seconds` (or until `during` returns)."""
    make = (lambda: request) if isinstance(request, bytes) else request
    try:
        import uvloop

        return uvloop.run(_run(port, make, connections, seconds, during))
    except ImportError:
        return asyncio.run(_run(port, make, connections, seconds, during))
