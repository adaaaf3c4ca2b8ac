"""The Data screen, driven by Pilot: versions, preview, profile bars, lineage, SQL, recipes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from textual.widgets import DataTable, Static

from appliance.core.context import Appliance
from appliance.core.datasets import import_data
from appliance.tui.app import ApplianceApp
from appliance.tui.data import DataScreen, histogram_bars
from tests.pilot import until


def test_histogram_bars() -> None:
    assert histogram_bars([0, 5, 10]) == " ▄█"
    assert histogram_bars([]) == ""


def test_data_screen(tmp_path: Path) -> None:
    ctx = Appliance.open(tmp_path / "h")
    lines = ["id,amount,kind"] + [f"{i},{i * 1.5},{'ab'[i % 2]}" for i in range(40)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    import_data(ctx, "sales", str(tmp_path / "d.csv"))
    (tmp_path / "r.sql").write_text("SELECT kind, sum(amount) AS total FROM sales GROUP BY kind")

    async def scenario() -> None:
        app = ApplianceApp(ctx)
        async with app.run_test(size=(160, 45)) as pilot:
            await pilot.press("d")
            assert isinstance(app.screen, DataScreen)
            screen = app.screen
            versions = screen.query_one("#versions", DataTable)
            await until(pilot, lambda: versions.row_count == 1, "versions")
            preview = screen.query_one("#preview", DataTable)
            await until(pilot, lambda: preview.row_count == 40, "preview rows")
            profile = str(screen.query_one("#profile", Static).render())
            assert "amount" in profile and "█" in profile  # a histogram drawn as bars
            lineage = str(screen.query_one("#lineage", Static).render())
            assert "import:sales@1" in lineage

            screen.query_one("#tabs").active = "tab-sql"
            await pilot.pause()
            screen.query_one("#sql").focus()
            await pilot.press(*"SELECT count(*) AS n FROM sales", "enter")
            results = screen.query_one("#sql-results", DataTable)
            await until(pilot, lambda: results.row_count == 1, "SQL results")
            assert str(results.get_row_at(0)[0]) == "40"

            screen.query_one("#tabs").active = "tab-recipe"
            await pilot.pause()
            screen.query_one("#recipe-file").value = str(tmp_path / "r.sql")
            screen.query_one("#recipe-out").focus()
            await pilot.press(*"totals", "enter")
            status = screen.query_one("#recipe-status", Static)
            await until(pilot, lambda: "created totals@1" in str(status.render()), "recipe")
            await until(pilot, lambda: versions.row_count == 2, "the new version listed")

            await pilot.press("escape")  # leaves the input
            await pilot.press("escape")
            assert not isinstance(app.screen, DataScreen)
            await pilot.press("q")

    asyncio.run(scenario())
    ctx.close()
