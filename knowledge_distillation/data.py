"""Image classification data: MNIST-format files or a prepared tfds data set.

`load_data` reads a folder holding either `mnist.npz` (the Keras layout) or the
four MNIST IDX files, gzipped or not, or a tensorflow-datasets data set that
is already prepared in a `data_dir`. It never downloads. Everything about the
data (image size, channels, class count) is read from the data itself.

`make_dataset` turns the raw arrays into a `tf.data` pipeline; `preprocess`
is the single image preprocessing shared by training, evaluation and the
quantizer's ONNX checks.

Bad data raises `DataError`, whose message is one line naming the file, what
was found and what was expected.

Example:

```python
data = load_data("/usr/share/datasets/fashion-mnist", train_size=1000)
train = make_dataset(data.x_train, data.y_train, 32, shuffle=True, seed=1)
```
"""

import dataclasses
import gzip
import logging
import os
import struct
import zipfile
import zlib
from typing import Optional

import numpy as np
import tensorflow as tf

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
    f"holding {NPZ_FILE} or the four MNIST IDX files"
)


class DataError(ValueError):
    """Bad or missing data.

    `str(e)` is one line naming the file, what was found and what was
    expected; any line breaks in the message are folded into spaces.
    """

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
    """An image classification data set held in memory as raw arrays.

    Attributes:
        x_train: training images, `(N, H, W, C)`, channels-last, in the dtype
            they were stored in (uint8 for MNIST files).
        y_train: training labels, `(N,)` int64.
        x_test: test images, like `x_train`.
        y_test: test labels, like `y_train`.
        num_classes: number of classes, read from the data.
        name: the data set's name (the folder name, or the tfds name).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple:
        """The shape of one image, `(H, W, C)`."""
        return tuple(self.x_train.shape[1:])


def load_data(
    data_path: str,
    dataset: Optional[str] = None,
    train_size: Optional[int] = None,
    test_size: Optional[int] = None,
) -> ImageData:
    """Loads an image classification data set without any network access.

    With `dataset=None`, `data_path` is a folder holding `mnist.npz` (keys
    `x_train`, `y_train`, `x_test`, `y_test`, loaded with
    `allow_pickle=False`) or the four MNIST IDX files
    (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
    `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`), each gzipped
    (`.gz`) or not. When the folder holds both, `mnist.npz` is used: it is
    the one file a user writes on purpose, while IDX files often come from a
    system package. When both the plain and the `.gz` IDX file exist, the
    plain one is read (no decompression). The class count is the largest
    label over both splits plus one.

    With `dataset="tfds:NAME"`, `data_path` is the tensorflow-datasets
    `data_dir` where `NAME` (e.g. `fashion_mnist`, or `name/config:version`)
    is already prepared. Nothing is downloaded; the `image` and `label`
    features and the `train` and `test` splits are used, and the class count
    comes from the label feature's metadata.

    Args:
        data_path: the data folder, or the tfds `data_dir`.
        dataset: `None` for MNIST-format files, or `"tfds:NAME"`.
            Defaults to `None`.
        train_size: if set, keep only the first `train_size` training
            examples. Defaults to `None` (all).
        test_size: if set, keep only the first `test_size` test examples.
            Defaults to `None` (all).

    Returns:
        An `ImageData`.

    Raises:
        DataError: when the data is missing or malformed.
    """
    for arg, value in (("train_size", train_size), ("test_size", test_size)):
        if value is not None and value <= 0:
            raise ValueError(f"{arg} must be positive, got {value}")
    if dataset is None:
        return _load_mnist_format(data_path, train_size, test_size)
    if dataset.startswith(TFDS_PREFIX) and len(dataset) > len(TFDS_PREFIX):
        return _load_tfds(
            dataset[len(TFDS_PREFIX):], data_path, train_size, test_size
        )
    raise DataError(
        f"unknown dataset {dataset!r}: expected None (MNIST-format files in "
        f"data_path) or '{TFDS_PREFIX}NAME' (a tensorflow-datasets data set)"
    )


def preprocess(x) -> tf.Tensor:
    """The one image preprocessing: float32, with uint8 scaled to [0, 1].

    Floating-point images are taken as already scaled and only cast.

    Args:
        x: images (a NumPy array or a tensor), uint8 or floating point.

    Returns:
        A float32 `tf.Tensor` of the same shape.
    """
    x = tf.convert_to_tensor(x)
    if x.dtype == tf.uint8:
        return tf.cast(x, tf.float32) / 255.0
    if x.dtype.is_floating:
        return tf.cast(x, tf.float32)
    raise ValueError(
        f"preprocess expects uint8 or floating-point images, got {x.dtype.name}"
    )


def make_dataset(
    x,
    y,
    batch_size,
    *,
    shuffle=False,
    seed=None,
    drop_remainder=False,
    extra=None,
) -> tf.data.Dataset:
    """Builds the batched `tf.data` pipeline over in-memory arrays.

    The raw arrays stay as they are (uint8 for MNIST) and each batch is
    gathered and preprocessed in a parallel `map`, so memory holds one copy
    of the data and the shuffle buffer holds only indices. Elements are
    `(images, labels)`, or `(images, labels, extra)` when `extra` is given.
    Note that `keras.Model.fit` reads a 3-tuple as
    `(x, y, sample_weight)`; a model consuming `extra` unpacks it itself.

    Args:
        x: images, `(N, ...)`.
        y: labels, `(N,)`.
        batch_size: examples per batch.
        shuffle: shuffle the examples, anew at each epoch (each iteration).
            Defaults to `False`.
        seed: shuffle seed; the same seed gives the same sequence of epochs.
            Defaults to `None` (not reproducible).
        drop_remainder: drop the last, partial batch so every batch is full
            and its shape static. Defaults to `False`.
        extra: an array aligned with `x` (e.g. cached teacher logits),
            batched alongside. Defaults to `None`.

    Returns:
        A prefetching `tf.data.Dataset`.
    """
    n = len(x)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(y) != n:
        raise ValueError(f"x has {n} examples but y has {len(y)}")
    if extra is not None and len(extra) != n:
        raise ValueError(f"x has {n} examples but extra has {len(extra)}")
    if n == 0:
        raise ValueError("make_dataset got no examples")
    if drop_remainder and n < batch_size:
        raise ValueError(
            f"drop_remainder=True with {n} examples and batch_size "
            f"{batch_size} leaves no batch at all"
        )
    columns = [tf.convert_to_tensor(x), tf.convert_to_tensor(y)]
    if extra is not None:
        columns.append(tf.convert_to_tensor(extra))

    def gather(indices):
        images, *rest = (tf.gather(column, indices) for column in columns)
        return (preprocess(images), *rest)

    indices = tf.data.Dataset.range(n)
    if shuffle:
        indices = indices.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    batches = indices.batch(batch_size, drop_remainder=drop_remainder)
    return batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE
    )


# --- MNIST-format files --------------------------------------------------


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


# --- tensorflow-datasets ---------------------------------------------------


def _load_tfds(name, data_dir, train_size, test_size):
    # Imported here: only this path needs it, and it is slow to import.
    import tensorflow_datasets as tfds

    not_prepared = (
        f"tfds data set {name!r} is not prepared under data_path {data_dir} "
        "and downloads are disabled; prepare it there first (e.g. "
        f"`tfds build {name.split('/')[0].split(':')[0]} --data_dir={data_dir}` "
        "on a machine with network access)"
    )
    if not os.path.isdir(data_dir):
        raise DataError(not_prepared)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(not_prepared) from e
    if not builder.is_prepared():
        raise DataError(not_prepared)
    where = str(builder.data_path)
    features = builder.info.features
    for feature in ("image", "label"):
        if feature not in features:
            raise DataError(
                f"{where}: tfds data set {name!r} has features "
                f"{', '.join(features.keys())}; expected 'image' and 'label'"
            )
    for split in ("train", "test"):
        if split not in builder.info.splits:
            raise DataError(
                f"{where}: tfds data set {name!r} has splits "
                f"{', '.join(builder.info.splits.keys()) or 'none'}; expected "
                "'train' and 'test'"
            )
    num_classes = getattr(features["label"], "num_classes", None)
    if not num_classes:
        raise DataError(
            f"{where}: the label feature of tfds data set {name!r} is "
            f"{type(features['label']).__name__}; expected a ClassLabel with "
            "num_classes"
        )
    arrays = {}
    for split, size in (("train", train_size), ("test", test_size)):
        available = builder.info.splits[split].num_examples
        if size is not None and size > available:
            raise DataError(
                f"{where}: split {split} holds {available} examples; "
                f"{split}_size={size} asks for more"
            )
        spec = split if size is None else f"{split}[:{size}]"
        source = f"{where}[{split}]"
        batch = tfds.as_numpy(builder.as_dataset(split=spec, batch_size=-1))
        images = _check_images(batch["image"], source)
        labels = _check_labels(batch["label"], source, len(images), source)
        if labels.max() >= num_classes:
            raise DataError(
                f"{source}: label {int(labels.max())} out of range; expected "
                f"0..{num_classes - 1} ({num_classes} classes in the metadata)"
            )
        arrays[split] = (images, labels)
    _check_same_image_shape(
        {split: pair[0] for split, pair in arrays.items()},
        {"x_train": f"{where}[train]", "x_test": f"{where}[test]"},
    )
    logger.info(
        "loaded tfds %s from %s: %d train / %d test images of shape %s, "
        "%d classes",
        name,
        where,
        len(arrays["train"][0]),
        len(arrays["test"][0]),
        arrays["train"][0].shape[1:],
        num_classes,
    )
    return ImageData(
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        num_classes=int(num_classes),
        name=builder.name,
    )


# --- checks shared by both sources -----------------------------------------


def _check_images(x, source):
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4:
        raise DataError(
            f"{source}: images of shape {x.shape}; expected (N, H, W) or "
            "(N, H, W, C)"
        )
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(
            f"{source}: images of dtype {x.dtype}; expected uint8 (0..255) or "
            "floating point (already scaled)"
        )
    if len(x) == 0:
        raise DataError(f"{source}: empty split, 0 images; expected at least 1")
    return x


def _check_labels(y, source, num_images, images_source):
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{source}: labels of shape {y.shape}; expected (N,)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{source}: labels of dtype {y.dtype}; expected integer class ids"
        )
    if len(y) != num_images:
        raise DataError(
            f"{source}: {len(y)} labels; expected {num_images}, one per image "
            f"in {images_source}"
        )
    if len(y) and y.min() < 0:
        raise DataError(
            f"{source}: label {int(y.min())} out of range; expected class ids "
            ">= 0"
        )
    return y.astype(np.int64)


def _check_same_image_shape(images, sources):
    train_shape, test_shape = images["train"].shape[1:], images["test"].shape[1:]
    if train_shape != test_shape:
        raise DataError(
            f"{sources['x_test']}: images of shape {test_shape}; expected "
            f"{train_shape} like {sources['x_train']}"
        )


def _take(array, size, arg, source):
    if size is not None and size > len(array):
        raise DataError(
            f"{source}: holds {len(array)} examples; {arg}={size} asks for more"
        )
    # A copy: writable, and a slice does not pin the whole file's buffer.
    return array[:size].copy()
