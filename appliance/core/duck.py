"""DuckDB connections for data work: memory limit, spill directory, offline httpfs for s3://.

Every DuckDB use in the core goes through `connect` so that limits and S3 access are set in
one place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from appliance.config import Settings
from appliance.errors import InvalidInput

MEMORY_ENV = "APPLIANCE_DUCKDB_MEMORY_LIMIT"
_NUMERIC = (
    "TINYINT",
    "SMALLINT",
    "INTEGER",
    "BIGINT",
    "HUGEINT",
    "UTINYINT",
    "USMALLINT",
    "UINTEGER",
    "UBIGINT",
    "FLOAT",
    "DOUBLE",
    "REAL",
    "BOOLEAN",
)


def is_numeric(duck_type: str) -> bool:
    """Whether a DuckDB column type holds numbers (booleans count: they train as 0/1)."""
    upper = duck_type.upper()
    return upper in _NUMERIC or upper.startswith("DECIMAL")


def sql_string(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_identifier(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def httpfs_extension_path() -> Path:
    """The httpfs extension shipped in the duckdb-extension-httpfs wheel (no download)."""
    import duckdb

    try:
        import duckdb_extension_httpfs
    except ImportError as exc:
        raise InvalidInput(
            "s3:// sources need the duckdb-extension-httpfs package (pinned to duckdb's version)"
        ) from exc
    base = Path(duckdb_extension_httpfs.__file__).parent / "extensions"
    wanted = base / f"v{duckdb.__version__}" / "httpfs.duckdb_extension"
    if not wanted.exists():
        found = sorted(base.glob("*/httpfs.duckdb_extension"))
        raise InvalidInput(
            f"duckdb-extension-httpfs has {[p.parent.name for p in found]}, "
            f"but duckdb is {duckdb.__version__}; install matching versions"
        )
    return wanted


def connect(
    settings: Settings | None = None, memory_limit: str | None = None, s3: bool = False
) -> Any:
    """An in-memory DuckDB connection with the appliance's limits (and S3 access if asked)."""
    import duckdb

    con = duckdb.connect(config={"preserve_insertion_order": True})
    limit = memory_limit or os.environ.get(MEMORY_ENV)
    if limit:
        con.execute(f"SET memory_limit = {sql_string(limit)}")
    if settings is not None:
        spill = settings.cache_dir / "duckdb-spill"
        spill.mkdir(parents=True, exist_ok=True)
        con.execute(f"SET temp_directory = {sql_string(str(spill))}")
    if s3:
        if settings is None or settings.store != "s3":
            raise InvalidInput("s3:// sources need the s3 object-store backend configured")
        con.execute(f"INSTALL {sql_string(str(httpfs_extension_path()))}")
        con.execute("LOAD httpfs")
        cfg = settings.s3
        con.execute(
            "CREATE SECRET appliance_s3 (TYPE s3, KEY_ID ?, SECRET ?, ENDPOINT ?, REGION ?, "
            "URL_STYLE 'path', USE_SSL ?)".replace("?", "{}").format(
                sql_string(cfg.access_key),
                sql_string(cfg.secret_key),
                sql_string(cfg.endpoint),
                sql_string(cfg.region),
                "true" if cfg.secure else "false",
            )
        )
    return con
