"""The handle every core function takes: resolved settings plus lazily opened stores."""

from __future__ import annotations

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

    # Opened on first use, without functools.cached_property: on Python 3.11 it holds one
    # lock for every instance while the store opens (migrations included), and a process
    # forked meanwhile by another thread (the agent forks job supervisors while its ship
    # and watch threads open their own handles) inherits that lock held, for ever.
    @property
    def db(self) -> Database:
        found = self.__dict__.get("_db")
        if found is None:
            found = self.__dict__["_db"] = open_database(self.settings.metadata_path)
        return found

    @property
    def objects(self) -> ObjectStore:
        found = self.__dict__.get("_objects")
        if found is None:
            found = self.__dict__["_objects"] = open_object_store(self.settings)
        return found

    def close(self) -> None:
        found = self.__dict__.pop("_db", None)
        if found is not None:
            found.close()
