"""`load_data`: the data set a run trains and tests on, read without network access."""

from typing import Optional

from knowledge_distillation.data.base import DataError, ImageData
from knowledge_distillation.data.mnist import TFDS_PREFIX, _load_mnist_format
from knowledge_distillation.data.tfds import _load_tfds


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
