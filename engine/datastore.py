"""Per-user dataset storage: import from CSV/Parquet, synthetic data, memory-mapped partitions.

Layout of a dataset directory ``DS/``::

    DS/schema.json                 name, columns, num_features, num_classes, partition sizes
    DS/training/features.npy       float32 [M, d]
    DS/training/labels.npy         int32 [M]
    DS/training/offsets.npy        int64 [N + 1]; user i's rows are offsets[i]:offsets[i + 1]
    DS/evaluation/...              the same, for held-out users

Privacy-relevant invariants:

* One user = one contiguous row range = one federated client (the DP unit).
* The training/evaluation split is per user, never per row, so the two partitions hold
  disjoint users (DP evaluation then composes in parallel with training). A user's side is
  decided by a keyed hash of the user id alone (HMAC-SHA256 with the owner's ``split_key``),
  so it does not depend on the data, on row order or on other users.
* User ids are not stored: partitions know users only by position.

No TensorFlow here; arrays are read with ``np.load(mmap_mode="r", allow_pickle=False)``.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

__all__ = [
    "PARTITIONS",
    "DatasetSchema",
    "Partition",
    "PartitionSize",
    "generate_synthetic",
    "import_dataset",
    "load_schema",
    "open_partition",
]

PARTITIONS = ("training", "evaluation")
PartitionName = Literal["training", "evaluation"]

_COPY_ROWS = 1 << 16  # rows copied per step when writing partitions


@dataclass(frozen=True)
class PartitionSize:
    users: int
    examples: int


@dataclass(frozen=True)
class DatasetSchema:
    """``schema.json``: what the gateway may show about a dataset (no per-user data)."""

    name: str
    user_id_column: str
    label_column: str
    feature_columns: tuple[str, ...]
    num_features: int
    num_classes: int
    partitions: dict[str, PartitionSize]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "user_id_column": self.user_id_column,
            "label_column": self.label_column,
            "feature_columns": list(self.feature_columns),
            "num_features": self.num_features,
            "num_classes": self.num_classes,
            "partitions": {
                part: {"users": size.users, "examples": size.examples}
                for part, size in self.partitions.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetSchema:
        partitions = data["partitions"]
        schema = cls(
            name=str(data["name"]),
            user_id_column=str(data["user_id_column"]),
            label_column=str(data["label_column"]),
            feature_columns=tuple(str(c) for c in data["feature_columns"]),
            num_features=int(data["num_features"]),
            num_classes=int(data["num_classes"]),
            partitions={
                part: PartitionSize(int(partitions[part]["users"]),
                                    int(partitions[part]["examples"]))
                for part in PARTITIONS
            },
        )
        if schema.num_features != len(schema.feature_columns):
            raise ValueError("schema num_features does not match feature_columns")
        return schema


@dataclass(frozen=True)
class Partition:
    """One partition, memory-mapped read-only; a user's examples are read on demand."""

    features: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    @property
    def users(self) -> int:
        return len(self.offsets) - 1

    @property
    def examples(self) -> int:
        return len(self.labels)

    def user_examples(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """All examples of user ``i`` (0 ≤ i < users): features [n, d] and labels [n]."""
        if not 0 <= i < self.users:
            raise IndexError(f"user {i} out of range (partition has {self.users})")
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.features[start:stop], self.labels[start:stop]

    def mean_user_accuracy(self, predicted: np.ndarray) -> float:
        """The mean over users of each user's accuracy, given one predicted label per example
        (in the partition's order). Exact and owner-side only (benchmarks, the docs' examples):
        nothing computed here is noised, so it must never reach a researcher."""
        correct = (np.asarray(predicted) == np.asarray(self.labels)).astype(np.float64)
        offsets = np.asarray(self.offsets)
        return float(np.mean(np.add.reduceat(correct, offsets[:-1]) / np.diff(offsets)))


def load_schema(ds_dir: Path) -> DatasetSchema:
    return DatasetSchema.from_json(json.loads((Path(ds_dir) / "schema.json").read_text()))


def open_partition(ds_dir: Path, name: PartitionName) -> Partition:
    """Memory-map a partition and check that its arrays agree with each other and the schema."""
    if name not in PARTITIONS:
        raise ValueError(f"unknown partition {name!r} (expected one of {PARTITIONS})")
    schema = load_schema(ds_dir)
    part = Path(ds_dir) / name
    features, labels, offsets = (
        np.load(part / f"{array}.npy", mmap_mode="r", allow_pickle=False)
        for array in ("features", "labels", "offsets")
    )
    size = schema.partitions[name]
    if (features.dtype != np.float32 or labels.dtype != np.int32 or offsets.dtype != np.int64
            or features.shape != (size.examples, schema.num_features)
            or labels.shape != (size.examples,) or offsets.shape != (size.users + 1,)):
        raise ValueError(f"partition {name!r} arrays do not match schema.json")
    if offsets[0] != 0 or offsets[-1] != size.examples or np.any(np.diff(offsets) <= 0):
        raise ValueError(f"partition {name!r} offsets are not increasing from 0 to "
                         f"{size.examples}")
    return Partition(features=features, labels=labels, offsets=offsets)


# ---------------------------------------------------------------------------------------------
# Import


def import_dataset(
    source: Path,
    dest: Path,
    *,
    name: str,
    user_column: str,
    label_column: str,
    feature_columns: list[str] | None = None,
    evaluation_fraction: float = 0.2,
    split_key: bytes,
    num_classes: int | None = None,
) -> DatasetSchema:
    """Import a CSV or Parquet file (chosen by suffix) into the per-user layout at ``dest``.

    Column names must be distinct. ``feature_columns=None`` takes every other column, and each
    must then be numeric (a column with one non-numeric value is refused, naming its row, not
    left out). Labels must be integers in ``[0, num_classes)``; without ``num_classes`` the
    label set is read from the data: max label + 1, provided every label 0..max occurs. A
    user goes to the evaluation partition iff ``int.from_bytes(HMAC-SHA256(split_key,
    user_id)[:8], "big") / 2**64 < evaluation_fraction``. Rows are grouped by user id with a
    stable sort (a user's rows keep their file order). ``dest`` is written in a temporary
    sibling directory and renamed into place, so it either exists complete or not at all.

    Peak memory is about the Arrow table plus one float32 copy of the feature matrix.
    """
    source, dest = Path(source), Path(dest)
    if not 0 <= evaluation_fraction < 1:
        raise ValueError("evaluation_fraction must be in [0, 1)")
    if not split_key:
        raise ValueError("split_key must not be empty")
    if dest.exists():
        raise FileExistsError(f"dataset directory {dest} already exists")
    table = _read_table(source)
    if table.num_rows == 0:
        raise ValueError(f"{source.name} has no rows")
    _check_column_names(table)
    features_used = _feature_columns(table, user_column, label_column, feature_columns)
    user_ids, user_of_row = _user_index(table, user_column)
    labels, classes = _labels(table, label_column, num_classes)
    features = _feature_matrix(table, features_used)
    del table

    in_evaluation = np.fromiter(
        (_evaluation_side(split_key, uid, evaluation_fraction) for uid in user_ids),
        dtype=bool, count=len(user_ids),
    )
    order = np.argsort(user_of_row, kind="stable")
    counts = np.bincount(user_of_row, minlength=len(user_ids))

    tmp = dest.parent / f".{dest.name}.partial-{secrets.token_hex(8)}"
    tmp.mkdir(parents=True)
    try:
        sizes = {}
        for part, chosen in (("training", ~in_evaluation), ("evaluation", in_evaluation)):
            sizes[part] = _write_partition(tmp / part, features, labels, order,
                                           row_chosen=chosen[user_of_row[order]],
                                           counts=counts[chosen])
        if sizes["training"].users == 0:
            raise ValueError("no users were assigned to the training partition")
        schema = DatasetSchema(
            name=name,
            user_id_column=user_column,
            label_column=label_column,
            feature_columns=tuple(features_used),
            num_features=len(features_used),
            num_classes=classes,
            partitions=sizes,
        )
        _write_synced(tmp / "schema.json", json.dumps(schema.to_json(), indent=2).encode())
        _fsync(tmp)
        tmp.rename(dest)
        _fsync(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return schema


def _read_table(source: Path) -> pa.Table:
    suffix = source.suffix.lower()
    if suffix == ".csv":
        return pa_csv.read_csv(source)
    if suffix in {".parquet", ".pq"}:
        return pq.read_table(source)
    raise ValueError(f"{source.name}: unsupported file type {suffix!r} (use .csv or .parquet)")


def _check_column_names(table: pa.Table) -> None:
    """Every column is named once: a repeated name would make "column x" ambiguous."""
    names = table.column_names
    for name in names:
        positions = [i + 1 for i, other in enumerate(names) if other == name]
        if len(positions) > 1:
            raise ValueError(f"column name {name!r} appears {len(positions)} times in the header "
                             f"(columns {', '.join(map(str, positions))}); rename all but one")


def _feature_columns(table: pa.Table, user_column: str, label_column: str,
                     requested: list[str] | None) -> list[str]:
    for column in (user_column, label_column):
        if column not in table.column_names:
            raise ValueError(f"column {column!r} not found (columns: {table.column_names})")
    if user_column == label_column:
        raise ValueError("the user id column and the label column must differ")
    if requested is None:
        chosen = [c for c in table.column_names if c not in {user_column, label_column}]
        for column in chosen:
            if not _is_numeric(table.schema.field(column)):
                raise ValueError(f"column {_not_numeric(table, column)}; by default every column "
                                 "but the user id and the label is a feature: fix the value, or "
                                 "list the feature columns (--feature-columns) to leave it out")
    else:
        chosen = list(requested)
        for column in chosen:
            if column not in table.column_names:
                raise ValueError(f"feature column {column!r} not found")
            if column in {user_column, label_column}:
                raise ValueError(f"column {column!r} cannot be both a feature and the "
                                 "user id or label")
            if not _is_numeric(table.schema.field(column)):
                raise ValueError(f"feature column {_not_numeric(table, column)}")
        if len(set(chosen)) != len(chosen):
            raise ValueError("feature columns are listed more than once")
    if not chosen:
        raise ValueError("no numeric feature columns")
    return chosen


def _is_numeric(field: pa.Field) -> bool:
    return pa.types.is_integer(field.type) or pa.types.is_floating(field.type)


# A decimal number as text: what makes a CSV reader type a column as numbers.
_NUMBER_TEXT = r"^\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$"


def _not_numeric(table: pa.Table, column: str) -> str:
    """``'x' is not numeric (type)``, and for text the first data row that is no number."""
    values = table.column(column)
    reason = f"{column!r} is not numeric ({values.type})"
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        number = pc.fill_null(pc.match_substring_regex(values, _NUMBER_TEXT), True)
        bad = ~np.asarray(number.to_numpy(zero_copy_only=False), dtype=bool)
        if bad.any():
            row = _first_row(bad)
            text = str(values[row].as_py())
            shown = text if len(text) <= 40 else text[:37] + "..."
            reason += f": data row {row} holds {shown!r}"
    return reason


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _no_nulls(column: pa.ChunkedArray, name: str) -> None:
    if column.null_count:
        nulls = np.asarray(column.is_null().to_numpy(zero_copy_only=False))
        raise ValueError(f"column {name!r} has missing values (first at data row "
                         f"{_first_row(nulls)})")


def _user_index(table: pa.Table, column: str) -> tuple[list[str], np.ndarray]:
    """Distinct user ids in sorted order, and each row's index into them."""
    ids = table.column(column)
    _no_nulls(ids, column)
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)
            or pa.types.is_integer(ids.type)):
        raise ValueError(f"user id column {column!r} must hold strings or integers "
                         f"(found {ids.type})")
    ids = pc.cast(ids, pa.string())
    empty = np.asarray(pc.equal(ids, "").to_numpy(zero_copy_only=False))
    if empty.any():
        raise ValueError(f"column {column!r} has an empty user id at data row "
                         f"{_first_row(empty)}")
    distinct = sorted(pc.unique(ids).to_pylist())
    index = pc.index_in(ids, value_set=pa.array(distinct, pa.string()))
    return distinct, np.asarray(index.to_numpy(zero_copy_only=False), dtype=np.int64)


def _labels(table: pa.Table, column: str, num_classes: int | None) -> tuple[np.ndarray, int]:
    values = table.column(column)
    _no_nulls(values, column)
    raw = np.asarray(values.to_numpy())
    if np.issubdtype(raw.dtype, np.floating):
        bad = ~np.isfinite(raw) | (raw != np.round(raw))
        if bad.any():
            raise ValueError(f"label column {column!r} has a non-integer value at data row "
                             f"{_first_row(bad)}")
    elif not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"label column {column!r} must be integer (found {values.type})")
    limit = num_classes if num_classes is not None else np.iinfo(np.int32).max
    bad = (raw < 0) | (raw >= limit)
    if bad.any():
        raise ValueError(f"label column {column!r} has value {raw[bad][0]!r} outside "
                         f"[0, {limit}) at data row {_first_row(bad)}")
    if num_classes is None:
        _check_inferred_label_set(raw, column)
    classes = num_classes if num_classes is not None else int(raw.max()) + 1
    if classes < 2:
        raise ValueError(f"label column {column!r} must have at least 2 classes")
    return raw.astype(np.int32), classes


def _check_inferred_label_set(raw: np.ndarray, column: str) -> None:
    """Without a declared label set, the labels read must be 0..K-1 with every one present:
    one stray large label would otherwise make the label set (and the model's output layer)
    as large as its value."""
    distinct = np.unique(raw)
    gaps = np.flatnonzero(distinct != np.arange(len(distinct)))
    if len(gaps):
        largest = int(distinct[-1])
        raise ValueError(
            f"label column {column!r} would give {largest + 1} classes (its largest label "
            f"{largest} is at data row {_first_row(raw == largest)}) but label "
            f"{int(gaps[0])} never occurs: declare the label set 0..K-1 (num_classes, "
            "--num-classes K) or fix the label")


def _feature_matrix(table: pa.Table, columns: list[str]) -> np.ndarray:
    features = np.empty((table.num_rows, len(columns)), dtype=np.float32)
    for j, column in enumerate(columns):
        values = table.column(column)
        _no_nulls(values, column)
        with np.errstate(over="ignore", invalid="ignore"):
            features[:, j] = values.to_numpy()
        bad = ~np.isfinite(features[:, j])
        if bad.any():
            raise ValueError(f"feature column {column!r} has a non-finite value (as float32) "
                             f"at data row {_first_row(bad)}")
    return features


def _evaluation_side(key: bytes, user_id: str, fraction: float) -> bool:
    digest = hmac.new(key, user_id.encode("utf-8"), sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _write_partition(path: Path, features: np.ndarray, labels: np.ndarray, order: np.ndarray,
                     *, row_chosen: np.ndarray, counts: np.ndarray) -> PartitionSize:
    """Write the chosen rows (``order`` filtered by ``row_chosen``) grouped by user."""
    path.mkdir()
    rows = order[row_chosen]
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    out_features = _new_array(path / "features.npy", np.float32, (len(rows), features.shape[1]))
    out_labels = _new_array(path / "labels.npy", np.int32, (len(rows),))
    for start in range(0, len(rows), _COPY_ROWS):
        chunk = rows[start:start + _COPY_ROWS]
        out_features[start:start + len(chunk)] = features[chunk]
        out_labels[start:start + len(chunk)] = labels[chunk]
    for array in (out_features, out_labels):
        if isinstance(array, np.memmap):
            array.flush()
    del out_features, out_labels
    np.save(path / "offsets.npy", offsets, allow_pickle=False)
    for file in path.iterdir():
        _fsync(file)
    _fsync(path)
    return PartitionSize(users=len(counts), examples=len(rows))


def _new_array(path: Path, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    if math.prod(shape) == 0:  # an empty file cannot be memory-mapped
        np.save(path, np.zeros(shape, dtype), allow_pickle=False)
        return np.zeros(shape, dtype)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """fsync a file, or a directory (making renames and new entries in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Synthetic data


def generate_synthetic(
    path: Path,
    *,
    users: int = 2500,
    features: int = 60,
    classes: int = 10,
    alpha: float = 1.0,
    beta: float = 1.0,
    global_model_std: float = 0.0,
    seed: int = 0,
    format: Literal["parquet", "csv"] = "parquet",
) -> Path:
    """Write a LEAF/FedProx-style "Synthetic(α, β)" dataset (Li et al., 2020) to ``path``.

    For user u: ``u_k ~ N(0, α²)``, ``W_u ~ N(u_k, 1)`` (features × classes),
    ``b_u ~ N(u_k, 1)``; ``B_u ~ N(0, β²)``, ``v_u ~ N(B_u, 1)`` (per feature);
    ``x ~ N(v_u, Σ)`` with ``Σ = diag(j^-1.2)``; ``y = argmax softmax(W_u^T x + b_u)``.
    α controls how much users' models differ, β how much their feature distributions differ.
    Examples per user are lognormal (median ≈ 20) clamped to [5, 200].

    In this recipe users share no labelling function (``u_k`` shifts every class's logit
    equally, which argmax ignores), so a model cannot beat chance on *held-out users* — the
    split fedgate evaluates on. ``global_model_std > 0`` adds one model ``(W₀, b₀) ~ N(0,
    global_model_std²)``, shared by all users, to every user's own; 0 is the recipe exactly.

    Columns: ``user_id`` ("u000123"), ``label`` (int32), ``f0..f{d-1}`` (float32).
    Deterministic for a given seed; generated and written in chunks of users, so memory does
    not grow with ``users``.
    """
    if users < 1 or features < 1 or classes < 2:
        raise ValueError("need users ≥ 1, features ≥ 1, classes ≥ 2")
    if min(alpha, beta, global_model_std) < 0:
        raise ValueError("alpha, beta and global_model_std are standard deviations (≥ 0)")
    if format not in {"parquet", "csv"}:
        raise ValueError(f"unknown format {format!r}")
    path = Path(path)
    seeds = np.random.SeedSequence(seed)
    counts_rng, global_rng, *chunk_seeds = seeds.spawn(2 + math.ceil(users / _SYNTHETIC_CHUNK))
    counts = np.clip(
        np.random.default_rng(counts_rng).lognormal(mean=3.0, sigma=1.0, size=users),
        5, 200,
    ).astype(np.int64)
    shared = np.random.default_rng(global_rng).normal(0.0, global_model_std,
                                                      (features + 1, classes))
    feature_std = np.arange(1, features + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)
    width = max(6, len(str(users - 1)))
    schema = pa.schema(
        [("user_id", pa.string()), ("label", pa.int32())]
        + [(f"f{j}", pa.float32()) for j in range(features)]
    )
    # Dictionary-encoding random floats is slow and makes files larger; user ids repeat.
    writer = (pq.ParquetWriter(path, schema, use_dictionary=["user_id"]) if format == "parquet"
              else pa_csv.CSVWriter(path, schema))
    with writer:
        for chunk, chunk_seed in enumerate(chunk_seeds):
            first = chunk * _SYNTHETIC_CHUNK
            chunk_counts = counts[first:first + _SYNTHETIC_CHUNK]
            x, y = _synthetic_chunk(np.random.default_rng(chunk_seed), chunk_counts,
                                    feature_std, shared, alpha, beta)
            owner = np.repeat(np.arange(first, first + len(chunk_counts)), chunk_counts)
            digits = pc.utf8_lpad(pc.cast(pa.array(owner), pa.string()), width=width,
                                  padding="0")
            columns = [pc.binary_join_element_wise("u", digits, ""), pa.array(y)]
            columns += [pa.array(x[:, j]) for j in range(features)]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    return path


_SYNTHETIC_CHUNK = 1024


def _synthetic_chunk(rng: np.random.Generator, counts: np.ndarray, feature_std: np.ndarray,
                     shared: np.ndarray, alpha: float,
                     beta: float) -> tuple[np.ndarray, np.ndarray]:
    """``shared`` is the users' common model: [features + 1, classes], the last row the bias."""
    n_users, dim, classes = len(counts), len(feature_std), shared.shape[1]
    model_mean = rng.normal(0.0, alpha, n_users)
    weights = shared[:-1] + rng.normal(model_mean[:, None, None], 1.0, (n_users, dim, classes))
    biases = shared[-1] + rng.normal(model_mean[:, None], 1.0, (n_users, classes))
    feature_mean = rng.normal(rng.normal(0.0, beta, n_users)[:, None], 1.0, (n_users, dim))
    owner = np.repeat(np.arange(n_users), counts)
    x = feature_mean[owner] + rng.standard_normal((len(owner), dim)) * feature_std
    y = np.empty(len(owner), dtype=np.int32)
    ends = np.cumsum(counts)
    for u in range(n_users):
        rows = slice(ends[u] - counts[u], ends[u])
        y[rows] = np.argmax(x[rows] @ weights[u] + biases[u], axis=1)
    return x.astype(np.float32), y
