"""Per-user dataset storage: synthetic data, import from CSV/Parquet, per-user split."""

from __future__ import annotations

import hmac
import json
from hashlib import sha256
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from engine.datastore import (
    Partition,
    generate_synthetic,
    import_dataset,
    load_schema,
    open_partition,
)
from engine.datastore import _evaluation_threshold as evaluation_threshold

KEY = b"owner split key"


def read_table(path: Path) -> pa.Table:
    return pq.read_table(path) if path.suffix == ".parquet" else pa_csv.read_csv(path)


def import_(source: Path, dest: Path, **kwargs):  # type: ignore[no-untyped-def]
    options = {"name": "demo", "user_column": "user_id", "label_column": "label",
               "split_key": KEY, **kwargs}
    return import_dataset(source, dest, **options)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "users.parquet"
    return generate_synthetic(path, users=300, seed=3)


# --- synthetic generator ----------------------------------------------------------------------


def test_synthetic_columns_users_and_example_counts(synthetic: Path) -> None:
    table = read_table(synthetic)
    assert table.column_names == ["user_id", "label"] + [f"f{j}" for j in range(60)]
    assert table.schema.field("label").type == pa.int32()
    assert table.schema.field("f0").type == pa.float32()
    counts = table.group_by("user_id").aggregate([("label", "count")])
    assert counts.num_rows == 300
    assert sorted(counts["user_id"].to_pylist())[:2] == ["u000000", "u000001"]
    assert min(counts["label_count"].to_pylist()) >= 5
    assert max(counts["label_count"].to_pylist()) <= 200
    assert set(table["label"].to_pylist()) <= set(range(10))


def test_synthetic_is_deterministic_per_seed(tmp_path: Path, synthetic: Path) -> None:
    again = generate_synthetic(tmp_path / "again.parquet", users=300, seed=3)
    other = generate_synthetic(tmp_path / "other.parquet", users=300, seed=4)
    assert read_table(again).equals(read_table(synthetic))
    assert not read_table(other).equals(read_table(synthetic))


def test_synthetic_users_are_not_identically_distributed(synthetic: Path) -> None:
    """Synthetic(1, 1): users differ in label mix (own model) and feature means (own v_u)."""
    table = read_table(synthetic)
    users = np.unique(table["user_id"].to_numpy(zero_copy_only=False), return_inverse=True)[1]
    labels = table["label"].to_numpy()
    f0 = table["f0"].to_numpy()
    overall = np.bincount(labels, minlength=10) / len(labels)
    total_variation, user_means = [], []
    for u in range(users.max() + 1):
        mine = users == u
        mix = np.bincount(labels[mine], minlength=10) / mine.sum()
        total_variation.append(0.5 * np.abs(mix - overall).sum())
        user_means.append(f0[mine].mean())
    assert np.mean(total_variation) > 0.4  # an IID split of this size would be near 0.15
    # Feature 0 has within-user std 1; user means spread with std sqrt(β² + 1) ≈ 1.4.
    assert np.std(user_means) > 1.0


def _accuracy_on_unseen_users(path: Path) -> float:
    """Least-squares linear classifier fit on the first 200 users, scored on the rest."""
    table = read_table(path)
    x = np.stack([table[f"f{j}"].to_numpy() for j in range(60)] + [np.ones(table.num_rows)], 1)
    y = table["label"].to_numpy()
    seen = np.array([int(u[1:]) < 200 for u in table["user_id"].to_pylist()])
    w = np.linalg.lstsq(x[seen], np.eye(10)[y[seen]], rcond=None)[0]
    return float(np.mean(np.argmax(x[~seen] @ w, 1) == y[~seen]))


def test_only_a_shared_model_makes_unseen_users_predictable(tmp_path: Path,
                                                            synthetic: Path) -> None:
    shared = generate_synthetic(tmp_path / "shared.parquet", users=300, seed=3,
                                global_model_std=3.0)
    assert _accuracy_on_unseen_users(synthetic) < 0.15  # Synthetic(1, 1): chance level
    assert _accuracy_on_unseen_users(shared) > 0.3


def test_synthetic_csv_has_the_same_content(tmp_path: Path, synthetic: Path) -> None:
    csv = generate_synthetic(tmp_path / "users.csv", users=300, seed=3, format="csv")
    from_csv, from_parquet = read_table(csv), read_table(synthetic)
    assert from_csv["user_id"].to_pylist() == from_parquet["user_id"].to_pylist()
    assert np.array_equal(from_csv["f7"].to_numpy().astype(np.float32),
                          from_parquet["f7"].to_numpy())


# --- import -----------------------------------------------------------------------------------


def test_import_writes_the_layout_and_schema(tmp_path: Path, synthetic: Path) -> None:
    schema = import_(synthetic, tmp_path / "ds")
    assert load_schema(tmp_path / "ds") == schema
    saved = json.loads((tmp_path / "ds" / "schema.json").read_text())
    assert set(saved) == {"name", "user_id_column", "label_column", "feature_columns",
                          "num_features", "num_classes", "partitions"}
    assert schema.num_features == 60 and schema.num_classes == 10
    assert schema.feature_columns == tuple(f"f{j}" for j in range(60))
    table = read_table(synthetic)
    training, evaluation = schema.partitions["training"], schema.partitions["evaluation"]
    assert training.users + evaluation.users == 300
    assert training.examples + evaluation.examples == table.num_rows
    for name in ("training", "evaluation"):
        files = sorted(p.name for p in (tmp_path / "ds" / name).iterdir())
        assert files == ["features.npy", "labels.npy", "offsets.npy"]


def test_split_follows_the_keyed_hash_of_user_ids(tmp_path: Path, synthetic: Path) -> None:
    schema = import_(synthetic, tmp_path / "ds", evaluation_fraction=0.25)
    table = read_table(synthetic)
    ids, counts = np.unique(table["user_id"].to_numpy(zero_copy_only=False),
                            return_counts=True)
    held_out = np.array([
        int.from_bytes(hmac.new(KEY, uid.encode(), sha256).digest()[:8], "big") / 2**64 < 0.25
        for uid in ids
    ])
    evaluation = open_partition(tmp_path / "ds", "evaluation")
    training = open_partition(tmp_path / "ds", "training")
    # Users are stored in user-id order, so per-user sizes identify the assignment exactly.
    assert np.array_equal(np.diff(evaluation.offsets), counts[held_out])
    assert np.array_equal(np.diff(training.offsets), counts[~held_out])
    assert schema.partitions["evaluation"].users == held_out.sum()


def test_split_is_deterministic_and_depends_on_the_key(tmp_path: Path, synthetic: Path) -> None:
    first = import_(synthetic, tmp_path / "a")
    second = import_(synthetic, tmp_path / "b")
    other_key = import_(synthetic, tmp_path / "c", split_key=b"another key")
    assert first.partitions == second.partitions
    assert first.partitions != other_key.partitions
    a, b = (open_partition(tmp_path / d, "evaluation") for d in ("a", "b"))
    assert np.array_equal(a.features, b.features) and np.array_equal(a.offsets, b.offsets)


def test_each_user_rows_are_grouped_in_file_order(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "rows.csv", "user,y,a,b\n"
                       "bob,1,1,10\nann,0,2,20\nbob,0,3,30\nann,1,4,40\ncid,1,5,50\n")
    schema = import_(source, tmp_path / "ds", user_column="user", label_column="y",
                     evaluation_fraction=0.0)
    assert schema.feature_columns == ("a", "b")
    part = open_partition(tmp_path / "ds", "training")
    assert part.users == 3
    rows = [part.user_examples(i) for i in range(3)]  # ann, bob, cid
    assert [x[:, 0].tolist() for x, _ in rows] == [[2, 4], [1, 3], [5]]
    assert [y.tolist() for _, y in rows] == [[0, 1], [1, 0], [1]]
    with pytest.raises(IndexError):
        part.user_examples(3)


def test_users_are_in_code_point_order_of_their_ids(tmp_path: Path) -> None:
    """The order Python's ``sorted`` gives the ids as text, whatever their script."""
    ids = ["z", "é", "Ä", "a", "\U0001F600", "ab", "ä", "B"]
    source = write_csv(tmp_path / "ids.csv", "user_id,label,x\n" + "".join(
        f"{uid},{row % 2},{row}\n" for row, uid in enumerate(ids)))
    import_(source, tmp_path / "ds", evaluation_fraction=0.0)
    part = open_partition(tmp_path / "ds", "training")
    assert part.features[:, 0].tolist() == [ids.index(uid) for uid in sorted(ids)]


def test_rows_are_grouped_stably_with_more_users_than_16_bits_count(tmp_path: Path) -> None:
    owners = np.random.default_rng(0).permutation(np.repeat(np.arange(70_000), 3))
    rows = np.arange(len(owners))
    pq.write_table(pa.table({"user_id": owners, "label": rows % 2, "row": rows.astype(float)}),
                   tmp_path / "many.parquet")
    import_(tmp_path / "many.parquet", tmp_path / "ds", evaluation_fraction=0.0)
    part = open_partition(tmp_path / "ds", "training")
    ids_as_text = owners.astype(str)  # integer ids are grouped by their decimal text
    assert np.array_equal(part.features[:, 0], np.argsort(ids_as_text, kind="stable"))
    assert np.array_equal(np.diff(part.offsets), np.full(70_000, 3))


@pytest.mark.parametrize("fraction", [0.0, 5e-324, 2**-64, 3 * 2**-65, 1e-9, 0.2, 0.5,
                                      1 - 2**-53])
def test_the_split_threshold_is_the_division_rule_exactly(fraction: float) -> None:
    """A user is held out iff ``prefix / 2**64 < fraction`` (Python's rounded division);
    the import compares the prefix with a threshold: the least prefix that is not."""
    threshold = evaluation_threshold(fraction)
    assert not threshold / 2**64 < fraction
    assert threshold == 0 or (threshold - 1) / 2**64 < fraction


def test_csv_and_parquet_imports_agree(tmp_path: Path, synthetic: Path) -> None:
    csv = generate_synthetic(tmp_path / "users.csv", users=300, seed=3, format="csv")
    import_(csv, tmp_path / "from_csv")
    import_(synthetic, tmp_path / "from_parquet")
    for name in ("training", "evaluation"):
        a = open_partition(tmp_path / "from_csv", name)
        b = open_partition(tmp_path / "from_parquet", name)
        assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.labels, b.labels)
        assert np.array_equal(a.features, b.features)


def test_partitions_are_read_only_memory_maps(tmp_path: Path, synthetic: Path) -> None:
    import_(synthetic, tmp_path / "ds")
    part = open_partition(tmp_path / "ds", "training")
    assert isinstance(part.features, np.memmap) and isinstance(part.labels, np.memmap)
    features, labels = part.user_examples(0)
    assert features.dtype == np.float32 and labels.dtype == np.int32
    with pytest.raises(ValueError):
        features[0, 0] = 1.0


def test_explicit_feature_columns_and_class_count(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "rows.csv", "u,y,a,b,c\nx,0,1,2,3\nz,1,4,5,6\n")
    schema = import_(source, tmp_path / "ds", user_column="u", label_column="y",
                     feature_columns=["c", "a"], num_classes=4, evaluation_fraction=0.0)
    assert schema.feature_columns == ("c", "a") and schema.num_classes == 4
    features, _ = open_partition(tmp_path / "ds", "training").user_examples(0)
    assert features.tolist() == [[3.0, 1.0]]


def test_integer_user_ids_are_accepted(tmp_path: Path) -> None:
    source = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"uid": [7, 3, 7], "label": [0, 1, 1], "x": [1.0, 2.0, 3.0]}),
                   source)
    schema = import_(source, tmp_path / "ds", user_column="uid", evaluation_fraction=0.0)
    assert schema.partitions["training"].users == 2


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "options", "message"), [
    ("user_id,label,f0\nu1,0,1\n", {"label_column": "y"}, "column 'y' not found"),
    ("user_id,label,f0\nu1,0,1\nu2,-1,2\n", {}, r"value -1 outside \[0, .*data row 1"),
    ("user_id,label,f0\nu1,0,1\nu2,5,2\n", {"num_classes": 3}, r"outside \[0, 3\) at data row 1"),
    ("user_id,label,f0\nu1,0.5,1\nu2,1,2\n", {}, "non-integer value at data row 0"),
    ("user_id,label,f0\nu1,0,1\nu2,1,inf\n", {}, "'f0' has a non-finite value .* row 1"),
    ("user_id,label,f0\nu1,0,1\nu2,1,1e300\n", {}, "'f0' has a non-finite value"),
    ("user_id,label,f0\nu1,0,1\n,1,2\n", {}, "empty user id at data row 1"),
    ("user_id,label,f0\nu1,0,\nu2,1,2\n", {}, "'f0' has missing values .* row 0"),
    ("user_id,label,f0,s\nu1,0,1,a\n", {"feature_columns": ["s"]}, "'s' is not numeric"),
    ("user_id,label,s\nu1,0,a\nu2,1,b\n", {}, "column 's' is not numeric .*data row 0 holds 'a'"),
    ("user_id,label,f0\nu1,0,1\n", {}, "at least 2 classes"),
    ("user_id,label,f0\n", {}, "has no rows"),
])
def test_bad_input_is_refused_with_a_precise_message(
    tmp_path: Path, text: str, options: dict[str, object], message: str
) -> None:
    source = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match=message):
        import_(source, tmp_path / "ds", **options)
    assert not (tmp_path / "ds").exists()


def test_a_column_with_one_non_numeric_cell_is_refused_not_silently_dropped(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "typo.csv", "user_id,label,f0,f1\nu1,0,1,2\nu2,1,3,4x\n"
                                              "u3,1,5,6\n")
    with pytest.raises(ValueError, match=r"column 'f1' is not numeric \(string\): data row 1 "
                                         r"holds '4x'.*--feature-columns"):
        import_(source, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    schema = import_(source, tmp_path / "ds", feature_columns=["f0"])  # leaving it out: explicit
    assert schema.feature_columns == ("f0",)


def test_a_stray_large_label_does_not_make_a_million_classes(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "stray.csv", "user_id,label,f0\nu1,0,1\nu2,1,2\nu3,1000000,3\n")
    with pytest.raises(ValueError, match=r"would give 1000001 classes \(its largest label 1000000 "
                                         r"is at data row 2\) but label 2 never occurs.*--num-classes"):
        import_(source, tmp_path / "ds")
    with pytest.raises(ValueError, match=r"value 1000000 outside \[0, 2\) at data row 2"):
        import_(source, tmp_path / "ds", num_classes=2)  # the owner declares the label set
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(("text", "message"), [
    ("user_id,label,f0,f1\nu1,0,1,\nu2,1,inf,4\n", "'f0' has a non-finite value .* row 1"),
    ("user_id,label,f0,f1\nu1,0,1,1e300\nu2,1,,4\n", "'f0' has missing values .* row 1"),
    ("user_id,label,f0,f1\nu1,0,1,1e300\nu2,1,2,\n", "'f1' has missing values .* row 1"),
    ("user_id,label,f0,f1\nu1,0,1,1e300\nu2,1,2,4\n", "'f1' has a non-finite value .* row 0"),
])
def test_the_first_bad_feature_column_is_named_whatever_is_wrong(tmp_path: Path, text: str,
                                                                  message: str) -> None:
    with pytest.raises(ValueError, match=message):
        import_(write_csv(tmp_path / "bad.csv", text), tmp_path / "ds")


def test_duplicate_column_names_are_refused_naming_the_columns(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "twice.csv", "user_id,label,f0,f0\nu1,0,1,2\nu2,1,3,4\n")
    with pytest.raises(ValueError, match=r"column name 'f0' appears 2 times in the header "
                                         r"\(columns 3, 4\)"):
        import_(source, tmp_path / "ds")
    labels_twice = write_csv(tmp_path / "labels.csv", "user_id,label,label\nu1,0,1\nu2,1,0\n")
    with pytest.raises(ValueError, match="column name 'label' appears 2 times"):
        import_(labels_twice, tmp_path / "ds")


def test_failed_import_leaves_nothing_behind(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "one.csv", "user_id,label,f0\nu1,0,1\nu2,1,2\n")
    with pytest.raises(ValueError, match="no users were assigned to the training partition"):
        import_(source, tmp_path / "ds", evaluation_fraction=0.999999)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv"]


def test_existing_destination_and_unknown_formats_are_refused(tmp_path: Path,
                                                             synthetic: Path) -> None:
    (tmp_path / "ds").mkdir()
    with pytest.raises(FileExistsError):
        import_(synthetic, tmp_path / "ds")
    with pytest.raises(ValueError, match="unsupported file type"):
        import_(write_csv(tmp_path / "x.json", "{}"), tmp_path / "other")


def test_mean_user_accuracy_weighs_every_user_equally() -> None:
    # User 0 has 2 examples (1 right), user 1 has 3 (all right): per user 0.5 and 1.0, mean
    # 0.75, where pooling the examples would give 4/5.
    partition = Partition(features=np.zeros((5, 1), np.float32),
                          labels=np.array([1, 2, 0, 0, 0]), offsets=np.array([0, 2, 5]))
    assert partition.mean_user_accuracy(np.array([1, 0, 0, 0, 0])) == 0.75
