"""Typed values of policy rows: each parser accepts exactly one documented grammar or raises
``ValueError``."""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.keras_config import MODEL_CLASSES

MODEL_FAMILIES = tuple(sorted(set(MODEL_CLASSES.values())))

_NUMBER = re.compile(r"^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]{1,3})?$")


def parse_number(text: str) -> float:
    """A finite, non-negative decimal such as ``1``, ``0.8`` or ``1e-3`` (no nan/inf)."""
    value = float(text) if _NUMBER.match(text) else math.nan
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite non-negative number")
    return value


def parse_positive(text: str) -> float:
    value = parse_number(text)
    if value <= 0:
        raise ValueError(f"{text!r} must be greater than 0")
    return value


def parse_integer(text: str) -> int:
    """A whole number ≥ 1 written with digits only."""
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a whole number ≥ 1")
    return int(text)


_SIZE_UNITS = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_SIZE = re.compile(r"^(?P<n>[0-9.eE+-]+) ?(?P<unit>[A-Za-z]+)$")


def parse_size(text: str) -> int:
    """A size in bytes with a unit: ``512 B``, ``50 MB``, ``1.5GiB`` (kB/MB/GB are 10³ⁿ)."""
    match = _SIZE.match(text)
    if match is None or match["unit"] not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size with a unit ({', '.join(_SIZE_UNITS)})")
    size = parse_number(match["n"]) * _SIZE_UNITS[match["unit"]]
    if size < 1:
        raise ValueError(f"{text!r} is less than one byte")
    return round(size)


_COUNT = re.compile(r"^(?P<n>[0-9.eE+-]+)(?P<unit>[kM]?)$")


def parse_count(text: str) -> int:
    """A whole count, optionally with ``k`` (10³) or ``M`` (10⁶): ``250000``, ``1.5M``."""
    match = _COUNT.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a count such as 250000, 250k or 1.5M")
    count = parse_number(match["n"]) * {"": 1, "k": 10**3, "M": 10**6}[match["unit"]]
    if count < 1 or count != int(count):
        raise ValueError(f"{text!r} is not a whole count ≥ 1")
    return int(count)


def parse_whole(text: str) -> int:
    """A whole number ≥ 0 written with digits only."""
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{text!r} is not a whole number ≥ 0")
    return int(text)


_AMOUNT = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,6})?$")


def parse_amount(text: str) -> Decimal:
    """An amount of money ≥ 0 as plain decimal text (``25``, ``12.50``), kept exact."""
    if not _AMOUNT.match(text):
        raise ValueError(f"{text!r} is not an amount such as 25 or 12.50")
    return Decimal(text)


def parse_model_family(text: str) -> str:
    if text not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {text!r} (known: {', '.join(MODEL_FAMILIES)})")
    return text


def parse_model_families(text: str) -> frozenset[str]:
    """One family or several joined by ``|``: ``keras-sequential|keras-functional``."""
    return frozenset(parse_model_family(part.strip()) for part in text.split("|"))


def parse_known_model_families(text: str) -> frozenset[str]:
    """``none`` or families joined by ``|`` (for ``dataset_model_families`` in tests)."""
    return frozenset() if text == "none" else parse_model_families(text)


_DURATION = re.compile(r"^(?P<n>[0-9]{1,4})(?P<unit>[hdw])$")


@dataclass(frozen=True)
class EpsilonAllowance:
    """At most ``limit`` ε per researcher within any rolling ``window`` ending now."""

    limit: float
    window: dt.timedelta
    text: str


def parse_epsilon_allowance(text: str) -> EpsilonAllowance:
    """``LIMIT per DURATION`` with DURATION ``Nh``, ``Nd`` or ``Nw``: ``2 per 30d``."""
    limit, _, duration = text.partition(" per ")
    match = _DURATION.match(duration.strip())
    if match is None or int(match["n"]) == 0:
        raise ValueError(f"{text!r} is not 'LIMIT per DURATION' such as '2 per 30d' "
                         "(durations: Nh, Nd, Nw)")
    hours = int(match["n"]) * {"h": 1, "d": 24, "w": 24 * 7}[match["unit"]]
    return EpsilonAllowance(parse_positive(limit.strip()), dt.timedelta(hours=hours), text)


DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(
    r"^(?P<days>daily|[a-z]{3}(-[a-z]{3})?) (?P<start>[0-9]{2}:[0-9]{2})-(?P<end>[0-9]{2}:[0-9]{2})"
    r" (?P<zone>[A-Za-z][A-Za-z0-9_+/-]*)$"
)


@dataclass(frozen=True)
class TimeWindow:
    """Weekdays (0 = Monday) and ``[start, end)`` minutes of the day in one time zone."""

    days: frozenset[int]
    start: int
    end: int
    zone: dt.tzinfo
    text: str

    def contains(self, now: dt.datetime) -> bool:
        local = now.astimezone(self.zone)
        minute = local.hour * 60 + local.minute
        return local.weekday() in self.days and self.start <= minute < self.end


def _minute_of_day(text: str, *, end: bool) -> int:
    hours, minutes = int(text[:2]), int(text[3:])
    if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not end)):
        raise ValueError(f"{text!r} is not a time of day (00:00–23:59, or 24:00 as an end)")
    return hours * 60 + minutes


def parse_time_window(text: str) -> TimeWindow:
    """``DAYS HH:MM-HH:MM ZONE``: ``mon-fri 08:00-18:00 UTC``, ``daily 09:00-17:00 Europe/Berlin``.

    DAYS is ``daily``, one day or a range (``fri-mon`` wraps); the end is exclusive and
    after the start (a window across midnight is written as two windows).
    """
    match = _WINDOW.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a time window such as 'mon-fri 08:00-18:00 UTC'")
    first, _, last = match["days"].partition("-")
    if first == "daily":
        days = frozenset(range(7))
    else:
        if first not in DAYS or (last and last not in DAYS):
            raise ValueError(f"{match['days']!r}: days are {', '.join(DAYS)} or daily")
        a, b = DAYS.index(first), DAYS.index(last or first)
        days = frozenset((a + i) % 7 for i in range((b - a) % 7 + 1))
    start, end = _minute_of_day(match["start"], end=False), _minute_of_day(match["end"], end=True)
    if end <= start:
        raise ValueError(f"{text!r}: the window must end after it starts (split windows that "
                         "cross midnight in two)")
    zone_name = match["zone"]
    try:
        zone: dt.tzinfo = dt.UTC if zone_name == "UTC" else ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {zone_name!r} (use UTC or an IANA name such as "
                         "Europe/Berlin)") from None
    return TimeWindow(days, start, end, zone, text)


def parse_time_windows(text: str) -> tuple[TimeWindow, ...]:
    """One window or several joined by ``|`` (a request must fall in one of them)."""
    return tuple(parse_time_window(part.strip()) for part in text.split("|"))


_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_INSTANT = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2})?(Z|[+-][0-9]{2}:[0-9]{2})$")


@dataclass(frozen=True)
class Expiry:
    """A grant holds while ``now < ends``."""

    ends: dt.datetime
    text: str


def parse_instant(text: str) -> dt.datetime:
    """An ISO 8601 instant with an explicit offset: ``2025-06-02T09:00Z``, ``...+02:00``."""
    if not _INSTANT.match(text):
        raise ValueError(f"{text!r} is not an ISO 8601 time with an offset such as "
                         "2025-06-02T09:00Z")
    return dt.datetime.fromisoformat(text)


def parse_expiry(text: str) -> Expiry:
    """An ISO date (valid through that whole day, UTC) or an ISO instant with an offset."""
    if _DATE.match(text):
        try:
            day = dt.date.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a calendar date") from None
        return Expiry(dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC), text)
    try:
        return Expiry(parse_instant(text), text)
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO date (2025-12-31) nor an ISO time with an "
                         "offset (2025-12-31T17:00Z)") from None
