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

import json
import math
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.hmac import HMAC

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

    in_evaluation = _evaluation_users(split_key, user_ids, evaluation_fraction)
    order = _stable_order(user_of_row, len(user_ids))
    counts = np.bincount(user_of_row, minlength=len(user_ids))
    row_in_evaluation = in_evaluation[user_of_row[order]]

    tmp = dest.parent / f".{dest.name}.partial-{secrets.token_hex(8)}"
    tmp.mkdir(parents=True)
    try:
        sizes = {}
        for part, chosen, rows in (
            ("training", ~in_evaluation, order[~row_in_evaluation]),
            ("evaluation", in_evaluation, order[row_in_evaluation]),
        ):
            sizes[part] = _write_partition(tmp / part, features, labels, rows,
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


def _user_index(table: pa.Table, column: str) -> tuple[pa.StringArray, np.ndarray]:
    """Distinct user ids in sorted order, and each row's index into them (int32).

    Strings compare by code point in Python and by byte in Arrow; for UTF-8 the two orders are
    the same. Integer ids are their decimal text."""
    ids = table.column(column)
    _no_nulls(ids, column)
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)
            or pa.types.is_integer(ids.type)):
        raise ValueError(f"user id column {column!r} must hold strings or integers "
                         f"(found {ids.type})")
    encoded = ids.dictionary_encode().combine_chunks()  # one hash pass; distinct ids in order seen
    distinct = pc.cast(encoded.dictionary, pa.string())
    index_of_row = np.asarray(encoded.indices.to_numpy(), dtype=np.int32)
    empty = pc.index(distinct, "").as_py()
    if empty >= 0:
        raise ValueError(f"column {column!r} has an empty user id at data row "
                         f"{_first_row(index_of_row == empty)}")
    sort = pc.sort_indices(distinct)
    ranked = distinct.take(sort)
    try:
        ranked.validate(full=True)  # Arrow's Parquet reader does not check strings are UTF-8
    except pa.ArrowInvalid:
        distinct.to_pylist()  # the UnicodeDecodeError naming the first bad id's bytes
        raise
    rank = np.empty(len(distinct), dtype=np.int32)
    rank[np.asarray(sort)] = np.arange(len(distinct), dtype=np.int32)
    return ranked, rank[index_of_row]


def _utf8_values(strings: pa.StringArray) -> Iterator[bytes]:
    """Each string's UTF-8 bytes, sliced from the array's data buffer (no decoding)."""
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int32)
    bounds = offsets[strings.offset:strings.offset + len(strings) + 1].tolist()
    text = strings.buffers()[2].to_pybytes()
    return (text[start:stop] for start, stop in pairwise(bounds))


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
    labels = raw.astype(np.int32)
    if num_classes is None:
        _check_inferred_label_set(labels, column)
    classes = num_classes if num_classes is not None else int(labels.max()) + 1
    if classes < 2:
        raise ValueError(f"label column {column!r} must have at least 2 classes")
    return labels, classes


def _check_inferred_label_set(labels: np.ndarray, column: str) -> None:
    """Without a declared label set, the labels read must be 0..K-1 with every one present:
    one stray large label would otherwise make the label set (and the model's output layer)
    as large as its value. ``labels`` are integers in [0, 2**31 - 1)."""
    largest = int(labels.max())
    # Labels 0..largest can all occur only if there are more rows than largest; then counting
    # them is one pass (sorting for the distinct labels is ten times slower).
    if largest < len(labels) and np.bincount(labels).all():
        return
    distinct = np.unique(labels)
    gaps = np.flatnonzero(distinct != np.arange(len(distinct)))
    raise ValueError(
        f"label column {column!r} would give {largest + 1} classes (its largest label "
        f"{largest} is at data row {_first_row(labels == largest)}) but label "
        f"{int(gaps[0])} never occurs: declare the label set 0..K-1 (num_classes, "
        "--num-classes K) or fix the label")


def _feature_matrix(table: pa.Table, columns: list[str]) -> np.ndarray:
    """The features as float32 [rows, columns], rows in file order. Refuses the first column
    (in the order given) with a missing value or a value not finite as float32, naming its
    first such row."""
    features = np.empty((table.num_rows, len(columns)), dtype=np.float32)
    start = 0
    with np.errstate(over="ignore", invalid="ignore"):
        # Batch by batch, so the rows being filled stay in cache while each column is copied in.
        for batch in table.select(columns).to_batches():
            block = features[start:start + batch.num_rows]
            for j, values in enumerate(batch.columns):
                block[:, j] = values.to_numpy(zero_copy_only=False)
            start += batch.num_rows
    # min and max propagate NaN, so both are finite iff every value is: two passes, no mask.
    if (any(table.column(column).null_count for column in columns)
            or not np.isfinite(features.min()) or not np.isfinite(features.max())):
        for j, column in enumerate(columns):  # something is wrong: name the first, in order
            _no_nulls(table.column(column), column)
            bad = ~np.isfinite(features[:, j])
            if bad.any():
                raise ValueError(f"feature column {column!r} has a non-finite value (as "
                                 f"float32) at data row {_first_row(bad)}")
    return features


def _evaluation_users(key: bytes, user_ids: pa.StringArray, fraction: float) -> np.ndarray:
    """Which users go to evaluation: ``int.from_bytes(HMAC-SHA256(key, user_id)[:8], "big")
    / 2**64 < fraction``, for each user id (its UTF-8 bytes)."""
    keyed = HMAC(key, SHA256())  # keyed once: each user's MAC starts from a copy of it
    macs = bytearray()
    for user_id in _utf8_values(user_ids):
        mac = keyed.copy()
        mac.update(user_id)
        macs += mac.finalize()
    prefixes = np.frombuffer(macs, dtype=">u8").reshape(-1, SHA256.digest_size // 8)[:, 0]
    return prefixes < np.uint64(_evaluation_threshold(fraction))


def _evaluation_threshold(fraction: float) -> int:
    """The least 64-bit ``x`` with ``x / 2**64 >= fraction`` as Python rounds the division:
    since rounding is monotone, ``x / 2**64 < fraction`` iff ``x`` is below it, which NumPy
    can compare for every user at once. For ``fraction < 1`` it is below 2**64, as
    ``(2**64 - 1) / 2**64`` rounds to 1.0."""
    low, high = 0, 2**64 - 1
    while low < high:
        middle = (low + high) // 2
        if middle / 2**64 < fraction:
            low = middle + 1
        else:
            high = middle
    return low


def _stable_order(keys: np.ndarray, bound: int) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for int32 keys in [0, bound): a radix sort by the
    low, then the high 16 bits. NumPy radix-sorts 16-bit integers but timsorts wider ones,
    four times slower on a million shuffled rows."""
    order = np.argsort(keys.astype(np.uint16), kind="stable")  # astype keeps the low 16 bits
    if bound > 1 << 16:
        order = order[np.argsort((keys[order] >> 16).astype(np.uint16), kind="stable")]
    return order


def _write_partition(path: Path, features: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                     *, counts: np.ndarray) -> PartitionSize:
    """Write ``rows`` (grouped by user, ``counts[i]`` rows for the partition's user i)."""
    path.mkdir()
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    _write_npy(path / "features.npy", np.dtype(np.float32), (len(rows), features.shape[1]),
               (np.take(features, rows[start:start + _COPY_ROWS], axis=0)
                for start in range(0, len(rows), _COPY_ROWS)))
    _write_npy(path / "labels.npy", np.dtype(np.int32), (len(rows),), [np.take(labels, rows)])
    _write_npy(path / "offsets.npy", offsets.dtype, offsets.shape, [offsets])
    _fsync(path)
    return PartitionSize(users=len(counts), examples=len(rows))


def _write_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...],
               blocks: Iterable[np.ndarray]) -> None:
    """An ``.npy`` file, byte for byte as ``np.save`` writes it, from C-ordered blocks of rows
    (so the whole array need not be in memory at once), fsynced."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                "shape": shape})
        for block in blocks:
            f.write(np.ascontiguousarray(block, dtype=dtype).data)
        f.flush()
        os.fsync(f.fileno())


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
