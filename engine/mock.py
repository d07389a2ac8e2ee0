"""Mock data: a public stand-in with the private dataset's schema and none of its values.

Invariant: a mock table is a function of the *schema* (column names, number of classes,
user-id and label column names), owner-declared feature ranges and a seed — never of private
rows. So it may be given to every researcher allowed to ``estimate`` on the dataset; no DP
mechanism is involved because no private value is read. Users get a random number of
examples; features are uniform in their declared range (default [-1, 1]); labels uniform.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.datastore import DatasetSchema

DEFAULT_RANGE = (-1.0, 1.0)
MOCK_FILE = "mock.parquet"


def parse_ranges(items: list[str] | None, feature_columns: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """Parse ``NAME=LOW:HIGH`` declarations; names must be feature columns, LOW < HIGH."""
    ranges: dict[str, tuple[float, float]] = {}
    for item in items or []:
        name, _, bounds = item.partition("=")
        low_text, _, high_text = bounds.partition(":")
        if name not in feature_columns:
            raise ValueError(f"mock range for unknown feature column {name!r}")
        try:
            low, high = float(low_text), float(high_text)
        except ValueError:
            raise ValueError(f"mock range {item!r} must look like NAME=LOW:HIGH") from None
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise ValueError(f"mock range {item!r} needs finite LOW < HIGH")
        ranges[name] = (low, high)
    return ranges


def generate_mock_table(
    schema: DatasetSchema,
    *,
    users: int = 200,
    ranges: Mapping[str, tuple[float, float]] | None = None,
    seed: int = 0,
) -> pa.Table:
    """A table with the schema's columns and synthetic values (see the module invariant)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(5, 41, size=users)
    total = int(counts.sum())
    columns: dict[str, pa.Array] = {
        schema.user_id_column: pa.array(np.repeat([f"mock{i:05d}" for i in range(users)], counts)),
        schema.label_column: pa.array(rng.integers(0, schema.num_classes, size=total,
                                                   dtype=np.int32)),
    }
    for name in schema.feature_columns:
        low, high = (ranges or {}).get(name, DEFAULT_RANGE)
        columns[name] = pa.array(rng.uniform(low, high, size=total).astype(np.float32))
    return pa.table(columns)


def write_mock(schema: DatasetSchema, path: Path, **options: object) -> Path:
    pq.write_table(generate_mock_table(schema, **options), path)  # type: ignore[arg-type]
    return path
