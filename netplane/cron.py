"""Cron schedules, as CronJobs write them: five fields (minute hour day-of-month month day-of-week) of
`*`, numbers, ranges `a-b`, steps `*/n` and `a-b/n`, lists `a,b`, month and day names (JAN, MON), or a
macro (@hourly, @daily/@midnight, @weekly, @monthly, @yearly/@annually). When both day fields are
restricted, a day matches either (Vixie cron, as Kubernetes' robfig/cron does). Pure.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo

MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
          "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
MONTHS = {m: i for i, m in enumerate(("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC").split(), 1)}
DAYS = {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}
_FIELDS = (("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}), ("month", 1, 12, MONTHS),
           ("day of week", 0, 7, DAYS))
LOOK_BACK_MINUTES = 100_000   # how far back the latest missed time is looked for (~69 days)


class ScheduleError(ValueError):
    """The schedule does not parse; the words say which field and why."""


@dataclass(frozen=True)
class Schedule:
    minutes: frozenset
    hours: frozenset
    days: frozenset
    months: frozenset
    weekdays: frozenset
    days_restricted: bool
    weekdays_restricted: bool

    def matches(self, at: datetime) -> bool:
        if at.minute not in self.minutes or at.hour not in self.hours or at.month not in self.months:
            return False
        day, weekday = at.day in self.days, (at.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return day or weekday
        return day and weekday

    def latest(self, after: datetime, until: datetime) -> datetime | None:
        """The last minute in (after, until] the schedule fires at, looked for at most LOOK_BACK_MINUTES back."""
        at = until.replace(second=0, microsecond=0)
        for _ in range(LOOK_BACK_MINUTES):
            if at <= after:
                return None
            if self.matches(at):
                return at
            at -= timedelta(minutes=1)
        return None


def parse(text: str) -> Schedule:
    spec = MACROS.get(text.strip().lower(), text) if text.strip().startswith("@") else text
    if spec.strip().startswith("@"):
        raise ScheduleError(f"unrecognized descriptor: {text.strip()}")
    parts = spec.split()
    if len(parts) != 5:
        raise ScheduleError(f"expected exactly 5 fields, found {len(parts)}: {text!r}")
    sets = [_field(part, *field) for part, field in zip(parts, _FIELDS)]
    weekdays = frozenset(d % 7 for d in sets[4])   # 7 is Sunday too
    return Schedule(*sets[:4], weekdays, parts[2] not in ("*", "?"), parts[4] not in ("*", "?"))


def _field(text: str, name: str, low: int, high: int, names: dict) -> frozenset:
    values = set()
    for item in text.split(","):
        body, _, step_text = item.partition("/")
        try:
            step = int(step_text) if step_text else 1
        except ValueError:
            raise ScheduleError(f"invalid step {step_text!r} in the {name} field") from None
        if step < 1:
            raise ScheduleError(f"the step in the {name} field must be at least 1")
        if body in ("*", "?"):
            start, end = low, high
        else:
            first, _, last = body.partition("-")
            start = _value(first, name, low, high, names)
            end = _value(last, name, low, high, names) if last else (high if step_text else start)
            if end < start:
                raise ScheduleError(f"range {body!r} in the {name} field runs backwards")
        values.update(range(start, end + 1, step))
    return frozenset(values)


def _value(text: str, name: str, low: int, high: int, names: dict) -> int:
    value = names.get(text.upper()) if not text.isdigit() else int(text)
    if value is None or not low <= value <= high:
        raise ScheduleError(f"{text!r} is not a valid {name} ({low}-{high})")
    return value


def zone(name: str | None) -> tzinfo:
    """A CronJob's spec.timeZone (IANA), UTC when unset; ScheduleError when unknown."""
    if not name:
        return timezone.utc
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"unknown time zone {name}") from None
