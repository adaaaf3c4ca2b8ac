"""A deployment's monitoring report: per-version traffic, latency percentiles and errors from
the request log, the drift table, live quality over time and the alerts; as text for the
terminal or one self-contained HTML page (inline SVG plots, no network resources)."""

from __future__ import annotations

import html
import math
import os
import time
from pathlib import Path
from typing import Any

from appliance.core.context import Appliance
from appliance.core.prediction_log import behind_note
from appliance.core.times import clock
from appliance.core.traffic import ROUTED, UNROUTED, dropped_note
from appliance.errors import ApplianceError, InvalidInput


def build_report(app: Appliance, deployment: str, window: float = 3600.0) -> dict[str, Any]:
    """Everything the report shows, as data (`--json` prints it)."""
    import duckdb

    from appliance.core import duck
    from appliance.core.deployments import get_deployment, traffic
    from appliance.core.drift import drift
    from appliance.core.feedback import quality
    from appliance.core.monitors import list_alerts, list_monitors
    from appliance.core.prediction_log import (
        LOG_KINDS,
        log_files,
        ship_for_reading,
        wait_for_open_logs,
        waiting_logs,
    )

    dep = get_deployment(app, deployment)
    live = traffic(app, deployment) if dep["status"] == "serving" else None
    behind = ship_for_reading(app, deployment, LOG_KINDS)
    now = time.time()
    start = now - window
    if not log_files(app, deployment, "requests", start, now):
        # requests answered moments ago, in a worker's open file or one closed since the
        # look above: one look more
        wait_for_open_logs(app, deployment)
        behind = ship_for_reading(app, deployment, LOG_KINDS)
        now = time.time()
        start = now - window
    report: dict[str, Any] = {
        "deployment": deployment,
        "model": dep["model"],
        "revision": dep["current_revision"],
        "version": dep["model_version"],
        "status": dep["status"],
        "generated_at": now,
        "behind": behind,
        "window_s": window,
        "versions": [],
        "series": [],
        "live": live["all"] if live else None,
        # what the running workers' logs dropped: the request counts below leave it out
        "log": live["log"] if live else None,
    }
    files = log_files(app, deployment, "requests", start, now)
    if files:
        listing = ", ".join(duck.sql_string(f) for f in files)
        source = f"read_parquet([{listing}], union_by_name = true)"
        inside = f"ts >= {start!r} AND ts < {now!r}"
        con = duckdb.connect()
        try:
            for row in con.execute(
                "SELECT version, count(*), count(*) FILTER (WHERE status >= 500), "
                "count(*) FILTER (WHERE status >= 400 AND status < 500), "
                "quantile_cont(latency_ms, 0.5), quantile_cont(latency_ms, 0.9), "
                "quantile_cont(latency_ms, 0.99), sum(rows) "
                f"FROM {source} WHERE {inside} GROUP BY 1 ORDER BY 1"
            ).fetchall():
                version, n, errors, refused, p50, p90, p99, rows = row
                report["versions"].append(
                    {
                        "version": version,
                        "requests": n,
                        "rps": n / window,
                        "rows": int(rows or 0),
                        "error_rate": errors / n,
                        "client_error_rate": refused / n,
                        "p50_ms": p50,
                        "p90_ms": p90,
                        "p99_ms": p99,
                    }
                )
        finally:
            con.close()
        report["series"] = traffic_series(app, deployment, window, max(60.0, window / 60))
    try:
        inputs = behind and waiting_logs(app, deployment, ("inputs",), behind["why"])
        report["drift"] = drift(app, deployment, window, now, fresh=False, behind=inputs)
    except ApplianceError as exc:
        report["drift"] = None
        report["drift_note"] = exc.message
    report["quality"] = quality(app, deployment, window=window, fresh=False)
    report["monitors"] = list_monitors(app, deployment)
    report["alerts"] = list_alerts(app, deployment, 20)
    return report


def traffic_series(
    app: Appliance, deployment: str, window: float = 3600.0, step: float = 60.0
) -> list[dict[str, Any]]:
    """Requests, p99 latency and errors per `step` seconds over the window, from the
    request log (the Monitoring screen's sparklines, the report's plots): every interval
    of the window, a quiet one as 0 requests and no p99, so that a chart drawn point by
    point shows an outage as one rather than closing the gap; [] when nothing is logged."""
    import duckdb

    from appliance.core import duck
    from appliance.core.prediction_log import log_files

    now = time.time()
    files = log_files(app, deployment, "requests", now - window, now)
    if not files:
        return []
    listing = ", ".join(duck.sql_string(f) for f in files)
    # the window's intervals up to this one: rows a clock stepped back put ahead of now wait
    # (math.floor of the quotient, as DuckDB floors it: `//` can differ by one at a bound)
    first, last = math.floor((now - window) / step), math.floor(now / step)
    con = duckdb.connect(config={"threads": 1})
    try:
        rows = con.execute(
            f"SELECT CAST(floor(ts / {step!r}) AS BIGINT) AS k, count(*), "
            f"quantile_cont(latency_ms, 0.99) FILTER (WHERE {ROUTED}), "
            "count(*) FILTER (WHERE status >= 500) "
            f"FROM read_parquet([{listing}], union_by_name = true) "
            f"WHERE ts >= {now - window!r} AND ts < {(last + 1) * step!r} GROUP BY 1 ORDER BY 1"
        ).fetchall()
    finally:
        con.close()
    if not rows:
        return []
    found = {k: (n, p99, e) for k, n, p99, e in rows}
    series = []
    for k in range(first, last + 1):
        n, p99, e = found.get(k, (0, None, 0))
        series.append({"t": k * step, "requests": n, "p99_ms": p99, "errors": e})
    return series


def _by_version(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Traffic rows as shown: version 0 holds the requests refused before a version was
    chosen (a malformed body, no model loaded)."""
    return [{**row, "version": row["version"] or UNROUTED[1]} for row in rows]


def _span(seconds: float) -> str:
    """A window as people write one: 1 h, 1.5 min, 30 s (not 0.000277778 h)."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    if not rows:
        return ["  (none)"]
    cells = [[_num(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  " + "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += [
        "  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells
    ]
    return lines


def render_text(report: dict[str, Any]) -> str:
    """The report for a terminal."""
    out = [
        f"deployment {report['deployment']}: {report['model']}@{report['version']} "
        f"(revision {report['revision']}, {report['status']}), last "
        f"{_span(report['window_s'])}",
        *(
            [f"note: {note}; the figures below leave them out"]
            if (note := behind_note(report.get("behind")))
            else []
        ),
        "",
        "traffic by version (from the request log)",
        *_table(
            _by_version(report["versions"]),
            ["version", "requests", "rps", "error_rate", "p50_ms", "p90_ms", "p99_ms"],
        ),
        *([f"note: {note}"] if (note := dropped_note(report.get("log"))) else []),
        "",
    ]
    drift = report.get("drift")
    if drift is None:
        out.append(f"drift: {report.get('drift_note', 'no data')}")
    else:
        for item in drift["versions"]:
            out.append(
                f"drift of version {item['version']} against {item['reference']} "
                f"({item['rows']} rows)"
            )
            out += _table(item["features"], ["feature", "type", "psi", "ks", "chi2", "missing"])
            out.append(f"  prediction psi {_num(item['prediction'].get('psi'))}")
    out.append("")
    quality = report["quality"]
    out.append(f"quality ({quality['labels']} labels, {quality.get('matched', 0)} matched)")
    out += _table(
        [{**w, "window": clock(w["window_start"])} for w in quality["windows"]],
        ["version", "window", "labelled", "auc", "accuracy", "rmse"],
    )
    out.append("")
    out.append("alerts")
    out += _table(
        report["alerts"],
        ["monitor", "rule", "value", "fired_at", "resolved_at", "action_result"],
    )
    return "\n".join(out)


def _svg_line(points: list[tuple[float, float | None]], title: str, unit: str = "") -> str:
    """A small line chart as inline SVG (no scripts, no fonts fetched); the line breaks
    where a value is None (an interval with nothing to measure)."""
    width, height, pad = 560, 160, 32
    valued = [(x, y) for x, y in points if y is not None]
    if not valued:
        return f"<p><em>{html.escape(title)}: no data</em></p>"
    xs = [p[0] for p in points]
    ys = [p[1] for p in valued]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > 0 else 1.0

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y: float) -> float:
        return height - pad - (y - y0) / (y1 - y0 or 1) * (height - 2 * pad)

    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((x, y))
    lines = "".join(
        '<polyline fill="none" stroke="#2563eb" stroke-width="2" points="'
        + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in run)
        + '"/>'
        for run in runs
        if run
    )
    # a line needs two points: a few points, or a point alone between gaps, is also a dot
    dots = "".join(
        f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="#2563eb"/>'
        for run in runs
        for x, y in run
        if len(valued) <= 60 or len(run) == 1
    )
    return (
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa"/>'
        f"{lines}{dots}"
        f'<text x="4" y="14" font-size="11">{_num(y1)}{html.escape(unit)}</text>'
        f'<text x="4" y="{height - 4}" font-size="11">{clock(x0)} – {clock(x1)}</text>'
        "</svg></figure>"
    )


def _html_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_num(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any], path: str | Path) -> Path:
    """One self-contained page: styles inline, plots as SVG, nothing loaded from a network."""
    series = report["series"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(report['deployment'])} monitoring</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:2px 8px;text-align:right}th{background:#eee}figure{margin:1em 0}</style>",
        "</head><body>",
        f"<h1>{html.escape(report['deployment'])}: {html.escape(report['model'])}@"
        f"{report['version']}</h1>",
        f"<p>revision {report['revision']}, {html.escape(report['status'])}; last "
        f"{_span(report['window_s'])}, generated {clock(report['generated_at'])}</p>",
        *(
            [f"<p><strong>Note:</strong> {html.escape(note)}; the figures below leave them out</p>"]
            if (note := behind_note(report.get("behind")))
            else []
        ),
        "<h2>Traffic</h2>",
        _html_table(
            _by_version(report["versions"]),
            ["version", "requests", "rps", "error_rate", "p50_ms", "p90_ms", "p99_ms"],
        ),
        *(
            [f"<p><strong>Note:</strong> {html.escape(note)}</p>"]
            if (note := dropped_note(report.get("log")))
            else []
        ),
        _svg_line([(s["t"], s["requests"]) for s in series], "requests per interval"),
        _svg_line([(s["t"], s["p99_ms"]) for s in series], "p99 latency", " ms"),
        "<h2>Drift</h2>",
    ]
    drift = report.get("drift")
    if drift is None:
        parts.append(f"<p>{html.escape(report.get('drift_note', 'no data'))}</p>")
    else:
        for item in drift["versions"]:
            parts.append(
                f"<h3>version {item['version']} against {html.escape(item['reference'])}</h3>"
            )
            parts.append(
                _html_table(
                    item["features"],
                    ["feature", "type", "psi", "ks", "chi2", "p_value", "missing_ref", "missing"],
                )
            )
            parts.append(f"<p>prediction PSI {_num(item['prediction'].get('psi'))}</p>")
    quality = report["quality"]
    parts.append("<h2>Quality</h2>")
    parts.append(
        f"<p>{quality['labels']} labels, {quality.get('matched', 0)} matched to predictions</p>"
    )
    windows = quality["windows"]
    metric = next((m for m in ("auc", "accuracy", "rmse") if any(m in w for w in windows)), None)
    if metric:  # a chart per version: one line through two versions' windows means nothing
        for version in sorted({w["version"] for w in windows if metric in w}):
            points = [
                (w["window_start"], w[metric])
                for w in windows
                if w["version"] == version and metric in w
            ]
            parts.append(_svg_line(points, f"{metric}, version {version}"))
    parts.append(
        _html_table(
            [{**w, "window": clock(w["window_start"])} for w in windows],
            ["version", "window", "labelled", "auc", "accuracy", "rmse"],
        )
    )
    parts.append("<h2>Alerts</h2>")
    parts.append(
        _html_table(
            report["alerts"],
            ["monitor", "rule", "value", "fired_at", "resolved_at", "action_result"],
        )
    )
    parts.append("</body></html>")
    target = Path(path)
    if target.is_dir():
        raise InvalidInput(f"--html {path}: a directory; name the file to write")
    if not target.parent.is_dir():
        raise InvalidInput(f"--html {path}: no directory {target.parent}")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:  # the whole page or nothing: an earlier report at the path stays until then
        tmp.write_text("".join(parts), encoding="utf-8")
        tmp.replace(target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InvalidInput(f"--html {path}: cannot write it: {exc.strerror or exc}") from None
    return target
