"""`load_data`: the data set a run trains and tests on, read without network access."""

import os
from typing import Optional

from knowledge_distillation.data import folders
from knowledge_distillation.data.base import DataError, ImageData
from knowledge_distillation.data.images import ImageFiles
from knowledge_distillation.data.mnist import (
    IDX_FILES, NPZ_FILE, TFDS_PREFIX, _load_mnist_format)
from knowledge_distillation.data.tfds import _load_tfds


def has_mnist_files(data_path):
    names = [NPZ_FILE] + [stem + ext for stem in IDX_FILES.values() for ext in ("", ".gz")]
    return any(os.path.isfile(os.path.join(data_path, name)) for name in names)


def load_data(
    data_path: str,
    dataset: Optional[str] = None,
    train_size: Optional[int] = None,
    test_size: Optional[int] = None,
    labels_file: Optional[str] = None,
    test_labels_file: Optional[str] = None,
    memory_budget_bytes: Optional[int] = None,
) -> ImageData:
    """Loads an image classification data set without any network access.

    With `dataset=None`, `data_path` is one of:

    - a folder holding `mnist.npz` (keys `x_train`, `y_train`, `x_test`,
      `y_test`, loaded with `allow_pickle=False`) or the four MNIST IDX files
      (`train-images-idx3-ubyte`, ..., each gzipped or not). When it holds
      both, `mnist.npz` is used; when both the plain and the `.gz` IDX file
      exist, the plain one is read. The class count is the largest label
      over both splits plus one. Arrays are loaded into memory.
    - a folder of class subfolders, `train/<class>/*` and `test/<class>/*`
      (or `val/`): see `data/folders.py`. Only file names and headers are
      read; pixels stream batch by batch.
    - with `labels_file` and `test_labels_file`: a flat folder of images and
      two `<file name> <class index>` lists, for training and for testing.

    With `dataset="tfds:NAME"`, `data_path` is the tensorflow-datasets
    `data_dir` where `NAME` (e.g. `fashion_mnist`, or `name/config:version`)
    is already prepared. Nothing is downloaded; the `image` and `label`
    features and the `train` and `test` splits are used, and the class count
    comes from the label feature's metadata.

    Args:
        data_path: the data folder, or the tfds `data_dir`.
        dataset: `None` for files in `data_path`, or `"tfds:NAME"`.
            Defaults to `None`.
        train_size: if set, keep only the first `train_size` training
            examples (image folders: a fixed sample of that many, the same
            every run). Defaults to `None` (all).
        test_size: likewise for the test examples.
        labels_file: the training label list of a flat image folder.
        test_labels_file: its test label list.
        memory_budget_bytes: a tfds split whose images take more streams
            from its files. Defaults to `tfds.DEFAULT_MEMORY_BUDGET_BYTES` (1 GiB).

    Returns:
        An `ImageData`.

    Raises:
        DataError: when the data is missing or malformed.
    """
    for arg, value in (("train_size", train_size), ("test_size", test_size)):
        if value is not None and value <= 0:
            raise ValueError(f"{arg} must be positive, got {value}")
    if dataset is not None:
        if labels_file or test_labels_file:
            raise DataError(f"--labels_file and --test_labels_file name image lists; --dataset "
                            f"{dataset} reads a tfds data set: give one or the other")
        if dataset.startswith(TFDS_PREFIX) and len(dataset) > len(TFDS_PREFIX):
            budget = {} if memory_budget_bytes is None else {
                "memory_budget_bytes": memory_budget_bytes}
            return _load_tfds(dataset[len(TFDS_PREFIX):], data_path, train_size, test_size,
                              **budget)
        raise DataError(
            f"unknown dataset {dataset!r}: expected None (files in data_path) or "
            f"'{TFDS_PREFIX}NAME' (a tensorflow-datasets data set)")
    if labels_file or test_labels_file:
        if not (labels_file and test_labels_file):
            given, missing = (("--labels_file", "--test_labels_file") if labels_file
                              else ("--test_labels_file", "--labels_file"))
            raise DataError(f"{given} is given without {missing}: the trainer needs a label "
                            "list for training and one for testing")
        return folders.load_label_lists(data_path, labels_file, test_labels_file,
                                        train_size, test_size)
    if os.path.isdir(data_path) and not has_mnist_files(data_path) and \
            folders.has_class_folders(data_path):
        return folders.load_class_folders(data_path, train_size, test_size)
    return _load_mnist_format(data_path, train_size, test_size)


def model_input_shape(data, view, flag_hint="--image_size H,W"):
    """`(H, W, C)` the model sees: the stored images through `view`.

    Raises:
        DataError: the images differ in size and `view` resizes nothing; it
            names the first file that differs and suggests `flag_hint`.
    """
    for split in (data.x_train, data.x_test):
        if isinstance(split, ImageFiles) and view.image_size is None and split.fixed_size is None:
            path, size, first, first_size = split.first_differing()
            raise DataError(
                f"{path}: image of size {size[0]}x{size[1]}, but {first} is "
                f"{first_size[0]}x{first_size[1]}; expected one size for all, or give "
                f"{flag_hint} to resize every image")
    shape = view.output_shape(tuple(data.x_train.shape[1:]))
    # The test images take the training images' colour mode.
    test_shape = view.output_shape(tuple(data.x_test.shape[1:3]) + (shape[2],))
    if None in shape[:2]:
        raise DataError(f"{data.x_train}: images of varying size; expected one size for all, "
                        f"or give {flag_hint} to resize every image")
    if shape != test_shape:
        raise DataError(
            f"test images of shape {test_shape} through the view; expected {shape} like the "
            f"training images; give {flag_hint} to resize both")
    return shape
