"""MNIST-format files: Keras' `mnist.npz` or the four MNIST IDX files, gzipped or not."""

import gzip
import logging
import os
import struct
import zipfile
import zlib

import numpy as np

from knowledge_distillation.data.base import (
    DataError,
    ImageData,
    _check_images,
    _check_labels,
    _check_same_image_shape,
    check_label_range,
    _take,
)

logger = logging.getLogger(__name__)

NPZ_FILE = "mnist.npz"
SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Keras' mnist.npz keys -> the MNIST IDX file holding the same array.
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# IDX magic numbers: two zero bytes, type 0x08 (unsigned byte), rank.
IDX_IMAGES_MAGIC = 0x00000803  # 2051
IDX_LABELS_MAGIC = 0x00000801  # 2049
TFDS_PREFIX = "tfds:"

_GET_DATA_HINT = (
    "install Fashion-MNIST with `apt-get install dataset-fashion-mnist` "
    "(it lands in /usr/share/datasets/fashion-mnist) or pass --data_path=DIR "
    f"holding {NPZ_FILE} or the four MNIST IDX files, or train/<class>/ and "
    "test/<class>/ image folders"
)


def _load_mnist_format(data_path, train_size, test_size):
    if not os.path.isdir(data_path):
        what = "is not a folder" if os.path.exists(data_path) else "does not exist"
        raise DataError(f"data_path {data_path} {what}: {_GET_DATA_HINT}")
    npz_path = os.path.join(data_path, NPZ_FILE)
    if os.path.isfile(npz_path):
        origin = npz_path
        arrays = _read_npz(npz_path)
        sources = {key: f"{npz_path}[{key}]" for key in SPLIT_KEYS}
    else:
        origin = data_path
        sources = _find_idx_files(data_path)
        arrays = {
            key: _read_idx(
                path,
                IDX_IMAGES_MAGIC if key.startswith("x") else IDX_LABELS_MAGIC,
            )
            for key, path in sources.items()
        }
    images, labels = {}, {}
    for split in ("train", "test"):
        x_key, y_key = f"x_{split}", f"y_{split}"
        images[split] = _check_images(arrays[x_key], sources[x_key])
        labels[split] = _check_labels(
            arrays[y_key], sources[y_key], len(images[split]), sources[x_key]
        )
    _check_same_image_shape(images, sources)
    # Counted before slicing so a small slice still has every class.
    num_classes = int(max(labels["train"].max(), labels["test"].max())) + 1
    check_label_range(labels.values(), num_classes, sources["y_train"])
    name = os.path.basename(os.path.normpath(os.path.abspath(data_path)))
    logger.info(
        "loaded %s from %s: %d train / %d test images of shape %s, %d classes",
        name,
        origin,
        len(images["train"]),
        len(images["test"]),
        images["train"].shape[1:],
        num_classes,
    )
    return ImageData(
        x_train=_take(images["train"], train_size, "train_size", sources["x_train"]),
        y_train=_take(labels["train"], train_size, "train_size", sources["y_train"]),
        x_test=_take(images["test"], test_size, "test_size", sources["x_test"]),
        y_test=_take(labels["test"], test_size, "test_size", sources["y_test"]),
        num_classes=num_classes,
        name=name,
    )


def _read_npz(path):
    expected = (
        f"expected a numpy .npz archive with keys {', '.join(SPLIT_KEYS)} "
        "and no object arrays (it is loaded with allow_pickle=False)"
    )
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: found a single .npy array; {expected}")
        with loaded as npz:
            missing = [key for key in SPLIT_KEYS if key not in npz.files]
            if missing:
                raise DataError(
                    f"{path}: missing key(s) {', '.join(missing)} (found "
                    f"{', '.join(npz.files) or 'no keys'}); {expected}"
                )
            arrays = {}
            for key in SPLIT_KEYS:
                try:
                    arrays[key] = npz[key]
                except (ValueError, OSError, EOFError, zipfile.BadZipFile,
                        zlib.error) as e:
                    raise DataError(
                        f"{path}: cannot read key {key} ({e}); {expected}"
                    ) from e
            return arrays
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        # np.load falls back to unpickling what is not an archive; with
        # allow_pickle=False that is a ValueError.
        raise DataError(f"{path}: cannot load ({e}); {expected}") from e


def _find_idx_files(data_path):
    found, missing = {}, []
    for key, stem in IDX_FILES.items():
        plain = os.path.join(data_path, stem)
        gzipped = plain + ".gz"
        if os.path.isfile(plain):
            found[key] = plain
        elif os.path.isfile(gzipped):
            found[key] = gzipped
        else:
            missing.append(f"{stem}[.gz]")
    if len(missing) == len(IDX_FILES):
        raise DataError(
            f"data_path {data_path} holds neither {NPZ_FILE} nor the MNIST IDX "
            f"files ({', '.join(f'{s}[.gz]' for s in IDX_FILES.values())}): "
            f"{_GET_DATA_HINT}"
        )
    if missing:
        raise DataError(
            f"{os.path.join(data_path, missing[0])}: missing; data_path "
            f"{data_path} lacks {', '.join(missing)} of the four MNIST IDX files"
        )
    return found


def _read_idx(path, magic):
    """Reads one uint8 IDX file; checks its magic number and its length."""
    kind = "images" if magic == IDX_IMAGES_MAGIC else "labels"
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        # gzip.BadGzipFile is an OSError; a cut gzip stream is an EOFError.
        raise DataError(
            f"{path}: cannot read ({type(e).__name__}: {e}); expected a "
            f"{'gzip-compressed ' if path.endswith('.gz') else ''}MNIST IDX "
            f"{kind} file"
        ) from e
    if len(data) < 4:
        raise DataError(
            f"{path}: truncated, {len(data)} bytes; expected at least a "
            f"4-byte IDX header"
        )
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DataError(
            f"{path}: IDX magic number {found} (0x{found:08x}); expected "
            f"{magic} (0x{magic:08x}, uint8 {kind}, big-endian)"
        )
    rank = magic & 0xFF
    header = 4 + 4 * rank
    if len(data) < header:
        raise DataError(
            f"{path}: truncated, {len(data)} bytes; expected a {header}-byte "
            f"IDX header"
        )
    shape = struct.unpack(f">{rank}I", data[4:header])
    size = int(np.prod(shape))
    if len(data) != header + size:
        state = "truncated" if len(data) < header + size else "trailing bytes"
        raise DataError(
            f"{path}: {state}, {len(data)} bytes; expected {header + size} "
            f"for {kind} of shape {shape}"
        )
    return np.frombuffer(data, np.uint8, count=size, offset=header).reshape(shape)


