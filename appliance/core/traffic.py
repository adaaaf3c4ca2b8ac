"""Traffic: what a deployment's servers answered, per model version, and the rules judged on it.

Each worker process counts its own requests (cumulative counters for Prometheus, and one bucket
per second for the recent window) and writes a snapshot file every second; whoever needs the
deployment's picture (`deployments list`, the TUI, /metrics, the canary judge) merges the
snapshots. Latency is kept as a histogram, so p99 over any window and over any number of
workers is one merge away, at a few array increments per request.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Upper bounds in seconds; a last, open bucket catches the rest.
BOUNDS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
KEEP_SECONDS = 60  # per-second buckets kept when no canary rule asks for a longer window
# counted, but answered before any model version was chosen: in the counts and error rates,
# not in the latency percentiles (a flood of refusals must not hide a slow model)
UNROUTED = (0, "unrouted")
ROUTED = f"role <> '{UNROUTED[1]}'"  # the request log's answered requests, in SQL
LIVE_WINDOW = 10  # seconds behind the req/s, p99 and error rate that list and the TUI show


class Series:
    """One model version's traffic in one role (stable, canary or pinned by the request)."""

    __slots__ = ("codes", "hist", "total_seconds", "seconds")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.hist = [0] * (len(BOUNDS) + 1)
        self.total_seconds = 0.0
        # second -> [requests, server errors (5xx), client errors (4xx), *histogram]
        self.seconds: dict[int, list[int]] = {}


class TrafficStats:
    """A worker's counters; `observe` is on every request's path, so it stays a few lookups."""

    def __init__(self, keep_seconds: int = KEEP_SECONDS) -> None:
        self.lock = threading.Lock()
        self.keep_seconds = keep_seconds
        self.series: dict[tuple[int, str], Series] = {}

    def observe(self, version: int, role: str, status: int, seconds: float) -> None:
        bucket = bisect.bisect_left(BOUNDS, seconds)
        now = int(time.time())
        server_error = 1 if status >= 500 else 0
        client_error = 1 if 400 <= status < 500 else 0
        with self.lock:
            series = self.series.get((version, role))
            if series is None:
                series = self.series[(version, role)] = Series()
            series.codes[status] = series.codes.get(status, 0) + 1
            series.hist[bucket] += 1
            series.total_seconds += seconds
            second = series.seconds.get(now)
            if second is None:
                second = series.seconds[now] = [0, 0, 0] + [0] * (len(BOUNDS) + 1)
                for old in [s for s in series.seconds if s <= now - self.keep_seconds]:
                    del series.seconds[old]
            second[0] += 1
            second[1] += server_error
            second[2] += client_error
            second[3 + bucket] += 1

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy: {"series": [{version, role, codes, hist, sum, seconds}]}."""
        with self.lock:
            return {
                "series": [
                    {
                        "version": version,
                        "role": role,
                        "codes": {str(k): v for k, v in s.codes.items()},
                        "hist": list(s.hist),
                        "sum": s.total_seconds,
                        "seconds": {str(k): list(v) for k, v in s.seconds.items()},
                    }
                    for (version, role), s in self.series.items()
                ]
            }


def write_snapshot(path: Path, payload: dict[str, Any]) -> None:
    """Write-to-temp-then-rename: a reader never sees half a snapshot."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, separators=(",", ":")))
    os.replace(tmp, path)


def read_snapshots(directory: Path) -> list[dict[str, Any]]:
    """Every worker's latest snapshot in `directory` (a file vanishing mid-read is skipped)."""
    out = []
    for path in sorted(directory.glob("worker-*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def merge(snapshots: Iterable[dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any]]:
    """Sum the workers' series: (version, role) -> codes, hist, sum, seconds."""
    merged: dict[tuple[int, str], dict[str, Any]] = {}
    for snap in snapshots:
        for s in (snap.get("traffic") or {}).get("series", []):
            key = (int(s["version"]), str(s["role"]))
            into = merged.setdefault(
                key, {"codes": {}, "hist": [0] * (len(BOUNDS) + 1), "sum": 0.0, "seconds": {}}
            )
            for code, n in s["codes"].items():
                into["codes"][code] = into["codes"].get(code, 0) + n
            into["hist"] = [a + b for a, b in zip(into["hist"], s["hist"], strict=True)]
            into["sum"] += s["sum"]
            for second, counts in s["seconds"].items():
                have = into["seconds"].get(second)
                into["seconds"][second] = (
                    list(counts)
                    if have is None
                    else [a + b for a, b in zip(have, counts, strict=True)]
                )
    return merged


def quantile(hist: list[int], q: float) -> float | None:
    """The q-quantile in seconds from histogram counts, interpolated within its bucket."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        if n and seen + n >= rank:
            low = BOUNDS[i - 1] if i > 0 else 0.0
            high = BOUNDS[i] if i < len(BOUNDS) else BOUNDS[-1] * 2
            return low + (high - low) * ((rank - seen) / n)
        seen += n
    return BOUNDS[-1] * 2


@dataclass
class Window:
    """Traffic over the last `seconds`: what list, the TUI and canary rules look at."""

    requests: int = 0
    errors: int = 0  # 5xx: the server or the model failed
    client_errors: int = 0  # 4xx: refused input (a canary with another signature shows here)
    seconds: float = LIVE_WINDOW
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def client_error_rate(self) -> float:
        return self.client_errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "rps": round(self.rps, 1),
            "error_rate": round(self.error_rate, 4),
            "client_error_rate": round(self.client_error_rate, 4),
            "p50_ms": None if self.p50_ms is None else round(self.p50_ms, 2),
            "p99_ms": None if self.p99_ms is None else round(self.p99_ms, 2),
        }


def window(
    merged: dict[tuple[int, str], dict[str, Any]],
    seconds: float = LIVE_WINDOW,
    role: str | None = None,
    version: int | None = None,
    now: float | None = None,
    since: float | None = None,
) -> Window:
    """Requests, errors and latency of the complete seconds in the window (the current,
    still-filling second is left out, so a rate does not dip at each second's start), and
    none before `since` (a canary is judged on its own traffic only)."""
    end = int(now if now is not None else time.time())
    start = end - int(seconds)
    if since is not None:
        start = max(start, int(since))
    hist = [0] * (len(BOUNDS) + 1)
    out = Window(seconds=seconds)
    for (v, r), series in merged.items():
        if (role is not None and r != role) or (version is not None and v != version):
            continue
        for second, counts in series["seconds"].items():
            if start <= int(second) < end:
                out.requests += counts[0]
                out.errors += counts[1]
                out.client_errors += counts[2]
                if r != UNROUTED[1]:
                    hist = [a + b for a, b in zip(hist, counts[3:], strict=True)]
    p50, p99 = quantile(hist, 0.5), quantile(hist, 0.99)
    out.p50_ms = None if p50 is None else p50 * 1000
    out.p99_ms = None if p99 is None else p99 * 1000
    return out


def log_counters(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The workers' prediction logs summed, since each started: requests logged and not yet
    written (`queued`), samples `dropped` (a full queue or spool, a value that cannot be
    encoded) and `written`; `error`: the first reason a worker gave for dropping."""
    total: dict[str, Any] = {"queued": 0, "dropped": 0, "written": 0, "error": None}
    for snap in snapshots:
        log = snap.get("log") or {}
        for key in ("queued", "dropped", "written"):
            total[key] += int(log.get(key) or 0)
        total["error"] = total["error"] or log.get("error")
    return total


def dropped_note(log: dict[str, Any] | None) -> str | None:
    """What the workers' prediction logs dropped, in words; None when nothing was."""
    if not log or not log.get("dropped"):
        return None
    why = f" (the first reason a worker gave: {log['error']})" if log.get("error") else ""
    return (
        f"the running workers' prediction logs dropped {log['dropped']} samples since they "
        f"started{why}; the request log leaves them out"
    )


def render_prometheus(
    model: str,
    merged: dict[tuple[int, str], dict[str, Any]],
    log: dict[str, Any] | None = None,
) -> str:
    """Prometheus text format: requests by version, role and code; latency histograms; and,
    for a model server, what its prediction log dropped and wrote."""
    lines = [
        "# HELP appliance_requests_total Prediction requests by model version, role and code.",
        "# TYPE appliance_requests_total counter",
    ]
    for (version, role), s in sorted(merged.items()):
        for code, n in sorted(s["codes"].items()):
            labels = f'model="{model}",version="{version or ""}",role="{role}",code="{code}"'
            lines.append(f"appliance_requests_total{{{labels}}} {n}")
    lines += [
        "# HELP appliance_request_seconds Prediction latency by model version and role.",
        "# TYPE appliance_request_seconds histogram",
    ]
    for (version, role), s in sorted(merged.items()):
        base = f'model="{model}",version="{version or ""}",role="{role}"'
        cumulative = 0
        for bound, n in zip(BOUNDS, s["hist"], strict=False):
            cumulative += n
            lines.append(f'appliance_request_seconds_bucket{{{base},le="{bound}"}} {cumulative}')
        count = sum(s["hist"])
        lines.append(f'appliance_request_seconds_bucket{{{base},le="+Inf"}} {count}')
        lines.append(f"appliance_request_seconds_sum{{{base}}} {s['sum']:.6f}")
        lines.append(f"appliance_request_seconds_count{{{base}}} {count}")
    if log is not None:
        for key, what in (
            ("dropped", "Samples the prediction log dropped, never requests."),
            ("written", "Requests the prediction log wrote to its spool."),
        ):
            lines += [
                f"# HELP appliance_prediction_log_{key}_total {what}",
                f"# TYPE appliance_prediction_log_{key}_total counter",
                f'appliance_prediction_log_{key}_total{{model="{model}"}} {int(log[key])}',
            ]
    return "\n".join(lines) + "\n"


_TERM = re.compile(
    r"^\s*(error_rate|client_error_rate|p99_ms|p50_ms)\s*(>=|>)\s*([0-9]+(?:\.[0-9]+)?)\s*$"
)
MIN_REQUESTS = 10  # fewer canary requests in the window than this: too few to judge


@dataclass(frozen=True)
class Rule:
    """`error_rate > 0.01 or p99_ms > 50`: the canary is rolled back when any term holds."""

    text: str
    terms: tuple[tuple[str, str, float], ...]

    def breach(self, stats: Window) -> str | None:
        """Why the canary breaks the rule over this window, or None."""
        if stats.requests < MIN_REQUESTS:
            return None
        for metric, op, limit in self.terms:
            value = getattr(stats, metric)
            if value is None:
                continue
            if value > limit or (op == ">=" and value == limit):
                return (
                    f"{metric} {value:.4g} {op} {limit:g} over {stats.seconds:g}s "
                    f"({stats.requests} canary requests, {stats.errors} 5xx, "
                    f"{stats.client_errors} 4xx)"
                )
        return None


def parse_rule(text: str, field: str = "--auto-rollback") -> Rule:
    """Parse a rule: terms `METRIC > NUMBER` joined by `or` (metrics: error_rate for 5xx,
    client_error_rate for 4xx, p99_ms, p50_ms)."""
    from appliance.errors import InvalidInput

    terms = []
    for part in re.split(r"\s+or\s+", text.strip()):
        match = _TERM.match(part)
        if match is None:
            raise InvalidInput(
                f"{field}: cannot read {part.strip()!r}; write terms like 'error_rate > 0.01' "
                "or 'p99_ms > 50' (metrics: error_rate, client_error_rate, p99_ms, p50_ms) "
                "joined by 'or'"
            )
        terms.append((match.group(1), match.group(2), float(match.group(3))))
    return Rule(text.strip(), tuple(terms))
