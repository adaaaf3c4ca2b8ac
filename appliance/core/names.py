"""Names users give things (datasets, models, deployments): validated once, here."""

from __future__ import annotations

import re

from appliance.errors import InvalidInput

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def validate_name(field: str, value: str) -> str:
    """Accept names safe as file names, URL segments and SQL values; reject traversal tricks."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{field}: must not be empty")
    if "/" in value or "\\" in value or ".." in value or any(c.isspace() for c in value):
        raise InvalidInput(f"{field} {value!r}: must not contain '/', '..' or spaces")
    if not _NAME.match(value):
        raise InvalidInput(
            f"{field} {value!r}: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit, at most 63 characters"
        )
    return value


def split_ref(field: str, ref: str, sep: str = "@") -> tuple[str, int | None]:
    """'name@3' -> ('name', 3); 'name' -> ('name', None)."""
    name, _, version = ref.partition(sep)
    validate_name(field, name)
    if not version:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise InvalidInput(f"{field} {ref!r}: version after '{sep}' must be a positive integer")
    return name, int(version)
