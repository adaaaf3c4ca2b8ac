"""Cron expressions: the five fields of crontab(5), read in the machine's local time.

`minute hour day-of-month month day-of-week`, each `*`, a number, a range `a-b`, a step
`*/n` or `a-b/n`, or a comma list of those; months and weekdays also by their first three
letters; weekday 0 and 7 are Sunday. As in cron, when both day fields are restricted a day
matches either of them. Errors name the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from appliance.errors import InvalidInput

_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)
_NAMES = {
    3: ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
    4: ["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
}
_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}


@dataclass(frozen=True)
class Cron:
    """A parsed expression: the allowed values of each field."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    def matches_day(self, when: datetime) -> bool:
        weekday = (when.weekday() + 1) % 7
        in_month = when.day in self.days
        in_week = weekday in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def next_after(self, when: datetime) -> datetime:
        """The first matching minute strictly after `when` (naive local time)."""
        start = when.replace(second=0, microsecond=0) + timedelta(minutes=1)
        day = start.replace(hour=0, minute=0)
        for _ in range(366 * 8):  # every expression that can match does within 8 years
            if day.month in self.months and self.matches_day(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        candidate = day.replace(hour=hour, minute=minute)
                        if candidate >= start:
                            return candidate
            day += timedelta(days=1)
        raise InvalidInput(f"cron {self.text!r}: never matches a date")


def _value(text: str, index: int, where: str) -> int:
    names = _NAMES.get(index)
    if names and text.lower() in names:
        return names.index(text.lower()) + (1 if index == 3 else 0)
    if not text.isdigit():
        raise InvalidInput(f"{where}: {text!r} is not a number")
    return int(text)


def parse_cron(text: str) -> Cron:
    """Read an expression; names the field and the part it cannot read."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("--cron: expected five fields like '0 3 * * *'")
    expanded = _MACROS.get(text.strip().lower(), text)
    parts = expanded.split()
    if len(parts) != 5:
        raise InvalidInput(
            f"--cron {text!r}: expected five fields (minute hour day-of-month month "
            f"day-of-week), got {len(parts)}"
        )
    sets: list[frozenset[int]] = []
    for index, (part, (name, low, high)) in enumerate(zip(parts, _FIELDS, strict=True)):
        where = f"--cron {text!r}: {name}"
        values: set[int] = set()
        for item in part.split(","):
            body, slash, step_text = item.partition("/")
            step = 1
            if slash:
                if not step_text.isdigit() or int(step_text) == 0:
                    raise InvalidInput(f"{where}: step {step_text!r} must be a positive number")
                step = int(step_text)
            if body == "*":
                first, last = low, high
            elif "-" in body:
                a, _, b = body.partition("-")
                first, last = _value(a, index, where), _value(b, index, where)
            else:
                first = _value(body, index, where)
                last = high if slash else first
            if not (low <= first <= high and low <= last <= high) or first > last:
                raise InvalidInput(f"{where}: {item!r} is outside {low}-{high}")
            values.update(range(first, last + 1, step))
        if index == 4 and 7 in values:
            values = (values - {7}) | {0}
        sets.append(frozenset(values))
    return Cron(
        text=text,
        minutes=sets[0],
        hours=sets[1],
        days=sets[2],
        months=sets[3],
        weekdays=sets[4],
        # as Vixie cron: a day field starting with `*` (`*`, `*/2`) does not restrict the
        # other one, so `*/2 * 1` is Mondays on odd days, not odd days or Mondays
        any_day=parts[2].startswith("*"),
        any_weekday=parts[4].startswith("*"),
    )
