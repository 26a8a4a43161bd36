"""Tests of confide.client.data against the real reference data sets in ../shared/data."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from confide.client.data import (
    CREDIT_FEATURES,
    CREDIT_STEPS,
    VOCAB,
    VOCAB_SIZE,
    ArrayDataset,
    PartitionSpec,
    Standardizer,
    char_sequences,
    credit_sequences,
    decode,
    default_data_dir,
    encode,
    label_skew,
    load_credit,
    load_csv,
    load_mnist,
    load_shakespeare_roles,
    parse_speeches,
    partition_dirichlet,
    partition_iid,
    partition_natural,
    partition_shards,
    resolve,
    role_datasets,
    split_by_role,
    train_test_split,
)
from confide.errors import ConfigError, DataFormatError, DataNotFoundError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPEC_FIX = "use one of iid, dirichlet:ALPHA (ALPHA > 0), shards:N (N >= 1), natural"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(scope="module")
def mnist_labels() -> np.ndarray:
    return load_mnist("train").y


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    return (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each part is sorted and has no duplicates"
    joined = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    assert np.array_equal(np.sort(joined), np.arange(n))


def write_idx(path: Path, magic: int, array: np.ndarray, compress: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


# --- paths ---------------------------------------------------------------


def test_default_data_dir_finds_shared_data_beside_the_checkout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CONFIDE_DATA_DIR", raising=False)
    assert default_data_dir().resolve() == DATA.resolve()


def test_env_var_overrides_default_and_must_exist(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CONFIDE_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv("CONFIDE_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        default_data_dir()


def test_resolve_names_missing_file_and_fix(tmp_path: Path) -> None:
    assert resolve(DATA, "mnist") == DATA / "mnist"
    with pytest.raises(DataNotFoundError) as err:
        resolve(tmp_path, "mnist", "train-images-idx3-ubyte.gz")
    assert "train-images-idx3-ubyte.gz" in str(err.value)
    assert "--data-dir" in str(err.value) and "CONFIDE_DATA_DIR" in str(err.value)


# --- arrays ----------------------------------------------------------------


def test_array_dataset_rejects_mismatched_rows() -> None:
    with pytest.raises(DataFormatError, match="same number of rows"):
        ArrayDataset(np.zeros((3, 2)), np.zeros(4))


def test_array_dataset_subset_and_torch_dtypes() -> None:
    ds = ArrayDataset(np.arange(12, dtype=np.float32).reshape(6, 2), np.arange(6, dtype=np.int32))
    sub = ds.subset([4, 1])
    assert len(sub) == 2 and sub.x.tolist() == [[8.0, 9.0], [2.0, 3.0]] and sub.y.tolist() == [4, 1]
    tds = sub.to_torch()
    assert tds.tensors[0].dtype == torch.float32 and tds.tensors[1].dtype == torch.int64
    tokens = ArrayDataset(
        np.ones((2, 3), dtype=np.int64), np.ones((2, 3), dtype=np.int64)
    ).to_torch()
    assert tokens.tensors[0].dtype == torch.int64


# --- MNIST -----------------------------------------------------------------


def test_mnist_train_label_counts_match_readme(mnist_labels: np.ndarray) -> None:
    assert np.bincount(mnist_labels).tolist() == MNIST_TRAIN_COUNTS


def test_mnist_shapes_dtypes_and_normalisation() -> None:
    train, test = load_mnist("train"), load_mnist("test")
    assert train.x.shape == (60000, 1, 28, 28) and train.x.dtype == np.float32
    assert train.y.shape == (60000,) and train.y.dtype == np.int64
    assert test.x.shape == (10000, 1, 28, 28) and len(test) == 10000
    # The constants are MNIST's own pixel mean/std, so the train set comes out ~N(0, 1).
    assert abs(float(train.x.mean())) < 1e-3 and abs(float(train.x.std()) - 1.0) < 1e-3
    assert float(train.x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-6)


def test_mnist_is_cached_read_only_and_subset_is_writable() -> None:
    a, b = load_mnist("train"), load_mnist("train")
    assert a.x is b.x
    with pytest.raises(ValueError):
        a.x[0, 0, 0, 0] = 1.0
    sub = a.subset(np.arange(5))
    sub.x[0, 0, 0, 0] = 1.0
    assert a.x[0, 0, 0, 0] != 1.0
    assert sub.to_torch().tensors[0].shape == (5, 1, 28, 28)


def test_mnist_accepts_folder_that_holds_the_files() -> None:
    direct = load_mnist("test", data_dir=DATA / "mnist")
    assert np.array_equal(direct.y, load_mnist("test", data_dir=DATA).y)


def test_mnist_reads_uncompressed_idx(tmp_path: Path) -> None:
    pixels = np.zeros((2, 28, 28), dtype=np.uint8)
    pixels[1] = 255
    write_idx(tmp_path / "t10k-images-idx3-ubyte", 0x803, pixels, compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", 0x801, np.array([7, 3]), compress=False)
    ds = load_mnist("test", data_dir=tmp_path)
    assert ds.y.tolist() == [7, 3]
    assert float(ds.x[0].max()) == pytest.approx((0 - 0.1307) / 0.3081, rel=1e-6)
    assert float(ds.x[1].min()) == pytest.approx((1 - 0.1307) / 0.3081, rel=1e-6)


def test_mnist_bad_magic_raises_data_format_error(tmp_path: Path) -> None:
    # A labels file saved under the images name: magic 0x801 instead of 0x803.
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", 0x801, np.zeros(4), compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 0x801, np.zeros(4), compress=True)
    with pytest.raises(DataFormatError, match="magic number 0x00000801, expected 0x00000803"):
        load_mnist("train", data_dir=tmp_path)


def test_mnist_truncated_file_raises_data_format_error(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", 0x803, np.zeros((2, 28, 28)), compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", 0x801, np.zeros(2), compress=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match="truncated"):
        load_mnist("test", data_dir=tmp_path)


def test_mnist_missing_folder_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        load_mnist("train", data_dir=tmp_path / "nowhere")


# --- Tiny Shakespeare -------------------------------------------------------


def test_shakespeare_role_count(shakespeare_text: str) -> None:
    """298 roles speak; the README's 892 cannot be reproduced from this file.

    Every paragraph of input.txt starts with a 'NAME:' heading: 7,222 headings,
    309 distinct strings, 308 distinct names once 'LADY  CAPULET' (two spaces)
    is read as LADY CAPULET. 125 headings have no speech after them (the
    ghosts of Richard III act 5, 'TITUS:' in Coriolanus, ...), and 10 names
    only ever have such empty speeches, which leaves 298 roles with text.
    """
    lines = shakespeare_text.split("\n")
    headings = [ln for i, ln in enumerate(lines) if ln and (i == 0 or not lines[i - 1])]
    assert len(headings) == 7222 and all(h.endswith(":") for h in headings)
    assert len(set(headings)) == 309
    assert len({" ".join(h[:-1].split()) for h in headings}) == 308
    roles = load_shakespeare_roles()
    assert len(roles) == 298
    assert len(parse_speeches(shakespeare_text)) == 7222 - 125
    assert "LADY CAPULET" in roles and "LADY  CAPULET" not in roles
    assert "Senators, &C" in roles  # a real heading with a comma and '&'
    assert "Ghost of CLARENCE" not in roles  # only empty speeches
    # Verse lines that end in ':' inside a speech are not speakers.
    assert "Come" not in roles and "Nay, let them follow" not in roles


def test_shakespeare_every_speech_line_goes_to_exactly_one_role(shakespeare_text: str) -> None:
    lines = shakespeare_text.split("\n")
    speech_lines = [ln for i, ln in enumerate(lines) if ln and i > 0 and lines[i - 1]]
    roles = load_shakespeare_roles()
    per_role = [text.split("\n") for text in roles.values()]
    assert sum(len(r) for r in per_role) == len(speech_lines) == 32777 - 7222
    assert sorted(ln for r in per_role for ln in r) == sorted(speech_lines)


def test_shakespeare_role_text_in_order_without_heading() -> None:
    roles = load_shakespeare_roles()
    assert next(iter(roles)) == "First Citizen"
    assert roles["First Citizen"].startswith(
        "Before we proceed any further, hear me speak.\n"
        "You are all resolved rather to die than to famish?\n"
        "First, you know Caius Marcius is chief enemy to the people.\n"
    )
    assert roles["All"].startswith("Speak, speak.\nResolved. resolved.\n")
    assert len(roles["GLOUCESTER"]) == max(len(t) for t in roles.values())


def test_shakespeare_roles_cache_cannot_be_corrupted() -> None:
    roles = load_shakespeare_roles()
    roles["First Citizen"] = "changed"
    again = load_shakespeare_roles(DATA / "tinyshakespeare" / "input.txt")
    assert again["First Citizen"] != "changed"


def test_split_by_role_edge_cases() -> None:
    text = (
        "A PLAY\n\n"  # preamble: not a speech
        "First Lord:\nWhat say you:\nNo more.\n\n"  # 'What say you:' is verse
        "KING RICHARD III:\n\n"  # empty speech
        "O'BRIEN-SMITH JR.:\r\nHello.\r\n\r\n"
        "a continued paragraph\n\n"
        "First  Lord:\nAgain.\n"
    )
    assert split_by_role(text) == {
        "First Lord": "What say you:\nNo more.\nAgain.",
        "O'BRIEN-SMITH JR.": "Hello.\na continued paragraph",
    }
    with pytest.raises(DataFormatError, match="NAME:"):
        split_by_role("no speakers here\n")


def test_vocab_and_encode_decode_round_trip(shakespeare_text: str) -> None:
    assert VOCAB_SIZE == len(VOCAB) == 97
    assert encode("\n").tolist() == [1] and encode(" ~").tolist() == [2, 96]
    ids = encode(shakespeare_text)
    assert ids.dtype == np.int64 and ids.shape == (len(shakespeare_text),)
    assert ids.min() >= 1, "Tiny Shakespeare is all in the vocabulary"
    assert decode(ids) == shakespeare_text
    assert encode("né\tx").tolist() == [VOCAB.index("n"), 0, 0, VOCAB.index("x")]
    assert decode(encode("é")) == VOCAB[0]
    with pytest.raises(DataFormatError):
        decode([VOCAB_SIZE])


def test_char_sequences_are_non_overlapping_and_shifted_by_one() -> None:
    text = "".join(chr(32 + i % 95) for i in range(200))
    ds = char_sequences(text, seq_len=80)
    assert ds.x.shape == ds.y.shape == (2, 80) and ds.x.dtype == ds.y.dtype == np.int64
    ids = encode(text)
    assert np.array_equal(ds.x.reshape(-1), ids[:160])
    assert np.array_equal(ds.y.reshape(-1), ids[1:161])
    assert np.array_equal(ds.y[:, :-1], ds.x[:, 1:])
    assert ds.y[0, -1] == ds.x[1, 0]
    assert char_sequences(text[:81], 80).x.shape == (1, 80)
    assert char_sequences(text[:80], 80).x.shape == (0, 80)
    assert char_sequences("", 80).y.shape == (0, 80)


def test_role_datasets_temporal_split_and_order() -> None:
    roles = load_shakespeare_roles()
    data = role_datasets(roles, seq_len=80, min_sequences=2, test_fraction=0.2)
    sizes = [len(r.train) + len(r.test) for r in data]
    assert sizes == sorted(sizes, reverse=True)
    keys = [(-s, r.role) for s, r in zip(sizes, data, strict=True)]
    assert keys == sorted(keys)
    kept = {r.role for r in data}
    assert kept == {k for k, t in roles.items() if len(char_sequences(t)) >= 2}
    assert data[0].role == "GLOUCESTER"
    for r in data:
        full = char_sequences(roles[r.role])
        n = len(full)
        assert len(r.test) == max(1, math.ceil(0.2 * n - 1e-9))
        assert np.array_equal(np.concatenate([r.train.x, r.test.x]), full.x)
    # 30 sequences -> exactly 6 test (ceil must not round 0.2 * 30 up to 7).
    r30 = role_datasets({"x": "a" * (80 * 30 + 1)})[0]
    assert (len(r30.train), len(r30.test)) == (24, 6)


# --- credit default ---------------------------------------------------------


@pytest.fixture(scope="module")
def credit() -> tuple[ArrayDataset, ArrayDataset]:
    return load_credit(seed=0)


def test_credit_shapes_and_positive_rate(credit: tuple[ArrayDataset, ArrayDataset]) -> None:
    train, test = credit
    assert (CREDIT_STEPS, CREDIT_FEATURES) == (6, 8)
    assert train.x.shape == (24000, 6, 8) and test.x.shape == (6000, 6, 8)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    y = np.concatenate([train.y, test.y])
    assert len(y) == 30000
    assert y.mean() == pytest.approx(0.2212)
    assert train.y.mean() == pytest.approx(0.221, abs=0.01)


def test_credit_standardised_with_training_statistics_only(
    credit: tuple[ArrayDataset, ArrayDataset],
) -> None:
    train, test = credit
    flat = train.x.reshape(-1, CREDIT_FEATURES).astype(np.float64)
    np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(flat.std(axis=0), 1.0, atol=1e-4)
    # Recompute from the raw table: test rows use the train rows' mean and std.
    raw = credit_sequences(load_csv(DATA / "credit-default" / "UCI_Credit_Card.csv.gz", "default"))
    tr_idx, te_idx = train_test_split(30000, 0.2, 0)
    scaler = Standardizer.fit(raw[tr_idx])
    np.testing.assert_allclose(test.x, scaler.transform(raw[te_idx]), rtol=1e-6, atol=1e-6)
    refit = Standardizer.fit(raw[te_idx])
    assert not np.allclose(refit.mean, scaler.mean)
    test_means = np.abs(test.x.reshape(-1, CREDIT_FEATURES).mean(axis=0))
    assert test_means.max() > 1e-3, "test rows were not refitted to mean 0"


def test_credit_steps_are_chronological() -> None:
    table = load_csv(DATA / "credit-default" / "UCI_Credit_Card.csv.gz", "default")
    seq = credit_sequences(table)
    # Row 1 of the file: PAY_0=2 .. PAY_6=-2, BILL_AMT1=3913, PAY_AMT2=689.
    assert seq[0, 0].tolist() == [-2, 0, 0, 20000, 2, 2, 1, 24]  # month 6 first
    assert seq[0, 4].tolist() == [2, 3102, 689, 20000, 2, 2, 1, 24]  # month 2
    assert seq[0, 5].tolist() == [2, 3913, 0, 20000, 2, 2, 1, 24]  # month 1 (PAY_0) last
    assert table.classes == [0, 1]


def test_credit_reads_a_csv_path_with_another_label_name(tmp_path: Path) -> None:
    header = ["ID", "LIMIT_BAL", "SEX", "EDUCATION", "MARRIAGE", "AGE", "PAY_0"]
    header += [f"PAY_{k}" for k in range(2, 7)] + [f"BILL_AMT{k}" for k in range(1, 7)]
    header += [f"PAY_AMT{k}" for k in range(1, 7)] + ["default.payment.next.month"]
    rows = [
        [str(i)] + [str(i * 10 + j) for j in range(len(header) - 2)] + [str(i % 2)]
        for i in range(10)
    ]
    path = tmp_path / "clients.csv"
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    train, test = load_credit(path, test_fraction=0.3, seed=1)
    assert train.x.shape == (7, 6, 8) and test.x.shape == (3, 6, 8)


def test_load_csv_categorical_and_string_labels(tmp_path: Path) -> None:
    text = "age,colour,outcome\n30,red,yes\n40,blue,no\n50,red,maybe\n60,green,no\n"
    for name, data in (("t.csv", text.encode()), ("t.csv.gz", gzip.compress(text.encode()))):
        (tmp_path / name).write_bytes(data)
        table = load_csv(tmp_path / name, "outcome", categorical=["colour"])
        assert table.feature_names == ["age", "colour=blue", "colour=green", "colour=red"]
        assert table.features.dtype == np.float64
        assert table.features.tolist() == [
            [30, 0, 0, 1],
            [40, 1, 0, 0],
            [50, 0, 0, 1],
            [60, 0, 1, 0],
        ]
        assert table.classes == ["maybe", "no", "yes"]
        assert table.labels.tolist() == [2, 1, 0, 1] and table.labels.dtype == np.int64


def test_load_csv_numeric_labels_sort_as_numbers(tmp_path: Path) -> None:
    (tmp_path / "n.csv").write_text("x,y\n1,10\n2,2\n3,1\n4,2.0\n")
    table = load_csv(tmp_path / "n.csv", "y")
    assert table.classes == [1, 2, 10] and table.labels.tolist() == [2, 1, 0, 1]


def test_load_csv_missing_label_names_the_column(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError) as err:
        load_csv(tmp_path / "m.csv", "target")
    assert err.value.field == "label"
    assert "'target'" in str(err.value) and "columns: a, b" in str(err.value)
    assert "existing column" in str(err.value)


def test_load_csv_non_numeric_cell_names_file_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("a,b,y\n1,2,0\n3,oops,1\n")
    with pytest.raises(DataFormatError) as err:
        load_csv(tmp_path / "bad.csv", "y")
    msg = str(err.value)
    assert "bad.csv" in msg and "line 3" in msg and "'b'" in msg and "'oops'" in msg


def test_train_test_split_is_seeded_and_disjoint() -> None:
    tr, te = train_test_split(100, 0.25, seed=3)
    assert len(te) == 25 and np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(100))
    assert np.array_equal(train_test_split(100, 0.25, seed=3)[1], te)
    assert not np.array_equal(train_test_split(100, 0.25, seed=4)[1], te)


def test_standardizer_constant_column_has_unit_scale() -> None:
    scaler = Standardizer.fit(np.array([[1.0, 5.0], [3.0, 5.0]]))
    assert scaler.std.tolist() == [1.0, 1.0]
    assert scaler.transform([[2.0, 5.0]]).tolist() == [[0.0, 0.0]]
    assert scaler.transform([[2.0, 5.0]]).dtype == np.float32


# --- partitioners -----------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_partition_iid_covers_every_index_once(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 500))
    num_parts = data.draw(st.integers(1, min(n, 30)))
    seed = data.draw(st.integers(0, 2**32 - 1))
    parts = partition_iid(n, num_parts, seed)
    assert len(parts) == num_parts
    assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_partition_dirichlet_covers_every_index_once(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 400))
    labels = np.array(data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)))
    num_parts = data.draw(st.integers(1, 12))
    alpha = data.draw(st.floats(0.01, 100.0))
    seed = data.draw(st.integers(0, 2**32 - 1))
    parts = partition_dirichlet(labels, num_parts, alpha, seed, min_size=0)
    assert len(parts) == num_parts
    assert_exact_cover(parts, n)


def test_dirichlet_every_site_gets_min_size(mnist_labels: np.ndarray) -> None:
    parts = partition_dirichlet(mnist_labels, 10, 0.1, seed=0, min_size=50)
    assert_exact_cover(parts, 60000)
    assert min(len(p) for p in parts) >= 50


def test_dirichlet_impossible_min_size_raises_config_error() -> None:
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(ConfigError, match="larger alpha") as err:
        partition_dirichlet(labels, 5, 0.01, seed=0, min_size=4)
    assert err.value.field == "partition"


def test_dirichlet_skew_grows_as_alpha_shrinks(mnist_labels: np.ndarray) -> None:
    skew_01 = label_skew(mnist_labels, partition_dirichlet(mnist_labels, 10, 0.1, seed=0), 10)
    skew_10 = label_skew(mnist_labels, partition_dirichlet(mnist_labels, 10, 10.0, seed=0), 10)
    skew_iid = label_skew(mnist_labels, partition_iid(60000, 10, seed=0), 10)
    assert skew_iid < 0.03 < skew_10 < 0.2 < 0.5 < skew_01 < 1.0


def test_label_skew_known_values() -> None:
    labels = np.array([0, 0, 1, 1])
    assert label_skew(labels, [np.array([0, 2]), np.array([1, 3])], 2) == 0.0
    assert label_skew(labels, [np.array([0, 1]), np.array([2, 3])], 2) == 0.5


def test_shards_two_classes_per_site_on_mnist(mnist_labels: np.ndarray) -> None:
    parts = partition_shards(mnist_labels, 100, 2, seed=0)
    assert len(parts) == 100
    assert_exact_cover(parts, 60000)
    assert max(len(np.unique(mnist_labels[p])) for p in parts) <= 2
    assert all(560 <= len(p) <= 640 for p in parts)


def test_shards_with_fewer_shards_than_classes_still_cover(mnist_labels: np.ndarray) -> None:
    parts = partition_shards(mnist_labels, 3, 1, seed=0)
    assert_exact_cover(parts, 60000)


def test_shards_tiny_class_keeps_every_site_non_empty() -> None:
    labels = np.array([0] * 50 + [1])
    parts = partition_shards(labels, 10, 1, seed=0)
    assert_exact_cover(parts, 51)
    assert min(len(p) for p in parts) >= 1


def test_natural_one_part_per_group_in_first_appearance_order() -> None:
    parts = partition_natural(["b", "a", "b", ("c", 1), "a"])
    assert [p.tolist() for p in parts] == [[0, 2], [1, 4], [3]]


def test_natural_partition_of_shakespeare_speeches(shakespeare_text: str) -> None:
    speakers = [role for role, _ in parse_speeches(shakespeare_text)]
    parts = partition_natural(speakers)
    assert len(parts) == 298
    assert_exact_cover(parts, len(speakers))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "shards:2"])
def test_partitioners_are_seeded(spec: str, mnist_labels: np.ndarray) -> None:
    s = PartitionSpec.parse(spec)
    a, b, c = (s.apply(mnist_labels, 20, seed) for seed in (7, 7, 8))
    assert_exact_cover(a, 60000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_partition_spec_parse_and_str() -> None:
    assert PartitionSpec.parse("iid") == PartitionSpec(kind="iid")
    assert PartitionSpec.parse("dirichlet:0.5").alpha == 0.5
    assert PartitionSpec.parse(" Shards:2 ").classes_per_part == 2
    assert PartitionSpec.parse("natural").kind == "natural"
    assert [str(PartitionSpec.parse(s)) for s in ("iid", "dirichlet:0.5", "shards:2")] == [
        "iid",
        "dirichlet:0.5",
        "shards:2",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "random",
        "iid:3",
        "dirichlet",
        "dirichlet:",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:abc",
        "dirichlet:nan",
        "dirichlet:inf",
        "shards",
        "shards:0",
        "shards:1.5",
        "natural:x",
    ],
)
def test_partition_spec_parse_errors(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        PartitionSpec.parse(text)
    assert err.value.field == "partition"
    assert err.value.fix == SPEC_FIX


def test_partition_spec_in_a_pydantic_config() -> None:
    class Sim(BaseModel):
        partition: PartitionSpec

    assert Sim.model_validate({"partition": "dirichlet:0.3"}).partition.alpha == 0.3
    as_dict = Sim.model_validate({"partition": {"kind": "shards", "classes_per_part": 3}})
    assert as_dict.partition.classes_per_part == 3


def test_natural_spec_needs_groups_matching_sites() -> None:
    spec = PartitionSpec.parse("natural")
    labels = np.zeros(4, dtype=np.int64)
    with pytest.raises(ConfigError, match="groups"):
        spec.apply(labels, 2, seed=0)
    parts = spec.apply(labels, 2, seed=0, groups=["x", "y", "x", "y"])
    assert [p.tolist() for p in parts] == [[0, 2], [1, 3]]
    with pytest.raises(ConfigError) as err:
        spec.apply(labels, 3, seed=0, groups=["x", "y", "x", "y"])
    assert err.value.field == "num_parts"
