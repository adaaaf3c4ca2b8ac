"""The Models screen: registered models, their versions with aliases, the alias history, the
model card, and promote-with-gate from a form.

Store reads and the promotion job run in thread workers that post past-tense messages; only
handlers touch widgets. CLI twins: `models versions`, `models alias history`, `models card`,
`models promote`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Header, Input, Markdown, Static

from appliance.core import promotion, registry
from appliance.core.context import Appliance
from appliance.errors import ApplianceError


class ModelsLoaded(Message):
    def __init__(self, models: list[dict[str, Any]]) -> None:
        super().__init__()
        self.models = models


class ModelLoaded(Message):
    """One model's versions and alias history, and the highlighted version's card."""

    def __init__(
        self, name: str, versions: list[dict[str, Any]], history: list[dict[str, Any]], card: str
    ) -> None:
        super().__init__()
        self.name, self.versions, self.history, self.card = name, versions, history, card


class PromotionFinished(Message):
    def __init__(self, report: dict[str, Any] | None, error: str | None) -> None:
        super().__init__()
        self.report, self.error = report, error


class PromoteForm(ModalScreen[dict[str, str] | None]):
    """Alias, evaluation dataset and gate for `models promote`."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = """
    PromoteForm { align: center middle; }
    PromoteForm > Vertical { width: 80; height: auto; border: thick $accent; padding: 1 2;
                             background: $surface; }
    """

    def __init__(self, ref: str) -> None:
        super().__init__()
        self.ref = ref

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"Promote [b]{escape(self.ref)}[/b] if it passes the gate")
            yield Input(value="champion", placeholder="alias", id="alias")
            yield Input(placeholder="evaluation dataset NAME@VERSION", id="dataset")
            yield Input(placeholder="gate, e.g. auc >= champion.auc + 0.002", id="gate")
            with Horizontal():
                yield Button("Evaluate and promote", variant="primary", id="go")
                yield Button("Cancel", id="cancel")

    @on(Button.Pressed, "#go")
    @on(Input.Submitted, "#gate")
    def _submit(self) -> None:
        self.dismiss(
            {k: self.query_one(f"#{k}", Input).value.strip() for k in ("alias", "dataset", "gate")}
        )

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class ModelsScreen(Screen[None]):
    """Models on the left; the selected model's versions, alias history and card."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("p", "promote", "Promote"),
        Binding("r", "reload", "Refresh"),
    ]
    DEFAULT_CSS = """
    ModelsScreen #models { width: 40; }
    ModelsScreen #right { width: 1fr; }
    ModelsScreen #versions { height: 1fr; }
    ModelsScreen #history { height: 10; }
    ModelsScreen #card-pane { height: 1fr; border: round $panel; }
    ModelsScreen #models-status { height: 1; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, ctx: Appliance) -> None:
        super().__init__()
        self.ctx = ctx
        self.model: str | None = None
        self.version: int | None = None
        self.versions: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.report: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("loading…", id="models-status")
        with Horizontal():
            yield DataTable(id="models", cursor_type="row")
            with Vertical(id="right"):
                yield DataTable(id="versions", cursor_type="row", zebra_stripes=True)
                yield DataTable(id="history", cursor_type="row")
                with VerticalScroll(id="card-pane"):
                    yield Markdown("", id="card")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "models"
        self.query_one("#models", DataTable).add_columns("MODEL", "VERSIONS", "ALIASES")
        self.query_one("#versions", DataTable).add_columns(
            "VERSION", "ALIASES", "AUC", "DATASET", "RUN", "ARCHIVED", "CREATED"
        )
        self.query_one("#history", DataTable).add_columns(
            "ALIAS", "FROM", "TO", "WHEN", "WHO", "WHY"
        )
        self.reload()

    @work(thread=True, exclusive=True, group="models", exit_on_error=False)
    def reload(self) -> None:
        try:
            models = registry.list_models(self.ctx)
        except ApplianceError as exc:
            self.post_message(PromotionFinished(None, exc.message))
            return
        self.post_message(ModelsLoaded(models))

    @work(thread=True, exclusive=True, group="model", exit_on_error=False)
    def load_model(self, name: str, version: int | None) -> None:
        try:
            versions = registry.list_model_versions(self.ctx, name)
            history = registry.alias_history(self.ctx, name)
            shown = version if version is not None else versions[-1]["version"]
            card = registry.model_card(self.ctx, f"{name}/{shown}")
        except ApplianceError as exc:
            self.post_message(PromotionFinished(None, exc.message))
            return
        self.post_message(ModelLoaded(name, versions, history, card))

    def action_reload(self) -> None:
        self.reload()
        if self.model:
            self.load_model(self.model, self.version)

    @on(ModelsLoaded)
    def _on_models(self, message: ModelsLoaded) -> None:
        table = self.query_one("#models", DataTable)
        with self.prevent(DataTable.RowHighlighted), table.prevent(DataTable.RowHighlighted):
            table.clear()
            for m in message.models:
                table.add_row(
                    m["name"], str(m["versions"]), Text(m["aliases"] or ""), key=m["name"]
                )
        if message.models and self.model is None:
            self.model = message.models[0]["name"]
            self.load_model(self.model, None)
        self.query_one("#models-status", Static).update(
            f"{len(message.models)} models   p promote (with a gate) · r refresh · esc back"
        )

    @on(ModelLoaded)
    def _on_model(self, message: ModelLoaded) -> None:
        if message.name != self.model:
            return
        self.versions, self.history = message.versions, message.history
        versions = self.query_one("#versions", DataTable)
        with self.prevent(DataTable.RowHighlighted), versions.prevent(DataTable.RowHighlighted):
            versions.clear()
            for v in message.versions:
                auc = v["metrics"].get("auc", v["metrics"].get("valid_auc"))
                versions.add_row(
                    str(v["version"]),
                    ", ".join(v["aliases"]),
                    "" if auc is None else f"{auc:.4f}",
                    v.get("dataset") or "",
                    (v.get("run_id") or "")[:12],
                    "yes" if v.get("archived_at") else "",
                    v["created_at"][:19].replace("T", " "),
                    key=str(v["version"]),
                )
            if self.version is not None:
                keys = [str(v["version"]) for v in message.versions]
                if str(self.version) in keys:
                    versions.move_cursor(row=keys.index(str(self.version)), animate=False)
        history = self.query_one("#history", DataTable)
        history.clear()
        for h in reversed(message.history):  # newest first
            history.add_row(
                h["alias"],
                "" if h["from_version"] is None else str(h["from_version"]),
                "" if h["to_version"] is None else str(h["to_version"]),
                h["changed_at"][:19].replace("T", " "),
                h["actor"] or "",
                Text(h["reason"] or ""),
            )
        self.query_one("#card", Markdown).update(message.card)

    @on(DataTable.RowHighlighted, "#models")
    def _on_model_highlighted(self, event: DataTable.RowHighlighted) -> None:
        name = event.row_key.value
        if name and name != self.model:
            self.model, self.version = name, None
            self.load_model(name, None)

    @on(DataTable.RowHighlighted, "#versions")
    def _on_version_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        if key and self.model and int(key) != self.version:
            self.version = int(key)
            self.load_model(self.model, self.version)

    def action_promote(self) -> None:
        if not self.model or not self.versions:
            return
        version = self.version if self.version is not None else self.versions[-1]["version"]
        ref = f"{self.model}/{version}"

        def submitted(form: dict[str, str] | None) -> None:
            if form:
                self.query_one("#models-status", Static).update(
                    f"evaluating {escape(ref)} against {escape(form['alias'])}…"
                )
                self._promote(ref, form["alias"], form["dataset"], form["gate"])

        self.app.push_screen(PromoteForm(ref), submitted)

    @work(thread=True, group="promote", exit_on_error=False)
    def _promote(self, ref: str, alias: str, dataset: str, gate: str) -> None:
        try:
            report = promotion.promote(self.ctx, ref, alias, gate, dataset)
        except ApplianceError as exc:
            self.post_message(PromotionFinished(None, exc.message))
            return
        self.post_message(PromotionFinished(report, None))

    @on(PromotionFinished)
    def _on_promoted(self, message: PromotionFinished) -> None:
        status = self.query_one("#models-status", Static)
        if message.error:
            status.update(f"[red]{escape(message.error)}[/red]")
            self.notify(message.error, severity="error")
            return
        report = message.report or {}
        self.report = report
        lines = [
            f"{'ok' if c['holds'] else 'FAIL'} {c['metric']} {c['value']:.4g} {c['op']} "
            f"{c['threshold']:.4g}"
            for c in report.get("conditions", [])
        ]
        verdict = "promoted" if report.get("passed") else "not promoted"
        status.update(f"{verdict}: {report.get('candidate')} on {report.get('dataset')}")
        self.notify(
            f"{verdict}\n" + "\n".join(lines),
            severity="information" if report.get("passed") else "warning",
        )
        self.action_reload()
