"""The Monitoring screen: per deployment, live traffic and latency sparklines, the drift
table with the worst features first, monitors, and alerts with the action each took.

Reads run in a thread worker every two seconds and post `MonitoringLoaded`; `d` computes
the drift of the last hour now (a worker too) and stores it. CLI twins: `monitor report`,
`monitor drift`, `monitor list`, `monitor alerts`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from appliance.core import deployments, drift, monitor_report, monitors
from appliance.core.context import Appliance
from appliance.core.prediction_log import behind_note
from appliance.core.times import clock
from appliance.errors import ApplianceError
from appliance.tui.sparkline import GapSparkline
from appliance.tui.tables import fill_table

REFRESH_SECONDS = 2.0
STATE_STYLE = {"ok": "green", "firing": "red", "no_data": "dim"}


class MonitoringLoaded(Message):
    def __init__(
        self, rows: list[dict[str, Any]], shown: dict[str, Any] | None, error: str | None = None
    ) -> None:
        super().__init__()
        self.rows, self.shown, self.error = rows, shown, error


class DriftComputed(Message):
    def __init__(
        self, what: str, error: str | None, name: str = "", note: str | None = None
    ) -> None:
        super().__init__()
        self.what, self.error = what, error
        self.name, self.note = name, note  # note: the logs that drift left out, if any


def _num(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class MonitoringScreen(Screen[None]):
    """Deployments on top; for the highlighted one, sparklines, drift, monitors, alerts."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("d", "drift", "Drift now"),
        Binding("r", "reload", "Refresh"),
    ]
    DEFAULT_CSS = """
    MonitoringScreen #monitoring-status { height: auto; max-height: 3; padding: 0 1;
                                          color: $text-muted; }
    MonitoringScreen #deployments { height: 1fr; }
    MonitoringScreen #sparks { height: 5; }
    MonitoringScreen #sparks > Vertical { width: 1fr; padding: 0 1; }
    MonitoringScreen #drift { height: 2fr; }
    MonitoringScreen #monitors { height: 1fr; }
    MonitoringScreen #alerts { height: 1fr; }
    """

    def __init__(self, ctx: Appliance) -> None:
        super().__init__()
        self.ctx = ctx
        self.rows: list[dict[str, Any]] = []
        self.selected: str | None = None
        self.left_out: dict[str, str | None] = {}  # per deployment, from its last drift
        self.shown: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("loading…", id="monitoring-status")
        yield DataTable(id="deployments", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="sparks"):
            with Vertical():
                yield Static("requests / min", id="requests-label")
                yield GapSparkline(id="requests-spark")
            with Vertical():
                yield Static("p99 ms / min", id="latency-label")
                yield GapSparkline(id="latency-spark")
        yield DataTable(id="drift", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="monitors", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="alerts", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "monitoring"
        self.reload()
        self.set_interval(REFRESH_SECONDS, self.reload)

    # ---- workers ------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="monitoring-refresh", exit_on_error=False)
    def reload(self) -> None:
        selected = self.selected
        try:
            rows = deployments.list_deployments(self.ctx)
            names = [r["name"] for r in rows]
            chosen = selected if selected in names else (names[0] if names else None)
            shown = None
            if chosen is not None:
                history = drift.drift_history(self.ctx, chosen, limit=1)
                shown = {
                    "name": chosen,
                    "series": monitor_report.traffic_series(self.ctx, chosen, 3600.0, 60.0),
                    "drift": history[0] if history else None,
                    "monitors": monitors.list_monitors(self.ctx, chosen),
                    "alerts": monitors.list_alerts(self.ctx, chosen, 50),
                }
        except ApplianceError as exc:
            self.post_message(MonitoringLoaded([], None, exc.message))
            return
        except Exception as exc:  # keep the screen alive; say what went wrong
            self.post_message(MonitoringLoaded([], None, f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(MonitoringLoaded(rows, shown))

    @work(thread=True, group="monitoring-drift", exit_on_error=False)
    def _compute_drift(self, name: str) -> None:
        try:
            report = drift.drift(self.ctx, name, 3600.0)
        except ApplianceError as exc:
            self.post_message(DriftComputed(f"drift of {name}", exc.message))
            return
        rows = sum(v["rows"] for v in report["versions"])
        note = behind_note(report.get("behind"))
        what = f"drift of {name} over {rows} logged rows" + (f"; {note}" if note else "")
        self.post_message(DriftComputed(what, None, name, note))

    # ---- handlers -----------------------------------------------------------------------
    @on(MonitoringLoaded)
    def _on_loaded(self, message: MonitoringLoaded) -> None:
        status = self.query_one("#monitoring-status", Static)
        if message.error:
            status.update(f"[red]error:[/red] {escape(message.error)}")
            return
        self.rows, self.shown = message.rows, message.shown
        if self.shown is not None:
            self.selected = self.shown["name"]
        self._show()

    @on(DriftComputed)
    def _on_drift(self, message: DriftComputed) -> None:
        status = self.query_one("#monitoring-status", Static)
        if message.error:
            status.update(f"[red]{escape(message.error)}[/red]")
            self.notify(message.error, severity="error")
        else:
            status.update(escape(message.what))
            self.notify(message.what)
            # kept beside the drift it qualifies until the next one (the status line is
            # rebuilt on every reload)
            self.left_out[message.name] = message.note
        self.reload()

    @on(DataTable.RowHighlighted, "#deployments")
    def _on_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        if key and key != self.selected:
            self.selected = key
            self.reload()

    # ---- rendering ----------------------------------------------------------------------
    def _show(self) -> None:
        deployments_table = self.query_one("#deployments", DataTable)
        with self.prevent(DataTable.RowHighlighted):
            fill_table(
                deployments_table,
                ("name", "version", "state", "rps", "p99_ms", "error_rate"),
                [
                    [
                        r["name"],
                        r["name"],
                        r["model_version"],
                        r["state"],
                        _num(r.get("rps")),
                        _num(r.get("p99_ms")),
                        _num(r.get("error_rate")),
                    ]
                    for r in self.rows
                ],
            )
            names = [r["name"] for r in self.rows]
            if self.selected in names:
                deployments_table.move_cursor(row=names.index(self.selected), animate=False)
        status = self.query_one("#monitoring-status", Static)
        shown = self.shown
        if shown is None:
            status.update("no deployments yet: appliance deploy MODEL@ALIAS --name NAME")
            return
        series = shown["series"]
        # every minute of the hour, a quiet one blank: an outage shows as a gap
        self.query_one("#requests-spark", GapSparkline).data = [s["requests"] for s in series]
        self.query_one("#latency-spark", GapSparkline).data = [s["p99_ms"] for s in series]
        last = series[-1] if series else None
        self.query_one("#requests-label", Static).update(
            f"requests / min (last {last['requests'] if last else 0})"
        )
        self.query_one("#latency-label", Static).update(
            f"p99 ms / min (last {_num(last['p99_ms']) if last else '-'})"
        )
        found = shown["drift"]
        features = found["features"] if found else []
        fill_table(
            self.query_one("#drift", DataTable),
            ("feature", "type", "psi", "test", "p_value", "missing", "unseen"),
            [
                [
                    f["feature"],
                    Text(f["feature"], style="bold red" if (f["psi"] or 0) > 0.2 else ""),
                    f["type"],
                    _num(f["psi"]),
                    _num(f.get("ks") if f["type"] == "numeric" else f.get("chi2")),
                    _num(f.get("p_value")),
                    f"{f['missing_ref']:.3f} → {f['missing']:.3f}",
                    Text(",".join(f.get("unseen") or [])),  # clients' values: never markup
                ]
                for f in features
            ],
        )
        fill_table(
            self.query_one("#monitors", DataTable),
            ("name", "rule", "state", "value", "checked", "action", "note"),
            [
                [
                    m["name"],
                    m["name"],
                    m["rule"],
                    Text(m["state"], style=STATE_STYLE.get(m["state"], "")),
                    _num(m["value"]),
                    clock(m["checked_at"], seconds=True),
                    m["action"],
                    Text(m["error"] or ""),  # the store's words: never markup
                ]
                for m in shown["monitors"]
            ],
        )
        fill_table(
            self.query_one("#alerts", DataTable),
            ("id", "monitor", "value", "fired", "resolved", "action taken"),
            [
                [
                    a["id"],
                    a["id"],
                    a["monitor"],
                    _num(a["value"]),
                    a["fired_at"],
                    a["resolved_at"] or "",
                    Text(a["action_result"] or ""),
                ]
                for a in shown["alerts"]
            ],
        )
        drift_note = (
            f"drift of version {found['version']} over {found['rows']} rows "
            f"(prediction PSI {_num(found['prediction_psi'])})"
            if found
            else "no drift computed yet: d computes it over the last hour"
        )
        firing = sum(1 for m in shown["monitors"] if m["state"] == "firing")
        left_out = self.left_out.get(shown["name"])
        status.update(
            f"{escape(shown['name'])}: {drift_note} · {len(shown['monitors'])} monitor(s), "
            f"{firing} firing · {len(shown['alerts'])} alert(s)"
            + (f"\n[yellow]last drift: {escape(left_out)}[/yellow]" if left_out else "")
        )

    # ---- actions ------------------------------------------------------------------------
    def action_reload(self) -> None:
        self.reload()

    def action_drift(self) -> None:
        if self.selected:
            self.query_one("#monitoring-status", Static).update("computing drift…")
            self._compute_drift(self.selected)
