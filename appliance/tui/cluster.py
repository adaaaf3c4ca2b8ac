"""The Cluster screen: k3s version, nodes (roles, readiness, GPUs), GPUs per node and the
object store's health; when k3s is absent, how to install it.

Reads run in a thread worker (kubectl may take seconds) that posts `ClusterLoaded`; only its
handler touches widgets. CLI twins: `cluster status`, `cluster nodes`, `cluster gpus`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from appliance.core import cluster
from appliance.core.context import Appliance
from appliance.core.kube import Kube
from appliance.errors import ApplianceError

REFRESH_SECONDS = 5.0
NODE_COLUMNS = ("name", "roles", "ready", "version", "address", "arch", "cpu", "memory", "gpus")
GPU_COLUMNS = ("node", "capacity", "allocatable", "in_use", "free")


class ClusterLoaded(Message):
    def __init__(
        self,
        status: dict[str, Any] | None,
        nodes: list[dict[str, Any]],
        gpus: list[dict[str, Any]],
        error: str | None,
    ) -> None:
        super().__init__()
        self.status, self.nodes, self.gpus, self.error = status, nodes, gpus, error


def _memory(value: int | None) -> str:
    return "" if value is None else f"{value / 2**30:.1f} GiB"


class ClusterScreen(Screen[None]):
    """Status on top, nodes in the middle, GPUs per node below."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("r", "reload", "Refresh"),
    ]
    DEFAULT_CSS = """
    ClusterScreen #cluster-status { height: auto; padding: 0 1; }
    ClusterScreen #nodes { height: 2fr; }
    ClusterScreen #gpus { height: 1fr; }
    """

    def __init__(self, ctx: Appliance) -> None:
        super().__init__()
        self.ctx = ctx

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("loading…", id="cluster-status")
        yield DataTable(id="nodes", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="gpus", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "cluster"
        self.query_one("#nodes", DataTable).add_columns(*(c.upper() for c in NODE_COLUMNS))
        self.query_one("#gpus", DataTable).add_columns(*(c.upper() for c in GPU_COLUMNS))
        self.reload()
        self.set_interval(REFRESH_SECONDS, self.reload)

    @work(thread=True, exclusive=True, group="cluster-refresh", exit_on_error=False)
    def reload(self) -> None:
        kube = Kube.for_settings(self.ctx.settings)
        try:
            nodes = cluster.list_nodes(kube)
            gpus = cluster.list_gpus(kube)
            status = cluster.cluster_status(self.ctx.settings, kube)
        except ApplianceError as exc:
            self.post_message(ClusterLoaded(None, [], [], exc.message))
            return
        except Exception as exc:  # keep the screen alive; say what went wrong
            self.post_message(ClusterLoaded(None, [], [], f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(ClusterLoaded(status, nodes, gpus, None))

    @on(ClusterLoaded)
    def _on_loaded(self, message: ClusterLoaded) -> None:
        line = self.query_one("#cluster-status", Static)
        nodes = self.query_one("#nodes", DataTable)
        gpus = self.query_one("#gpus", DataTable)
        nodes.clear()
        gpus.clear()
        if message.error is not None or message.status is None:
            line.update(f"[red]{escape(message.error or 'no status')}[/red]")
            return
        s = message.status
        line.update(
            f"k3s {escape(str(s['k3s_version']))} · nodes {s['nodes_ready']}/{s['nodes']} ready"
            + (f" ([red]not ready: {escape(s['not_ready'])}[/red])" if s["not_ready"] else "")
            + f" · GPUs {s['gpus_free']} free of {s['gpus_allocatable']}"
            + f" · object store: {escape(s['object_store'])}"
        )
        for node in message.nodes:
            nodes.add_row(
                Text(str(node["name"])),
                node["roles"],
                Text("Ready", style="green") if node["ready"] else Text("NotReady", style="red"),
                node["version"] or "",
                node["address"] or "",
                node["arch"] or "",
                "" if node["cpu"] is None else f"{node['cpu']:g}",
                _memory(node["memory_bytes"]),
                str(node["gpus"]),
            )
        for gpu in message.gpus:
            gpus.add_row(*(str(gpu[c]) for c in GPU_COLUMNS))

    def action_reload(self) -> None:
        self.reload()
