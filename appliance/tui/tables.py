"""Refilling a DataTable from a worker's rows, the way every refreshing screen needs it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from textual.widgets import DataTable


def fill_table(table: DataTable, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Replace a table's rows (each row's first item is its key, the rest its cells) and
    keep the cursor where it was: a refresh must not throw the user back to the top. No
    RowHighlighted is posted, so a refresh never reads as the user moving."""
    cursor = table.cursor_row
    with table.prevent(DataTable.RowHighlighted):
        if not table.columns:
            for name in columns:
                table.add_column(name.upper(), key=name)
        table.clear()
        for row in rows:
            table.add_row(*row[1:], key=str(row[0]))
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1), animate=False)
