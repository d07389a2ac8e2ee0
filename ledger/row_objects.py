"""Table-model instances from complete rows, built the way the ORM builds the objects it loads.

Calling a table model (``Job(...)``) sends every attribute through SQLAlchemy's attribute events
and SQLModel's constructor: about 47 µs for a ``Job``, and admission built three such objects
per request (the job, its review, the dataset snapshot). :func:`row_object` builds the same
object in about 2 µs: the class manager's ``new_instance`` (what the ORM's loader calls) and
the values put in the instance's ``__dict__``.

Contract: the object holds exactly the row it is given, every column of the model (the
columns not named take the model's defaults, which are constants in ``ledger.models``; a name
that is not a column is refused), with no validation and no change history. It belongs to no
session: it is read, or attached as an existing row (``make_transient_to_detached``), never
inserted by the ORM; the rows it stands for are written with fixed statements.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic_core import PydanticUndefined
from sqlmodel import SQLModel

M = TypeVar("M", bound=SQLModel)


@functools.cache
def _defaults(model: type[SQLModel]) -> tuple[frozenset[str], dict[str, Any]]:
    """The model's column names, and the constant default of each column that has one."""
    fields = model.model_fields
    for name, field in fields.items():
        if field.default_factory is not None:
            raise TypeError(f"{model.__name__}.{name} has a default factory; give row_object "
                            "its value")
    return frozenset(fields), {name: field.default for name, field in fields.items()
                               if field.default is not PydanticUndefined}


def row_values(model: type[SQLModel], values: Mapping[str, Any]) -> dict[str, Any]:
    """Every column of ``model``: ``values`` over the model's defaults. Raises ``TypeError``
    for a name that is not a column or a column with neither a value nor a default."""
    names, defaults = _defaults(model)
    row = {**defaults, **values}
    if row.keys() != names:
        unknown, missing = sorted(row.keys() - names), sorted(names - row.keys())
        raise TypeError(f"{model.__name__} row: unknown columns {unknown}, missing {missing}")
    return row


def row_object(model: type[M], values: Mapping[str, Any]) -> M:
    """An instance of ``model`` holding :func:`row_values` of ``values`` (module contract)."""
    instance: M = model._sa_class_manager.new_instance()  # type: ignore[attr-defined]
    instance.__dict__.update(row_values(model, values))
    return instance


def fetch_row_object(model: type[M], cursor: Any) -> M | None:
    """The next row of a driver ``cursor`` (a ``SELECT *``) as a :func:`row_object`, None
    when there is none; columns the model does not have are left out."""
    row = cursor.fetchone()
    if row is None:
        return None
    names = _defaults(model)[0]
    return row_object(model, {column[0]: value for column, value
                              in zip(cursor.description, row, strict=True) if column[0] in names})
