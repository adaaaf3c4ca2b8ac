"""The Deployments screen: each deployment's state and live traffic, its revisions, and the
canary split; rollback, promote and abort after a confirmation.

Reads and actions run in thread workers that post past-tense messages; only handlers touch
widgets. CLI twins: `deployments list`, `deployments history`, `deployments traffic`,
`deployments rollback|promote|abort`.
"""

from __future__ import annotations

from collections.abc import Callable
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

from appliance.core import deployments
from appliance.core.context import Appliance
from appliance.errors import ApplianceError
from appliance.tui.jobs import ConfirmScreen, show_outcome

REFRESH_SECONDS = 2.0


class DeploymentsLoaded(Message):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__()
        self.rows = rows


class DeploymentLoaded(Message):
    """One deployment's record, revisions and live traffic (stable and canary apart)."""

    def __init__(
        self, dep: dict[str, Any], revisions: list[dict[str, Any]], traffic: dict[str, Any]
    ) -> None:
        super().__init__()
        self.dep, self.revisions, self.traffic = dep, revisions, traffic


class ActionFinished(Message):
    def __init__(self, what: str, error: str | None) -> None:
        super().__init__()
        self.what, self.error = what, error


def _num(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


class DeploymentsScreen(Screen[None]):
    """Deployments on top; the highlighted one's traffic and revision history below."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("b", "rollback", "Rollback"),
        Binding("p", "promote", "Promote canary"),
        Binding("a", "abort", "Abort canary"),
        Binding("r", "reload", "Refresh"),
    ]
    DEFAULT_CSS = """
    DeploymentsScreen #deployments { height: 1fr; }
    DeploymentsScreen #detail { height: 2fr; }
    DeploymentsScreen #traffic { height: 6; border: round $panel; padding: 0 1; }
    DeploymentsScreen #revisions { height: 1fr; }
    DeploymentsScreen #deployments-status { height: 1; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, ctx: Appliance) -> None:
        super().__init__()
        self.ctx = ctx
        self.name_shown: str | None = None
        self.dep: dict[str, Any] | None = None
        self.revisions: list[dict[str, Any]] = []
        self.traffic: dict[str, Any] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("loading…", id="deployments-status")
        yield DataTable(id="deployments", cursor_type="row", zebra_stripes=True)
        with Vertical(id="detail"):
            yield Static("", id="traffic")
            with Horizontal():
                yield DataTable(id="revisions", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "deployments"
        self.query_one("#deployments", DataTable).add_columns(
            "NAME", "STATE", "REV", "VERSION", "CANARY", "PORT", "REQ/S", "P99 MS", "ERRORS"
        )
        self.query_one("#revisions", DataTable).add_columns(
            "REV", "VERSION", "ACTION", "OUTCOME", "WHY", "WHO", "WHEN"
        )
        self.reload()
        self.set_interval(REFRESH_SECONDS, self.reload)

    # ---- workers: store reads and actions, off the UI thread --------------------------------
    @work(thread=True, exclusive=True, group="deployments", exit_on_error=False)
    def reload(self) -> None:
        try:
            rows = deployments.list_deployments(self.ctx)
        except ApplianceError as exc:
            self.post_message(ActionFinished("refresh", exc.message))
            return
        self.post_message(DeploymentsLoaded(rows))
        name = self.name_shown or (rows[0]["name"] if rows else None)
        if name is not None:
            self._load(name)

    def _load(self, name: str) -> None:
        try:
            dep = deployments.get_deployment(self.ctx, name)
            revisions = deployments.list_revisions(self.ctx, name)
            traffic = deployments.traffic(self.ctx, name) if dep["status"] == "serving" else {}
        except ApplianceError as exc:
            self.post_message(ActionFinished("refresh", exc.message))
            return
        self.post_message(DeploymentLoaded(dep, revisions, traffic))

    @work(thread=True, exclusive=True, group="deployment", exit_on_error=False)
    def load_deployment(self, name: str) -> None:
        self._load(name)

    @work(thread=True, group="act", exit_on_error=False)
    def _act(self, what: str, action: Callable[[], Any]) -> None:
        try:
            action()
        except ApplianceError as exc:
            self.post_message(ActionFinished(what, exc.message))
            return
        self.post_message(ActionFinished(what, None))

    # ---- handlers: the only code that touches widgets ---------------------------------------
    @on(DeploymentsLoaded)
    def _on_list(self, message: DeploymentsLoaded) -> None:
        table = self.query_one("#deployments", DataTable)
        keys = [r["name"] for r in message.rows]
        with self.prevent(DataTable.RowHighlighted), table.prevent(DataTable.RowHighlighted):
            table.clear()
            for r in message.rows:
                state = Text(r["state"], style="green" if r["state"] == "serving" else "dim")
                table.add_row(
                    r["name"],
                    state,
                    str(r["revision"]),
                    str(r["model_version"]),
                    r["canary"] or "",
                    "" if r["port"] is None else str(r["port"]),
                    _num(r["rps"], ",.1f"),
                    _num(r["p99_ms"], ".2f"),
                    _num(r["error_rate"], ".2%"),
                    key=r["name"],
                )
            if self.name_shown in keys:
                table.move_cursor(row=keys.index(self.name_shown), animate=False)
        if self.name_shown is None and keys:
            self.name_shown = keys[0]
        self.query_one("#deployments-status", Static).update(
            f"{len(keys)} deployments   b rollback · p promote canary · a abort canary · "
            "r refresh · esc back"
        )

    @on(DeploymentLoaded)
    def _on_detail(self, message: DeploymentLoaded) -> None:
        if message.dep["name"] != self.name_shown:
            return
        self.dep, self.revisions, self.traffic = message.dep, message.revisions, message.traffic
        dep = message.dep
        lines = [
            f"[b]{escape(dep['name'])}[/b]  {escape(dep['model'])} version "
            f"{dep['model_version']} (revision {dep['current_revision']})  "
            f"{escape(dep['url'] or dep['status'])}  workers {dep['workers']}"
            + (f"  follows @{escape(dep['follow_alias'])}" if dep["follow_alias"] else "")
            + (
                f"  features from {escape(dep['feature_service'])}"
                if dep.get("feature_service")
                else ""
            )
        ]
        if dep["canary_revision"] is not None:
            rule = f", auto-rollback if {dep['canary_rule']}" if dep["canary_rule"] else ""
            lines.append(
                f"canary: version {dep['canary_version']} (revision {dep['canary_revision']}) "
                f"takes {dep['canary_percent']:g}%{escape(rule)}"
            )
        for role in ("stable", "canary"):
            t = message.traffic.get(role)
            if t and t["requests"]:
                lines.append(
                    f"{role:>7}: {t['rps']:,.1f} req/s  p50 {_num(t['p50_ms'], '.2f')} ms  "
                    f"p99 {_num(t['p99_ms'], '.2f')} ms  errors {t['error_rate']:.2%}"
                )
        if len(lines) == 1 + (dep["canary_revision"] is not None):
            lines.append("no traffic in the last 10 s" if message.traffic else "not serving")
        self.query_one("#traffic", Static).update("\n".join(lines))
        table = self.query_one("#revisions", DataTable)
        table.clear()
        for r in reversed(message.revisions):  # newest first
            marker = " *" if r["revision"] == dep["current_revision"] else ""
            table.add_row(
                f"{r['revision']}{marker}",
                str(r["model_version"]),
                r["action"],
                r["outcome"] or ("canary" if r["revision"] == dep["canary_revision"] else ""),
                Text(r["reason"] or ""),
                r["actor"] or "",
                r["created_at"][:19].replace("T", " "),
            )

    @on(DataTable.RowHighlighted, "#deployments")
    def _on_highlighted(self, event: DataTable.RowHighlighted) -> None:
        name = event.row_key.value
        if name and name != self.name_shown:
            self.name_shown = name
            self.load_deployment(name)

    @on(ActionFinished)
    def _on_action(self, message: ActionFinished) -> None:
        status = self.query_one("#deployments-status", Static)
        if show_outcome(self, status, message.what, message.error):
            self.reload()

    # ---- actions, each behind a confirmation ------------------------------------------------
    def _confirm(self, question: str, what: str, action: Callable[[], Any]) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.query_one("#deployments-status", Static).update(f"{escape(what)}…")
                self._act(what, action)

        self.app.push_screen(ConfirmScreen(question), answered)

    def action_rollback(self) -> None:
        dep = self.dep
        if dep is None:
            return
        name = dep["name"]
        self._confirm(
            f"Roll [b]{escape(name)}[/b] back from version {dep['model_version']} "
            f"(revision {dep['current_revision']}) to the previous live revision?",
            f"rollback {name}",
            lambda: deployments.rollback(self.ctx, name),
        )

    def action_promote(self) -> None:
        dep = self.dep
        if dep is None or dep["canary_revision"] is None:
            self.notify("no canary to promote", severity="warning")
            return
        name = dep["name"]
        self._confirm(
            f"Give canary version {dep['canary_version']} of [b]{escape(name)}[/b] all the "
            "traffic?",
            f"promote {name}",
            lambda: deployments.promote_canary(self.ctx, name, reason="promoted from the TUI"),
        )

    def action_abort(self) -> None:
        dep = self.dep
        if dep is None or dep["canary_revision"] is None:
            self.notify("no canary to abort", severity="warning")
            return
        name = dep["name"]
        self._confirm(
            f"Abort canary version {dep['canary_version']} of [b]{escape(name)}[/b]?",
            f"abort {name}",
            lambda: deployments.abort_canary(self.ctx, name, reason="aborted from the TUI"),
        )

    def action_reload(self) -> None:
        self.reload()
