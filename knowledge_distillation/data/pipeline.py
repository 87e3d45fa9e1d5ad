"""The `tf.data` pipeline over in-memory arrays, and the one image preprocessing."""

import tensorflow as tf


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
