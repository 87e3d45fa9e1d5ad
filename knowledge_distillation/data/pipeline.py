"""The `tf.data` pipeline, the image view (size, colours, scaling) and the one preprocessing.

`make_dataset` reads in-memory arrays (gathered per batch), memory-mapped
arrays (read per batch) or `ImageFiles` (decoded and resized per image in a
parallel map, then batched), and applies an `ImageView`: resize, colour
conversion, then `preprocess`. Shuffling permutes example indices only, so
memory never holds more than the batches in flight.
"""

import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf

from knowledge_distillation import compat
from knowledge_distillation.config import INTERPOLATIONS, PREPROCESSINGS
from knowledge_distillation.data.images import ImageFiles, decode_file
# keras.applications' conventions: caffe is BGR minus the ImageNet mean (0-255);
# torch is RGB scaled to [0, 1], minus the mean, over the standard deviation.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
# Examples in the shuffle buffer of a source without random access (a
# streamed tfds split): a full permutation needs random access.
STREAM_SHUFFLE_BUFFER = 10000
# Grayscale from RGB: ITU-R BT.601 luma, as tf.image.rgb_to_grayscale.
_LUMA = (0.2989, 0.5870, 0.1140)


@dataclasses.dataclass(frozen=True)
class ImageView:
    """How stored images become model input.

    Args:
        image_size: `(height, width)` every image is resized to; None keeps
            the stored size (which must then be the same for all).
        channels: 1 or 3 to convert colour modes; None keeps the data's.
        interpolation: resize method, one of `INTERPOLATIONS`.
        preprocessing: pixel scaling, one of `PREPROCESSINGS` (see `preprocess`).
    """

    image_size: Optional[tuple] = None
    channels: Optional[int] = None
    interpolation: str = "bilinear"
    preprocessing: str = "unit"

    def __post_init__(self):
        if self.image_size is not None:
            size = tuple(int(v) for v in self.image_size)
            if len(size) != 2 or min(size) <= 0:
                raise ValueError(f"image_size must be two positive sizes (H, W), got "
                                 f"{self.image_size!r}")
            object.__setattr__(self, "image_size", size)
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")
        if self.preprocessing not in PREPROCESSINGS:
            raise ValueError(f"preprocessing must be one of {', '.join(PREPROCESSINGS)}, "
                             f"got {self.preprocessing!r}")

    def output_shape(self, stored_shape):
        """`(H, W, C)` of the model input for stored images of shape `(H, W, C)` (H, W may be None)."""
        height, width, channels = stored_shape
        if self.image_size is not None:
            height, width = self.image_size
        # Alpha is dropped (convert_images): RGBA -> RGB, gray+alpha -> gray.
        return (height, width, self.channels or {4: 3, 2: 1}.get(channels, channels))

    def describe(self):
        return dataclasses.asdict(self)


def preprocess(x, mode="unit") -> tf.Tensor:
    """The one image preprocessing, from uint8 pixels to float32 model input.

    Modes: `unit` divides by 255 ([0, 1]); `symmetric` maps to [-1, 1];
    `caffe` converts RGB to BGR and subtracts the ImageNet channel means
    (0-255 scale); `torch` scales to [0, 1], subtracts the ImageNet mean and
    divides by its standard deviation; `none` keeps 0-255 as float32.
    Floating-point images are taken as already preprocessed and only cast
    (modes `unit` and `none`).

    Args:
        x: images (a NumPy array or a tensor), uint8 or floating point,
            channels last.
        mode: one of `PREPROCESSINGS`. Defaults to "unit".

    Returns:
        A float32 `tf.Tensor` of the same shape.
    """
    x = tf.convert_to_tensor(x)
    if mode not in PREPROCESSINGS:
        raise ValueError(f"preprocess: mode must be one of {', '.join(PREPROCESSINGS)}, "
                         f"got {mode!r}")
    if x.dtype.is_floating:
        if mode not in ("unit", "none"):
            raise ValueError(
                f"preprocessing {mode!r} applies to uint8 pixels; these images are "
                f"{x.dtype.name}, taken as already preprocessed: store them as uint8 0-255")
        return tf.cast(x, tf.float32)
    if x.dtype != tf.uint8:
        raise ValueError(
            f"preprocess expects uint8 or floating-point images, got {x.dtype.name}")
    x = tf.cast(x, tf.float32)
    if mode in ("caffe", "torch") and x.shape[-1] != 3:
        raise ValueError(f"preprocessing {mode!r} needs 3-channel RGB images, got "
                         f"{x.shape[-1]} channel(s): add --channels 3")
    if mode == "unit":
        return x / 255.0
    if mode == "symmetric":
        return x / 127.5 - 1.0
    if mode == "caffe":
        return x[..., ::-1] - tf.constant(CAFFE_MEAN_BGR, tf.float32)
    if mode == "torch":
        return (x / 255.0 - tf.constant(TORCH_MEAN, tf.float32)) / tf.constant(TORCH_STD,
                                                                                tf.float32)
    return x


def convert_images(images, view):
    """Channels, then size, of uint8 images (`(H, W, C)` or `(N, H, W, C)`) per `view`; uint8 out.

    Alpha channels are dropped (4 -> 3, 2 -> 1). Resizing rounds to the
    nearest uint8 value; an image already at the size is left as it is.
    Floating-point images (already preprocessed) are resized but not rounded.
    """
    if view is None:
        return images
    images = tf.convert_to_tensor(images)
    static = images.shape[-1]
    if static in (2, 4):
        images = images[..., :static - 1]
    elif static is None:
        keep = tf.where(tf.shape(images)[-1] >= 3, 3, 1)
        images = images[..., :keep]
    if view.channels is not None and images.shape[-1] != view.channels:
        images = _to_channels(images, view.channels)
    if view.image_size is None:
        return images
    if tuple(images.shape[-3:-1]) == view.image_size:
        return images
    resized = tf.image.resize(images, view.image_size, method=view.interpolation)
    if resized.dtype == images.dtype:  # nearest keeps the dtype
        return resized
    if images.dtype.is_floating:
        return tf.cast(resized, images.dtype)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _to_channels(images, channels):
    def gray():
        luma = tf.reduce_sum(tf.cast(images, tf.float32) * tf.constant(_LUMA), -1, keepdims=True)
        return _same_kind(luma, images.dtype)

    def rgb():
        return tf.concat([images] * 3, axis=-1)

    have = images.shape[-1]
    if have is not None:
        out = gray() if channels == 1 else rgb()
    elif channels == 1:
        out = tf.cond(tf.shape(images)[-1] == 3, gray, lambda: images)
    else:
        out = tf.cond(tf.shape(images)[-1] == 1, rgb, lambda: images)
    return tf.ensure_shape(out, out.shape[:-1].concatenate([channels]))


def _same_kind(values, dtype):
    if dtype.is_floating:
        return tf.cast(values, dtype)
    return tf.cast(tf.clip_by_value(tf.round(values), 0.0, 255.0), dtype)


def make_dataset(
    x,
    y,
    batch_size,
    *,
    shuffle=False,
    seed=None,
    drop_remainder=False,
    extra=None,
    view=None,
    teacher_view=None,
    augment=None,
    geometry=None,
) -> tf.data.Dataset:
    """Builds the batched `tf.data` pipeline.

    Elements are `(images, labels)`, `(images, labels, extra)` when `extra`
    is given, or `((images, teacher_images), labels)` when `teacher_view` is
    given (the teacher's copy of the same images, e.g. at another size).
    Note that `keras.Model.fit` reads a 3-tuple as `(x, y, sample_weight)`;
    a model consuming `extra` unpacks it itself.

    Args:
        x: images, `(N, H, W, C)`: a NumPy array (gathered per batch), a
            memory-mapped array (read per batch), or `ImageFiles` (decoded per
            image in a parallel map, so sizes may differ when `view` resizes).
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
        view: the `ImageView` applied to every image. Defaults to None (the
            stored images, `unit` scaling).
        teacher_view: a second view, for the teacher's copy. Defaults to None.
        augment: a `kd.augment.BatchAugment` (or `ViewTable`): a random view
            of each training batch, the same for teacher and student. Its
            elements are `(images, labels)` (soft labels when it mixes), or
            `(images, labels, teacher_outputs)` for a view cache. Defaults
            to None.
        geometry: `geometry(uint8 images, indices) -> uint8 images`, a
            fixed shift/flip of each example (`ViewTable.view_geometry`: the
            teacher's pass over one cached view). Defaults to None.

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
    if extra is not None and teacher_view is not None:
        raise ValueError("make_dataset takes extra (teacher outputs) or teacher_view "
                         "(teacher inputs), not both")
    if n == 0:
        raise ValueError("make_dataset got no examples")
    if augment is not None and (extra is not None or teacher_view is not None):
        raise ValueError("make_dataset: augment makes the teacher's input (or outputs) "
                         "itself; it takes no extra or teacher_view")
    if drop_remainder and n < batch_size:
        raise ValueError(
            f"drop_remainder=True with {n} examples and batch_size "
            f"{batch_size} leaves no batch at all"
        )
    views = [view] + ([teacher_view] if teacher_view is not None else [])
    if isinstance(x, ImageFiles):
        # Each file is converted to the data's colour mode (1 when all are
        # grayscale, else 3), so that mixed files batch together.
        views = [dataclasses.replace(v or ImageView(), channels=(v and v.channels) or x.channels)
                 for v in views]
    modes = [v.preprocessing if v is not None else "unit" for v in views]
    columns = [tf.convert_to_tensor(y)]
    if extra is not None:
        columns.append(tf.convert_to_tensor(extra))

    def finish(images, indices):
        if geometry is not None:
            images = geometry(images, indices)
        rest = [tf.gather(column, indices) for column in columns]
        inputs = [preprocess(image, mode) for image, mode in zip(images, modes)]
        return (inputs[0] if len(inputs) == 1 else tuple(inputs), *rest)

    def augmented(step, batch_and_epoch):
        (images, indices), epoch = batch_and_epoch
        images = augment.geometry(images, indices, epoch, step)
        inputs, labels = finish(images, indices)
        inputs, labels, outputs = augment.finish(inputs, labels, indices, epoch, step)
        return (inputs, labels) if outputs is None else (inputs, labels, outputs)

    if hasattr(x, "stream"):
        # In file order, shuffled through a buffer; indices travel with the images.
        pairs = x.stream()
        if shuffle:
            pairs = pairs.shuffle(min(n, STREAM_SHUFFLE_BUFFER), seed=seed,
                                  reshuffle_each_iteration=True)
        ds = pairs.map(
            lambda encoded, i: (tuple(convert_images(x.decode(encoded), v) for v in views), i),
            num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    else:
        indices = tf.data.Dataset.range(n)
        if shuffle:
            indices = indices.shuffle(n, seed=seed, reshuffle_each_iteration=True)
        ds = _converted_batches(x, indices, views, batch_size, drop_remainder)
    if augment is None:
        ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)
    steps = ds.cardinality()
    # The epoch is drawn once per iteration (Keras iterates once per epoch),
    # the step counts batches within it.
    ds = tf.data.Dataset.zip((ds, augment.counter.dataset())).enumerate()
    ds = ds.map(augmented, num_parallel_calls=tf.data.AUTOTUNE)
    if int(steps) >= 0:
        ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
    return ds.prefetch(tf.data.AUTOTUNE)


def _converted_batches(x, indices, views, batch_size, drop_remainder):
    """Batches of `(tuple of uint8 images, one per view, indices)` over the examples `indices`."""
    if isinstance(x, ImageFiles):
        paths = tf.constant(list(x.paths), tf.string)

        def load(index):
            image = decode_file(tf.gather(paths, index))
            return tuple(_fixed(convert_images(image, v), v, x) for v in views), index

        batches = indices.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return batches.batch(batch_size, drop_remainder=drop_remainder)
    read = numpy_reader(x) if _read_with_numpy(x) else _array_reader(x)

    def gather(batch):
        stored = read(batch)
        return tuple(convert_images(stored, v) for v in views), batch

    batches = indices.batch(batch_size, drop_remainder=drop_remainder)
    return batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE)


def read_images(x, view, batch_size=256):
    """Yields `(begin, uint8 batch)` of every image of `x` through `view` (no scaling), in order."""
    if isinstance(x, ImageFiles):
        view = dataclasses.replace(view, channels=view.channels or x.channels)
    if hasattr(x, "stream"):
        batches = x.stream().map(lambda encoded, i: ((convert_images(x.decode(encoded), view),), i))
        batches = batches.batch(batch_size)
    else:
        batches = _converted_batches(x, tf.data.Dataset.range(len(x)), [view], batch_size, False)
    begin = 0
    for (images,), _ in batches.prefetch(2):
        yield begin, images.numpy()
        begin += len(images)


def _fixed(image, view, files):
    """The decoded image with its static shape: the view's size, else the files' one size."""
    height, width, channels = view.output_shape(files.shape[1:])
    if height is None:
        # Sizes differ and nothing resizes: the loader refuses that first, so
        # this is a caller's error.
        raise ValueError(f"{files}: images of different sizes and no image_size to resize to")
    return tf.ensure_shape(image, [height, width, channels])


# In-memory arrays above this size are read per batch by NumPy rather than
# copied into a tensor: every pipeline over a tensor holds its own copy (the
# three phases, the teacher cache's chunks), measured as 3.6 GB above a
# baseline for 614 MB of cached images (bench/image_pipeline.py).
NUMPY_READ_BYTES = 64 << 20


def _read_with_numpy(x):
    return isinstance(x, np.memmap) or (isinstance(x, np.ndarray) and x.nbytes > NUMPY_READ_BYTES)


def _array_reader(x):
    images = tf.convert_to_tensor(x)
    return lambda batch: tf.gather(images, batch)


def numpy_reader(x):
    """`read(indices)`: rows of a memory-mapped or large array as a tensor, read per batch
    by NumPy (sorted for locality, then put back in order)."""
    dtype = tf.as_dtype(x.dtype)

    def rows(batch):
        order = np.argsort(batch)
        out = np.empty((len(batch),) + x.shape[1:], x.dtype)
        out[order] = x[batch[order]]
        return out

    def read(batch):
        out = compat.numpy_function(rows, [batch], dtype)
        out.set_shape(batch.shape[:1].concatenate(x.shape[1:]))
        return out

    return read
