"""A tensorflow-datasets set already prepared in a `data_dir`; never downloads.

A split whose images fit `DEFAULT_MEMORY_BUDGET_BYTES` is loaded into memory
(`batch_size=-1`); a larger one streams from its files (`TfdsImages`), and
memory holds only its labels.
"""

import hashlib
import logging
import os

import numpy as np

from knowledge_distillation.data.pipeline import STREAM_SHUFFLE_BUFFER
from knowledge_distillation.data.base import (
    DataError,
    ImageData,
    _check_images,
    _check_labels,
    _check_same_image_shape,
)

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30


class TfdsImages:
    """The images of a prepared tfds split, read from its files in order, never all in memory.

    Stands in for an `(N, H, W, C)` uint8 array like `ImageFiles`:
    `data.make_dataset` streams it (`stream`), shuffling through a buffer of
    `pipeline.STREAM_SHUFFLE_BUFFER` examples rather than a full
    permutation, since the files have no random access.

    Args:
        builder: the prepared tfds builder.
        split: the split's name.
        shape: `(H, W, C)` of one image.
        positions: the example positions in the split this view holds (sorted).
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, builder, split, shape, positions):
        self.builder = builder
        self.split = split
        self.image_shape = tuple(shape)
        self.positions = np.asarray(positions, np.int64).reshape(-1)
        if len(self.positions) > 1 and not (np.diff(self.positions) > 0).all():
            raise ValueError("TfdsImages positions must be increasing and unique (a streamed "
                             "split is read in file order)")

    def __len__(self):
        return len(self.positions)

    @property
    def shape(self):
        return (len(self),) + self.image_shape

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            index = [index]
        return TfdsImages(self.builder, self.split, self.image_shape, self.positions[index])

    def fingerprint(self):
        """Hex digest of the split's files (names, sizes, modification times) and the positions."""
        h = hashlib.blake2b(digest_size=16)
        root = str(self.builder.data_path)
        for name in sorted(os.listdir(root)):
            st = os.stat(os.path.join(root, name))
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(f"{self.split}\0".encode())
        h.update(self.positions.tobytes())
        return h.hexdigest()

    @property
    def channels(self):
        return self.image_shape[-1]

    def decode(self, encoded):
        """The uint8 image of one encoded example (`stream` yields them undecoded)."""
        return self.builder.info.features["image"].decode_example(encoded)

    def stream(self):
        """`tf.data.Dataset` of `(encoded image, i)` for i = 0..len-1, in the split's order.

        The images stay encoded (a shuffle buffer then holds bytes, not pixels);
        `decode` decodes one. Shards are read one after the other (no
        interleaving), so position p is the split's example p in every slice.
        """
        import tensorflow as tf

        begin = int(self.positions[0]) if len(self) else 0
        end = int(self.positions[-1]) + 1 if len(self) else 0
        images = self.builder.as_dataset(split=f"{self.split}[{begin}:{end}]", shuffle_files=False,
                                         decoders=_skip_image_decoding(),
                                         read_config=_in_order())
        images = images.map(lambda example: example["image"])
        keep = np.zeros(end - begin, bool)
        keep[self.positions - begin] = True
        rank = np.cumsum(keep) - 1  # position -> index in this view
        pairs = tf.data.Dataset.zip((images, tf.data.Dataset.range(end - begin)))
        if not keep.all():
            keep_t, rank_t = tf.constant(keep), tf.constant(rank)
            pairs = pairs.filter(lambda image, p: tf.gather(keep_t, p))
            pairs = pairs.map(lambda image, p: (image, tf.gather(rank_t, p)))
        return pairs

    def __repr__(self):
        return f"TfdsImages({self.builder.name}[{self.split}], {len(self)} examples)"


def _skip_image_decoding():
    import tensorflow_datasets as tfds

    return {"image": tfds.decode.SkipDecoding()}


def _in_order():
    """Shards read one after the other: tfds interleaves 16 by default, even unshuffled."""
    import tensorflow_datasets as tfds

    return tfds.ReadConfig(interleave_cycle_length=1)


def _labels_in_order(builder, spec):
    """The labels of a split, in file order, read without decoding the images."""
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=spec, shuffle_files=False, decoders=_skip_image_decoding(),
                            read_config=_in_order())
    return np.asarray([int(v) for v in tfds.as_numpy(ds.map(lambda e: e["label"]))], np.int64)


def _load_tfds(name, data_dir, train_size, test_size,
               memory_budget_bytes=DEFAULT_MEMORY_BUDGET_BYTES):
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
        count = available if size is None else size
        shape = tuple(features["image"].shape)
        varying = None in shape[:2]
        if varying or count * int(np.prod(shape)) > memory_budget_bytes:
            logger.info("%s: %d images of shape %s %s: they stream from the files (shuffled "
                        "through a %d-example buffer of encoded images)", source, count, shape,
                        "vary in size" if varying else
                        f"exceed the {memory_budget_bytes >> 20}-MB memory budget",
                        STREAM_SHUFFLE_BUFFER)
            images = TfdsImages(builder, split, shape, np.arange(count))
            labels = _check_labels(_labels_in_order(builder, spec), source, count, source)
        else:
            batch = tfds.as_numpy(builder.as_dataset(split=spec, batch_size=-1,
                                                     read_config=_in_order()))
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
