"""Digests of arrays and model weights: what changed, and whether replicas agree."""

import hashlib

import numpy as np

_HASH_BLOCK = 1 << 24


def _digest():
    return hashlib.blake2b(digest_size=16)


def hash_array(array):
    """Hex digest of an array's dtype, shape and every byte of its data.

    Reads memory-mapped arrays block by block, without loading them whole.
    """
    h = _digest()
    array = np.asarray(array)
    h.update(f"{array.dtype.str}{array.shape}".encode())
    flat = array.reshape(-1) if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(-1)
    step = max(1, _HASH_BLOCK // max(1, flat.itemsize))
    for start in range(0, flat.size, step):
        h.update(memoryview(np.ascontiguousarray(flat[start:start + step])).cast("B"))
    return h.hexdigest()


def weights_digest(model):
    """Hex digest of every weight of `model` (trainable or not), in order.

    Only the values count (dtype, shape, bytes), not the variables' names or
    paths: a model reloaded from its file gets new paths but computes the
    same function.
    """
    h = _digest()
    for weight in model.get_weights():
        h.update(hash_array(weight).encode())
    return h.hexdigest()
