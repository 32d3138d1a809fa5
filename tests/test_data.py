"""Data sources and the split."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from edgeopt.data import load_data, read_idx
from edgeopt.errors import DataError
from tests.conftest import shared_path


def write_idx(path, array, compress):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def test_digits_split_is_deterministic_and_stratified():
    first = load_data("digits", seed=1)
    again = load_data("digits", seed=1)
    other = load_data("digits", seed=2)
    assert (len(first.train), len(first.val), len(first.test)) == (1257, 180, 360)
    assert np.array_equal(first.test.x, again.test.x)
    assert not np.array_equal(first.test.x, other.test.x)
    counts = np.bincount(first.test.y, minlength=10)
    assert counts.min() >= 34
    assert counts.max() <= 38
    assert first.train.x.dtype == np.float32
    assert first.train.x.min() == 0.0
    assert first.train.x.max() == 1.0


def test_split_parts_do_not_overlap():
    data = load_data("digits", seed=0)
    rows = {x.tobytes() for x in data.train.x}
    overlap = sum(x.tobytes() in rows for x in data.test.x)
    # scikit-learn's digits contain a few duplicate images; the parts themselves are disjoint.
    assert overlap <= 3


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_plain_and_gzipped(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 5, 7), dtype=np.uint8)
    labels = np.repeat(np.arange(3, dtype=np.uint8), 20)
    write_idx(tmp_path / "train-images-idx3-ubyte", images, compress)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress)
    data = load_data(f"mnist:{tmp_path}", seed=0)
    assert data.input_shape == (1, 5, 7)
    assert data.num_classes == 3
    assert len(data.train) + len(data.val) + len(data.test) == 60
    originals = {img.tobytes(): label for img, label in zip(images, labels, strict=True)}
    for x, y in zip(data.train.x, data.train.y, strict=True):
        raw = np.rint(x[0] * 255).astype(np.uint8)
        assert originals[raw.tobytes()] == y


def test_truncated_idx_is_rejected(tmp_path):
    path = write_idx(tmp_path / "x-images-idx3-ubyte", np.zeros((4, 3, 3), np.uint8), False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(path)


def test_real_mnist_test_set_counts():
    folder = shared_path("datasets", "mnist")
    data = load_data(f"mnist:{folder}", seed=0)
    total = np.bincount(np.concatenate([data.train.y, data.val.y, data.test.y]))
    assert total.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert data.input_shape == (1, 28, 28)
    assert data.raw_scale == 255.0


def test_npz_channels_last_is_transposed(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 6, 5, 3), dtype=np.uint8)
    y = np.arange(40) % 2
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data(f"npz:{tmp_path / 'd.npz'}")
    assert data.input_shape == (3, 6, 5)
    sample = data.train.x[0]
    assert sample.max() <= 1.0


def test_npz_with_nan_is_rejected(tmp_path):
    x = np.ones((30, 4), np.float32)
    x[7, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(30) % 3)
    with pytest.raises(DataError, match=r"1 sample\(s\) contain NaN or infinite values"):
        load_data(f"npz:{tmp_path / 'nan.npz'}")


def test_npz_missing_arrays_named(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 2)))
    with pytest.raises(DataError, match="no array named x, y"):
        load_data(f"npz:{tmp_path / 'bad.npz'}")


def test_npz_object_arrays_are_not_unpickled(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    with pytest.raises(DataError, match="cannot read"):
        load_data(f"npz:{tmp_path / 'obj.npz'}")


def test_vector_data_is_standardised_with_training_statistics(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, (200, 4)).astype(np.float32)
    np.savez(tmp_path / "v.npz", x=x, y=(x[:, 0] > 5).astype(int))
    data = load_data(f"npz:{tmp_path / 'v.npz'}")
    assert data.kind == "vector"
    np.testing.assert_allclose(data.train.x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.train.x.std(axis=0), 1.0, atol=1e-4)
    assert len(data.preprocessing["mean"]) == 4


def test_image_folder(tmp_path):
    for label, value in (("cat", 30), ("dog", 200)):
        (tmp_path / label).mkdir()
        for i in range(8):
            Image.fromarray(np.full((6, 9), value + i, np.uint8)).save(
                tmp_path / label / f"{i}.png"
            )
    data = load_data(f"folder:{tmp_path}")
    assert data.class_names == ["cat", "dog"]
    assert data.input_shape == (1, 6, 9)
    for x, y in zip(data.train.x, data.train.y, strict=True):
        raw = round(float(x[0, 0, 0]) * 255)
        assert raw in (range(30, 38) if y == 0 else range(200, 208))


def test_csv_encodes_text_and_fills_missing_numbers(tmp_path):
    rows = ["age,city,score,label"]
    for i in range(30):
        age = "" if i == 4 else str(20 + i)
        rows.append(f"{age},{'paris' if i % 2 else 'oslo'},{i * 0.5},{'yes' if i % 3 else 'no'}")
    (tmp_path / "t.csv").write_text("\n".join(rows))
    data = load_data(f"csv:{tmp_path / 't.csv'}", label="label")
    assert data.class_names == ["no", "yes"]
    assert data.preprocessing["features"] == ["age", "city=oslo", "city=paris", "score"]
    assert data.input_shape == (4,)


def test_csv_without_label_option():
    with pytest.raises(DataError, match="--label COLUMN"):
        load_data("csv:pyproject.toml")


def test_csv_unknown_label_column(tmp_path):
    (tmp_path / "t.csv").write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(DataError, match="label column 'c' not in"):
        load_data(f"csv:{tmp_path / 't.csv'}", label="c")


def test_real_telco_csv_loads_with_blank_total_charges():
    path = shared_path("datasets", "tabular", "WA_Fn-UseC_-Telco-Customer-Churn.csv")
    data = load_data(f"csv:{path}", label="Churn")
    assert len(data.train) + len(data.val) + len(data.test) == 7043
    assert data.class_names == ["No", "Yes"]
    assert "customerID" not in " ".join(data.preprocessing["features"])
    assert np.isfinite(data.train.x).all()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("imagenet", "unknown data source 'imagenet'"),
        ("npz:", "needs a path"),
        ("npz:/nonexistent/x.npz", "npz file not found: /nonexistent/x.npz"),
        ("mnist:/nonexistent", "MNIST folder not found"),
    ],
)
def test_bad_specs_name_the_value(spec, message):
    with pytest.raises(DataError, match=message):
        load_data(spec)


def test_empty_class_folder_is_named(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "cat" / "a.png")
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"class folder {tmp_path / 'dog'} contains no images"):
        load_data(f"folder:{tmp_path}")
