"""Batched inference: a model's outputs over many inputs, in inference mode."""

import numpy as np

from knowledge_distillation import compat


def array_batches(x, batch_size):
    """Slices of `x` (an array, or a list of arrays for a model with several inputs)."""
    n = len(x[0]) if isinstance(x, list) else len(x)
    for i in range(0, n, batch_size):
        if isinstance(x, list):
            yield [np.asarray(a[i:i + batch_size]) for a in x]
        else:
            yield np.asarray(x[i:i + batch_size])


def batched_predict(model, batches, compiled=False):
    """`model`'s outputs over `batches`, concatenated, inference mode, as NumPy.

    Args:
        model: a Keras model.
        batches: an iterable of input batches; with `compiled=True` a
            `tf.data.Dataset` of inputs.
        compiled: run Keras' compiled `predict` (graph mode, distributed
            under a strategy scope). Defaults to False: eager calls, which
            see Python state that changes between calls (a quantized layer's
            frozen switch, say) where a cached trace would not.
    """
    if compiled:
        return np.asarray(model.predict(batches, verbose=0))
    return np.concatenate([compat.to_numpy(model(b, training=False)) for b in batches])
