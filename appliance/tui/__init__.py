"""The terminal UI: Textual screens that call the core; no SQL and no file I/O here."""
