"""Data sources and the deterministic train/validation/test split.

A data spec is a string, as on the command line:

- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images), the default.
- ``mnist:DIR``: IDX files (``*-images-idx3-ubyte`` and ``*-labels-idx1-ubyte``, gzipped or not).
- ``npz:FILE``: a NumPy archive with arrays ``x`` and ``y``.
- ``folder:DIR``: one subfolder of images per class.
- ``csv:FILE``: a table with a header row; the label column is given separately.

Images become float32 N×C×H×W arrays scaled to [0, 1]; vectors become float32 N×F arrays
standardised with the training split's mean and standard deviation. Labels become int64 class
indices. The preprocessing applied is recorded so that an app can reproduce it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import struct
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt._logging import get_logger
from edgeopt.errors import DataError

logger = get_logger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MISSING_CSV_VALUES = {"", "?", "na", "n/a", "nan", "null", "none"}
MAX_CATEGORIES = 50


@dataclass
class Split:
    """Inputs `x` (float32, N × sample shape) and integer labels `y` (int64, N)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    """A data source split three ways, with what is needed to build and deploy a model for it.

    Attributes:
        name: the spec it was loaded from.
        kind: "image" (N×C×H×W) or "vector" (N×F).
        input_shape: shape of one sample, without the batch dimension.
        class_names: one name a class, in class-index order.
        preprocessing: how raw inputs become model inputs (layout, scale, mean, std).
        raw_scale: factor from model inputs back to the raw values of the source (255 for
            8-bit images, 16 for scikit-learn digits, 1 for vectors). Used to detect teachers
            that expect raw pixels.
    """

    name: str
    kind: str
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    class_names: list[str]
    preprocessing: dict[str, Any] = field(default_factory=dict)
    raw_scale: float = 1.0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """Return a short hash of the training inputs and labels, for caching trained teachers."""
        digest = hashlib.sha256()
        digest.update(str(self.input_shape).encode())
        digest.update(np.ascontiguousarray(self.train.x).tobytes())
        digest.update(np.ascontiguousarray(self.train.y).tobytes())
        return digest.hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "samples": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "preprocessing": self.preprocessing,
        }


@dataclass
class _Raw:
    x: np.ndarray
    y: np.ndarray
    class_names: list[str]
    kind: str
    raw_scale: float = 1.0
    preprocessing: dict[str, Any] = field(default_factory=dict)


# --- sources ------------------------------------------------------------------------------


def _load_digits() -> _Raw:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    return _Raw(
        x=x,
        y=bunch.target.astype(np.int64),
        class_names=[str(name) for name in bunch.target_names],
        kind="image",
        raw_scale=16.0,
        preprocessing={"layout": "NCHW", "scale": 1 / 16.0, "raw_range": [0, 16]},
    )


def _open_maybe_gzip(path: Path) -> bytes:
    with path.open("rb") as handle:
        head = handle.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX array (the MNIST file format), gzipped or not."""
    payload = _open_maybe_gzip(path)
    if len(payload) < 4 or payload[0] != 0 or payload[1] != 0:
        raise DataError(f"{path} is not an IDX file: its first bytes are not an IDX magic number")
    dtype_code, ndim = payload[2], payload[3]
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise DataError(f"{path} has unknown IDX element type 0x{dtype_code:02x}")
    header_end = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", payload[4:header_end])
    dtype = np.dtype(dtypes[dtype_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(payload) - header_end != expected:
        raise DataError(
            f"{path} is truncated or corrupt: header declares shape {dims} "
            f"({expected} bytes) but {len(payload) - header_end} bytes follow"
        )
    return np.frombuffer(payload, dtype=dtype, offset=header_end).reshape(dims)


def _find_idx(directory: Path, kind: str) -> list[Path]:
    return sorted(
        path
        for path in directory.iterdir()
        if f"-{kind}-idx" in path.name or f"_{kind}_idx" in path.name or f"-{kind}." in path.name
    )


def _load_mnist(directory: Path) -> _Raw:
    if not directory.is_dir():
        raise DataError(f"MNIST folder not found: {directory}: give mnist:DIR with the IDX files")
    image_files = _find_idx(directory, "images")
    label_files = _find_idx(directory, "labels")
    if not image_files or not label_files:
        raise DataError(
            f"no IDX files in {directory}: expected files named like "
            "t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)"
        )
    images, labels = [], []
    for image_file in image_files:
        prefix = image_file.name.split("-images")[0].split("_images")[0]
        matches = [p for p in label_files if p.name.startswith(prefix)]
        if not matches:
            raise DataError(f"no labels file matches {image_file.name} in {directory}")
        x = read_idx(image_file)
        y = read_idx(matches[0])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{image_file.name} and {matches[0].name} do not pair up: images {x.shape}, "
                f"labels {y.shape}"
            )
        images.append(x)
        labels.append(y)
    x = np.concatenate(images).astype(np.float32)[:, None] / 255.0
    y = np.concatenate(labels).astype(np.int64)
    return _Raw(
        x=x,
        y=y,
        class_names=[str(c) for c in range(int(y.max()) + 1)],
        kind="image",
        raw_scale=255.0,
        preprocessing={"layout": "NCHW", "scale": 1 / 255.0, "raw_range": [0, 255]},
    )


def _load_npz(path: Path) -> _Raw:
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        # allow_pickle=False: an archive with object arrays is rejected, never unpickled.
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in ("x", "y") if name not in archive.files]
            if missing:
                raise DataError(
                    f"{path} has no array named {', '.join(missing)}: it contains "
                    f"{', '.join(archive.files) or 'no arrays'}; "
                    "save it with np.savez(FILE, x=..., y=...)"
                )
            x, y = archive["x"], archive["y"]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as a NumPy .npz archive: {exc}") from exc
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)} labels")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: x has dtype {x.dtype}; expected numbers")
    y_indices, class_names = _encode_labels(y, str(path))
    raw_scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = x.astype(np.float32) / raw_scale
    if x.ndim == 2:
        return _Raw(x, y_indices, class_names, "vector")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        logger.info("%s: x looks channels-last %s; transposing to NCHW", path, x.shape)
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    elif x.ndim != 4:
        raise DataError(
            f"{path}: x has shape {x.shape}; expected N×F vectors, N×H×W or N×C×H×W images"
        )
    preprocessing = {"layout": "NCHW", "scale": 1 / raw_scale}
    return _Raw(x, y_indices, class_names, "image", raw_scale, preprocessing)


def _encode_labels(y: np.ndarray, source: str) -> tuple[np.ndarray, list[str]]:
    """Map labels to class indices: integer labels keep their value, others are sorted."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{source}: labels have shape {y.shape}; expected one label per sample")
    if np.issubdtype(y.dtype, np.integer):
        if len(y) and y.min() < 0:
            raise DataError(f"{source}: label {int(y.min())} is negative; use 0..K-1")
        count = int(y.max()) + 1 if len(y) else 0
        return y.astype(np.int64), [str(i) for i in range(count)]
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{source}: labels must be whole class numbers, found {y[:5]}")
        return _encode_labels(y.astype(np.int64), source)
    names = sorted({str(v) for v in y})
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[str(v)] for v in y], dtype=np.int64), names


def _load_folder(directory: Path) -> _Raw:
    from PIL import Image, UnidentifiedImageError

    if not directory.is_dir():
        raise DataError(f"image folder not found: {directory}")
    class_dirs = sorted(p for p in directory.iterdir() if p.is_dir())
    if len(class_dirs) < 2:
        raise DataError(
            f"{directory} needs one subfolder of images per class (at least 2); found "
            f"{len(class_dirs)}"
        )
    files: list[tuple[Path, int]] = []
    for index, class_dir in enumerate(class_dirs):
        found = [p for p in sorted(class_dir.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise DataError(
                f"class folder {class_dir} contains no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}): add images or remove the folder"
            )
        files += [(path, index) for path in found]
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {directory}")
    images = []
    for path, _ in files:
        try:
            with Image.open(path) as image:
                image.load()
                images.append(image.copy())
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
    size = Counter(image.size for image in images).most_common(1)[0][0]
    grey = all(image.mode in ("L", "1", "I;16", "I") for image in images)
    mode = "L" if grey else "RGB"
    resized = sum(image.size != size for image in images)
    if resized:
        logger.warning(
            "%d images of %s resized to the most common size %s", resized, directory, size
        )
    arrays = [np.asarray(image.convert(mode).resize(size), dtype=np.float32) for image in images]
    x = np.stack(arrays) / 255.0
    x = x[:, None] if grey else x.transpose(0, 3, 1, 2)
    y = np.array([label for _, label in files], dtype=np.int64)
    preprocessing = {"layout": "NCHW", "scale": 1 / 255.0, "color": mode, "size": list(size)}
    return _Raw(
        np.ascontiguousarray(x), y, [p.name for p in class_dirs], "image", 255.0, preprocessing
    )


def _load_csv(path: Path, label: str | None) -> _Raw:
    if not path.is_file():
        raise DataError(f"CSV file not found: {path}")
    if not label:
        raise DataError(f"csv:{path} needs the label column: add --label COLUMN")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path} as CSV: {exc}") from exc
    if len(rows) < 2:
        raise DataError(f"{path} has no data rows under its header")

    header = [name.strip() for name in rows[0]]
    if label not in header:
        raise DataError(f"label column {label!r} not in {path}: columns are {', '.join(header)}")
    body = [row for row in rows[1:] if any(cell.strip() for cell in row)]
    bad = next((i for i, row in enumerate(body, start=2) if len(row) != len(header)), None)
    if bad is not None:
        raise DataError(f"{path} line {bad} has a different number of fields than the header")
    columns = list(zip(*body, strict=True))

    label_index = header.index(label)
    labels = np.array([cell.strip() for cell in columns[label_index]])
    if any(value.lower() in MISSING_CSV_VALUES for value in labels):
        raise DataError(f"{path}: label column {label!r} has missing values; drop those rows")
    features, names = [], []
    for index, name in enumerate(header):
        if index == label_index:
            continue
        block, block_names = _encode_column(name, columns[index], path)
        features.append(block)
        names += block_names
    if not features:
        raise DataError(f"{path} has no feature columns besides the label {label!r}")
    x = np.concatenate(features, axis=1).astype(np.float32)
    y, class_names = _encode_labels(labels, f"{path} column {label!r}")
    if np.issubdtype(labels.dtype, np.str_):
        numeric = all(value.lstrip("-").isdigit() for value in labels)
        if numeric:
            y, class_names = _encode_labels(labels.astype(np.int64), f"{path} column {label!r}")
    return _Raw(x, y, class_names, "vector", 1.0, {"layout": "NF", "features": names})


def _encode_column(name: str, cells: tuple[str, ...], path: Path) -> tuple[np.ndarray, list[str]]:
    """Encode one CSV column: numbers as floats (median-filled), text as one-hot categories."""
    values = [cell.strip() for cell in cells]
    missing = np.array([value.lower() in MISSING_CSV_VALUES for value in values])
    numbers = np.full(len(values), np.nan)
    numeric = True
    for i, value in enumerate(values):
        if missing[i]:
            continue
        try:
            numbers[i] = float(value)
        except ValueError:
            numeric = False
            break

    if numeric and not missing.all():
        if missing.any():
            fill = float(np.nanmedian(numbers))
            logger.warning(
                "%s: %d missing value(s) in column %r filled with its median %g",
                path,
                int(missing.sum()),
                name,
                fill,
            )
            numbers[missing] = fill
        return numbers[:, None], [name]

    categories = sorted({v for v, m in zip(values, missing, strict=True) if not m})
    if len(categories) > MAX_CATEGORIES:
        if len(categories) > 0.5 * len(values):
            logger.warning("%s: column %r looks like an identifier; dropped", path, name)
            return np.zeros((len(values), 0)), []
        raise DataError(
            f"{path}: text column {name!r} has {len(categories)} distinct values (at most "
            f"{MAX_CATEGORIES} are one-hot encoded): drop or encode it first"
        )
    index = {category: i for i, category in enumerate(categories)}
    block = np.zeros((len(values), len(categories)))
    for row, (value, is_missing) in enumerate(zip(values, missing, strict=True)):
        if not is_missing:
            block[row, index[value]] = 1.0
    return block, [f"{name}={category}" for category in categories]


# --- entry point --------------------------------------------------------------------------


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """Split `spec` into its kind and argument, e.g. ``"npz:a.npz"`` → ``("npz", "a.npz")``."""
    kind, _, argument = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in ("digits", "mnist", "npz", "folder", "csv"):
        raise DataError(
            f"unknown data source {spec!r}: use digits, mnist:DIR, npz:FILE, folder:DIR or "
            "csv:FILE"
        )
    if kind == "digits":
        return kind, None
    if not argument:
        raise DataError(f"data source {kind!r} needs a path: write {kind}:PATH")
    return kind, argument


def load_data(
    spec: str = "digits",
    *,
    seed: int = 0,
    label: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    limit: int | None = None,
) -> Dataset:
    """Load `spec` and split it into train, validation and test parts, stratified by class.

    The split depends only on the data and `seed`. `limit` keeps a stratified subset of that
    many samples first (for quick runs).

    Raises:
        DataError: the source is missing, unreadable, has non-finite values or too few samples.
    """
    kind, argument = parse_data_spec(spec)
    if kind == "digits":
        raw = _load_digits()
    elif kind == "mnist":
        raw = _load_mnist(Path(argument).expanduser())
    elif kind == "npz":
        raw = _load_npz(Path(argument).expanduser())
    elif kind == "folder":
        raw = _load_folder(Path(argument).expanduser())
    else:
        raw = _load_csv(Path(argument).expanduser(), label)
    return _split(spec, raw, seed, val_fraction, test_fraction, limit)


def _split(
    spec: str,
    raw: _Raw,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    limit: int | None,
) -> Dataset:
    from sklearn.model_selection import train_test_split

    x, y = raw.x, raw.y
    bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{spec}: {int(bad.sum())} sample(s) contain NaN or infinite values (first at index "
            f"{first}): clean or drop them before optimizing"
        )
    counts = np.bincount(y, minlength=len(raw.class_names))
    if (counts > 0).sum() < 2:
        raise DataError(f"{spec}: needs at least 2 classes with samples; found {counts.tolist()}")
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"invalid split fractions val={val_fraction}, test={test_fraction}: each must be "
            "in (0, 1) and their sum below 1"
        )
    present = int((counts > 0).sum())
    if present < len(counts) / 2:
        raise DataError(
            f"{spec}: labels use only {present} of the class indices 0..{len(counts) - 1}: "
            "integer labels are class indices, so renumber them 0..K-1 (or store them as "
            "strings to have them numbered in sorted order)"
        )
    indices = np.arange(len(y))
    stratify_ok = counts[counts > 0].min() >= 5
    try:
        if limit is not None and limit < len(y):
            indices, _ = train_test_split(
                indices, train_size=limit, random_state=seed, stratify=y if stratify_ok else None
            )
        rest, test = train_test_split(
            indices,
            test_size=test_fraction,
            random_state=seed,
            stratify=y[indices] if stratify_ok else None,
        )
        train, val = train_test_split(
            rest,
            test_size=val_fraction / (1 - test_fraction),
            random_state=seed,
            stratify=y[rest] if stratify_ok else None,
        )
    except ValueError as exc:
        raise DataError(
            f"{spec}: cannot split {len(indices)} samples of {present} classes into training, "
            f"validation and test parts ({exc}); use more samples or a larger --limit"
        ) from exc
    preprocessing = dict(raw.preprocessing)
    if raw.kind == "vector":
        mean = x[train].mean(axis=0)
        std = x[train].std(axis=0)
        std[std < 1e-8] = 1.0
        x = (x - mean) / std
        preprocessing.update(mean=mean.round(6).tolist(), std=std.round(6).tolist())
    x = x.astype(np.float32)
    logger.info(
        "data %s: %d train, %d val, %d test samples of shape %s, %d classes",
        spec,
        len(train),
        len(val),
        len(test),
        x.shape[1:],
        len(raw.class_names),
    )
    return Dataset(
        name=spec,
        kind=raw.kind,
        train=Split(x[np.sort(train)], y[np.sort(train)]),
        val=Split(x[np.sort(val)], y[np.sort(val)]),
        test=Split(x[np.sort(test)], y[np.sort(test)]),
        input_shape=tuple(int(d) for d in x.shape[1:]),
        class_names=raw.class_names,
        preprocessing=preprocessing,
        raw_scale=raw.raw_scale,
    )
