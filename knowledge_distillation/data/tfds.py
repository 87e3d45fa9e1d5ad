"""A tensorflow-datasets set already prepared in a `data_dir`; never downloads."""

import logging
import os

from knowledge_distillation.data.base import (
    DataError,
    ImageData,
    _check_images,
    _check_labels,
    _check_same_image_shape,
)

logger = logging.getLogger(__name__)


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
    if not _is_prepared(builder):
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


def _is_prepared(builder):
    """Whether the builder's files are on disk (tfds 4.8, for TensorFlow 2.6, has no `is_prepared`)."""
    if hasattr(builder, "is_prepared"):
        return builder.is_prepared()
    return os.path.isfile(os.path.join(str(builder.data_dir), "dataset_info.json"))
