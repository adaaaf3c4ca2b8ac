"""The Features screen: entities, feature views with every version, feature services, each view
version's freshness against its ttl, and an online lookup form.

Reads, lookups and materialization run in thread workers that post past-tense messages; only
handlers touch widgets. CLI twins: `features list --all-versions`, `features freshness`,
`features profile`, `features get`, `features materialize`.
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
from textual.widgets import DataTable, Footer, Header, Input, Static

from appliance.core import features, online
from appliance.core.context import Appliance
from appliance.errors import ApplianceError
from appliance.tui.jobs import ConfirmScreen, show_outcome

REFRESH_SECONDS = 5.0
STATUS_STYLE = {"fresh": "green", "stale": "red", "not materialized": "yellow", "empty": "dim"}


class DefinitionsLoaded(Message):
    def __init__(self, rows: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> None:
        super().__init__()
        self.rows, self.fresh = rows, fresh


class ProfileLoaded(Message):
    def __init__(self, ref: str, profile: dict[str, Any] | None, error: str | None) -> None:
        super().__init__()
        self.ref, self.profile, self.error = ref, profile, error


class LookupFinished(Message):
    def __init__(self, response: dict[str, Any] | None, error: str | None) -> None:
        super().__init__()
        self.response, self.error = response, error


class ActionFinished(Message):
    def __init__(self, what: str, error: str | None) -> None:
        super().__init__()
        self.what, self.error = what, error


def _message(exc: Exception) -> str:
    return exc.message if isinstance(exc, ApplianceError) else f"{type(exc).__name__}: {exc}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _detail(row: dict[str, Any]) -> str:
    if row["kind"] == "entity":
        return "keys " + ", ".join(row["join_keys"])
    if row["kind"] == "view":
        ttl = _duration(row["ttl_seconds"]) or "no ttl"
        how = "sql over " if row.get("sql") else ""
        names = ", ".join(f["name"] for f in row["features"])
        return f"{how}{row['source']} · {ttl} · {names}"
    return ", ".join(f"{f['view']}@{f['view_version']}:{f['feature']}" for f in row["features"])


def parse_entity(text: str) -> dict[str, str]:
    """`driver_id=1001, city=Oslo` as {key: text}; the core types each key."""
    pairs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{part!r}: expected KEY=VALUE")
        pairs[key.strip()] = value.strip()
    if not pairs:
        raise ValueError("type the entity as KEY=VALUE (comma between keys)")
    return pairs


class FeaturesScreen(Screen[None]):
    """Definitions (every version) and freshness on top; the highlighted view's profile and
    the lookup form below."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("l", "lookup", "Lookup"),
        Binding("m", "materialize", "Materialize view"),
        Binding("r", "reload", "Refresh"),
    ]
    DEFAULT_CSS = """
    FeaturesScreen #features-status { height: 1; padding: 0 1; color: $text-muted; }
    FeaturesScreen #top { height: 1fr; }
    FeaturesScreen #definitions { width: 3fr; }
    FeaturesScreen #freshness { width: 2fr; }
    FeaturesScreen #bottom { height: 1fr; }
    FeaturesScreen #profile { width: 1fr; }
    FeaturesScreen #lookup-pane { width: 1fr; }
    FeaturesScreen #lookup-form { height: 3; }
    FeaturesScreen #service { width: 1fr; }
    FeaturesScreen #entity { width: 2fr; }
    """

    def __init__(self, ctx: Appliance) -> None:
        super().__init__()
        self.ctx = ctx
        self.rows: dict[str, dict[str, Any]] = {}
        self.view_shown: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("loading…", id="features-status")
        with Horizontal(id="top"):
            yield DataTable(id="definitions", cursor_type="row", zebra_stripes=True)
            yield DataTable(id="freshness", cursor_type="row")
        with Horizontal(id="bottom"):
            yield DataTable(id="profile", cursor_type="row")
            with Vertical(id="lookup-pane"):
                with Horizontal(id="lookup-form"):
                    yield Input(placeholder="feature service", id="service")
                    yield Input(placeholder="entity: driver_id=1001", id="entity")
                yield DataTable(id="lookup", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "features"
        self.query_one("#definitions", DataTable).add_columns(
            "KIND", "NAME", "VER", "WHAT", "CREATED"
        )
        self.query_one("#freshness", DataTable).add_columns(
            "VIEW", "STATUS", "TTL", "AGE", "NEWEST EVENT", "ROWS"
        )
        self.query_one("#profile", DataTable).add_columns(
            "COLUMN", "TYPE", "NULL %", "DISTINCT", "MIN", "MAX"
        )
        self.query_one("#lookup", DataTable).add_columns("FEATURE", "VALUE", "STATUS", "EVENT TIME")
        self.reload()
        self.set_interval(REFRESH_SECONDS, self.reload)

    # ---- workers: store reads and actions, off the UI thread --------------------------------
    @work(thread=True, exclusive=True, group="features", exit_on_error=False)
    def reload(self) -> None:
        try:
            rows = features.list_definitions(self.ctx, all_versions=True)
            fresh = features.freshness(self.ctx)
        except Exception as exc:  # a worker's error is shown, never lost
            self.post_message(ActionFinished("refresh", _message(exc)))
            return
        self.post_message(DefinitionsLoaded(rows, fresh))

    @work(thread=True, exclusive=True, group="profile", exit_on_error=False)
    def load_profile(self, ref: str) -> None:
        try:
            self.post_message(ProfileLoaded(ref, features.view_profile(self.ctx, ref), None))
        except Exception as exc:
            self.post_message(ProfileLoaded(ref, None, _message(exc)))

    @work(thread=True, exclusive=True, group="lookup", exit_on_error=False)
    def run_lookup(self, service: str, entity: dict[str, str]) -> None:
        try:
            entities = online.entities_from_text(self.ctx, service, entity)
            response = online.get_online_features(self.ctx, service, entities)
        except Exception as exc:
            self.post_message(LookupFinished(None, _message(exc)))
            return
        self.post_message(LookupFinished(response, None))

    @work(thread=True, group="act", exit_on_error=False)
    def run_materialize(self, ref: str) -> None:
        try:
            online.materialize(self.ctx, ref)
        except Exception as exc:
            self.post_message(ActionFinished(f"materialize {ref}", _message(exc)))
            return
        self.post_message(ActionFinished(f"materialize {ref}", None))

    # ---- handlers: the only code that touches widgets ---------------------------------------
    @on(DefinitionsLoaded)
    def _on_loaded(self, message: DefinitionsLoaded) -> None:
        table = self.query_one("#definitions", DataTable)
        cursor = table.cursor_row
        self.rows = {}
        with self.prevent(DataTable.RowHighlighted), table.prevent(DataTable.RowHighlighted):
            table.clear()
            for row in message.rows:
                key = f"{row['kind']}:{row['ref']}"
                self.rows[key] = row
                table.add_row(
                    row["kind"],
                    row["name"],
                    str(row["version"]),
                    Text(_detail(row)),
                    row["created_at"][:19].replace("T", " "),
                    key=key,
                )
            if message.rows:
                table.move_cursor(row=min(cursor, len(message.rows) - 1), animate=False)
        fresh = self.query_one("#freshness", DataTable)
        fresh.clear()
        for state in message.fresh:
            fresh.add_row(
                state["ref"],
                Text(state["status"], style=STATUS_STYLE.get(state["status"], "")),
                _duration(state["ttl_seconds"]) or "none",
                _duration(state["age_seconds"]),
                (state["newest_event"] or "")[:19].replace("T", " "),
                "" if state["rows_written"] is None else f"{state['rows_written']:,}",
                key=state["ref"],
            )
        counts = {k: sum(r["kind"] == k for r in message.rows) for k in features.KINDS}
        stale = sum(s["status"] == "stale" for s in message.fresh)
        self.query_one("#features-status", Static).update(
            f"{counts['entity']} entity, {counts['view']} view and {counts['service']} service "
            f"versions · {stale} stale   l lookup · m materialize · r refresh · esc back"
        )
        if self.view_shown is None:
            first = next((r for r in message.rows if r["kind"] == "view"), None)
            if first is not None:
                self.view_shown = first["ref"]
                self.load_profile(first["ref"])

    @on(DataTable.RowHighlighted, "#definitions")
    def _on_highlighted(self, event: DataTable.RowHighlighted) -> None:
        row = self.rows.get(str(event.row_key.value))
        if row is None:
            return
        if row["kind"] == "view" and row["ref"] != self.view_shown:
            self.view_shown = row["ref"]
            self.load_profile(row["ref"])
        if row["kind"] == "service":
            self.query_one("#service", Input).value = row["ref"]

    @on(ProfileLoaded)
    def _on_profile(self, message: ProfileLoaded) -> None:
        if message.ref != self.view_shown:
            return
        table = self.query_one("#profile", DataTable)
        table.clear()
        if message.error or message.profile is None:
            self.query_one("#features-status", Static).update(
                f"[red]{escape(message.error or '')}[/red]"
            )
            return
        table.border_title = f"{message.profile['ref']} · {message.profile['rows']:,} rows"
        for column in message.profile["columns"]:
            table.add_row(
                column["name"],
                column["type"],
                f"{column['null_pct']:.1f}",
                f"{column['distinct_approx']:,}",
                Text(str(column.get("min") if column.get("min") is not None else "")[:24]),
                Text(str(column.get("max") if column.get("max") is not None else "")[:24]),
            )

    @on(Input.Submitted, "#service")
    @on(Input.Submitted, "#entity")
    def _on_submit(self) -> None:
        service = self.query_one("#service", Input).value.strip()
        try:
            entity = parse_entity(self.query_one("#entity", Input).value)
        except ValueError as exc:
            self.query_one("#features-status", Static).update(f"[red]{escape(str(exc))}[/red]")
            return
        if not service:
            self.query_one("#features-status", Static).update("[red]name a feature service[/red]")
            return
        self.query_one("#features-status", Static).update(f"looking up {escape(service)}…")
        self.run_lookup(service, entity)

    @on(LookupFinished)
    def _on_lookup(self, message: LookupFinished) -> None:
        status = self.query_one("#features-status", Static)
        table = self.query_one("#lookup", DataTable)
        table.clear()
        if message.error or message.response is None:
            status.update(f"[red]{escape(message.error or '')}[/red]")
            return
        names = message.response["metadata"]["feature_names"]
        for name, result in zip(names, message.response["results"], strict=True):
            state = result["statuses"][0]
            table.add_row(
                name,
                Text("" if result["values"][0] is None else str(result["values"][0])),
                Text(state, style="green" if state == "PRESENT" else "yellow"),
                (result["event_timestamps"][0] or "")[:19].replace("T", " "),
            )
        status.update(f"{len(names)} values")

    @on(ActionFinished)
    def _on_action(self, message: ActionFinished) -> None:
        status = self.query_one("#features-status", Static)
        if show_outcome(self, status, message.what, message.error):
            self.reload()

    # ---- actions ----------------------------------------------------------------------------
    def action_reload(self) -> None:
        self.reload()

    def action_lookup(self) -> None:
        self.query_one("#entity", Input).focus()

    def action_materialize(self) -> None:
        ref = self.view_shown
        if ref is None:
            self.notify("highlight a feature view first", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.query_one("#features-status", Static).update(f"materializing {ref}…")
                self.run_materialize(ref)

        self.app.push_screen(
            ConfirmScreen(
                f"Materialize [b]{escape(ref)}[/b] up to now into the online store? "
                "(older values never overwrite newer ones)"
            ),
            answered,
        )
