"""The owner's price list and the pure function that prices one job's billed quantities.

Exact arithmetic only: prices are ``Decimal`` (read from the ``[billing]`` table of
``fedgate.toml`` through their decimal text, never through binary floats), quantities are
converted to ``Fraction`` from their recorded decimal text, and each line item is rounded
once, half-to-even, to :data:`AMOUNT_QUANTUM`. A charge's total is the exact sum of its
rounded items, so statements (sums of charges) add up to the audit log's ``bill`` entries to the
last digit.

Units: a CPU-hour is 3600 CPU seconds; ε is the privacy loss committed for the job (zero when
its reservation was refunded).

Privacy contract: a charge is seen by the researcher, so :func:`price_job` is only ever given
data-independent quantities (:class:`BilledQuantities`): the CPU *billed*
(``ledger.metering.billed_cpu`` — the job's admission-time reservation once it has read user
data) and the committed ε. There is no memory price: a job's memory use depends on the private
data and the node has no memory reservation to price instead, so a ``per_gb_hour`` key is
refused rather than silently ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from typing import Any

__all__ = ["AMOUNT_QUANTUM", "BilledQuantities", "Charge", "PriceList", "PriceListInvalid",
           "decimal_text", "price_job"]

AMOUNT_QUANTUM = Decimal("0.000001")
"""Amounts are kept to a millionth of the currency unit (a small job costs fractions of a cent)."""

_CURRENCY = re.compile(r"^[A-Za-z][A-Za-z0-9 ._-]{0,15}$")
_PRICE = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,12})?$")
_ITEMS = ("cpu", "job", "epsilon")


class PriceListInvalid(ValueError):
    """The ``[billing]`` table is malformed; the message names the key."""


@dataclass(frozen=True)
class PriceList:
    """Prices per unit in ``currency``; ``per_epsilon`` None means ε is not charged."""

    currency: str
    per_cpu_hour: Decimal
    per_job: Decimal
    per_epsilon: Decimal | None = None

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> PriceList:
        """Parse ``[billing]``: ``currency`` (a label) and non-negative prices written as TOML
        numbers or strings (``"0.05"``); unknown keys, and the retired ``per_gb_hour``, are
        refused."""
        if "per_gb_hour" in table:
            raise PriceListInvalid(
                "[billing] per_gb_hour is no longer supported: a job's memory use depends on the "
                "private data, so it cannot be billed to researchers (docs/billing.md, \"What the "
                "researcher sees\"); remove it and cover memory in per_cpu_hour or per_job")
        known = {"currency", "per_cpu_hour", "per_job", "per_epsilon"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise PriceListInvalid(f"[billing] has unknown key {unknown[0]!r} (known: "
                                   f"{', '.join(sorted(known))})")
        currency = table.get("currency")
        if not isinstance(currency, str) or not _CURRENCY.match(currency):
            raise PriceListInvalid("[billing] currency must be a short label such as \"EUR\"")
        prices = {name: _price(table, name) for name in ("per_cpu_hour", "per_job")}
        epsilon = _price(table, "per_epsilon") if "per_epsilon" in table else None
        return cls(currency=currency, per_epsilon=epsilon, **prices)

    def to_json(self) -> dict[str, str | None]:
        return {"currency": self.currency, "per_cpu_hour": str(self.per_cpu_hour),
                "per_job": str(self.per_job),
                "per_epsilon": None if self.per_epsilon is None else str(self.per_epsilon)}


def _price(table: dict[str, Any], name: str) -> Decimal:
    value = table.get(name, 0)
    # TOML floats come in as binary floats: their shortest repr is the text the owner wrote.
    text = repr(value) if isinstance(value, float) else value
    if isinstance(value, bool) or not isinstance(text, str | int):
        raise PriceListInvalid(f"[billing] {name} must be a number ≥ 0, e.g. 0.05")
    text = str(text)
    if not _PRICE.match(text):
        raise PriceListInvalid(f"[billing] {name} must be a plain decimal ≥ 0 such as 0.05, "
                               f"not {text!r}")
    return Decimal(text)


def decimal_text(value: float | int) -> str:
    """A measured quantity as the decimal text it is recorded (and priced) by: at most six
    decimals (microseconds, micro-ε), no exponent."""
    return format(Decimal(repr(float(value))).quantize(AMOUNT_QUANTUM, ROUND_HALF_EVEN), "f")


@dataclass(frozen=True)
class BilledQuantities:
    """The priced quantities of one job, as decimal text (:func:`decimal_text`). Both are
    data-independent (module contract): ``cpu_seconds`` is ``ledger.metering.billed_cpu``,
    ``epsilon`` the committed ε ("0" when refunded)."""

    cpu_seconds: str
    epsilon: str


@dataclass(frozen=True)
class Charge:
    """One job's price: rounded line items and their exact sum, in ``currency``."""

    currency: str
    items: dict[str, Decimal]
    total: Decimal

    def to_json(self) -> dict[str, Any]:
        return {"currency": self.currency, "total": str(self.total),
                "items": {name: str(amount) for name, amount in self.items.items()}}


def _amount(value: Fraction) -> Decimal:
    exact = Decimal(value.numerator) / Decimal(value.denominator) if value else Decimal(0)
    return exact.quantize(AMOUNT_QUANTUM, ROUND_HALF_EVEN)


def price_job(prices: PriceList, quantities: BilledQuantities) -> Charge:
    """Price one job (pure). ``cpu`` = billed CPU hours × per_cpu_hour; ``job`` = per_job;
    ``epsilon`` = ε × per_epsilon (0 if not priced). The charge is a function of
    ``quantities`` and ``prices`` alone, so it is as data-independent as they are.

    The quotient is computed exactly (``Fraction``) and each item rounded once, so the result
    does not depend on float rounding or on the order of operations.
    """
    cpu_hours = Fraction(quantities.cpu_seconds) / Fraction(3600)
    per_epsilon = prices.per_epsilon or Decimal(0)
    items = {
        "cpu": _amount(cpu_hours * Fraction(prices.per_cpu_hour)),
        "job": _amount(Fraction(prices.per_job)),
        "epsilon": _amount(Fraction(quantities.epsilon) * Fraction(per_epsilon)),
    }
    assert tuple(items) == _ITEMS
    return Charge(prices.currency, items, sum(items.values(), Decimal(0)))
