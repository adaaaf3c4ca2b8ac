"""Domain services: the only place behaviour lives. Front ends (CLI, TUI, runner) call these.

Heavy libraries (lightgbm, duckdb, textual) are imported inside the functions that need them,
so importing the core stays fast for `appliance --help` and the TUI.
"""
