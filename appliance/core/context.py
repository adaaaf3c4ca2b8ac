"""The handle every core function takes: resolved settings plus lazily opened stores."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from appliance.config import Settings, load_settings
from appliance.errors import InvalidInput
from appliance.store.db import Database, open_database
from appliance.store.objects import ObjectStore, open_object_store


class Appliance:
    """One appliance home: its settings, metadata database and object store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @classmethod
    def open(cls, home: str | Path | None = None, **overrides: Any) -> Appliance:
        settings = load_settings(home, **overrides)
        try:
            settings.home.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise InvalidInput(
                f"home {settings.home}: cannot create directory ({exc.strerror or exc})"
            ) from exc
        return cls(settings)

    @cached_property
    def db(self) -> Database:
        return open_database(self.settings.metadata_path)

    @cached_property
    def objects(self) -> ObjectStore:
        return open_object_store(self.settings)

    def close(self) -> None:
        if "db" in self.__dict__:
            self.db.close()
            del self.__dict__["db"]
