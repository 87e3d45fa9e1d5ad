"""`--cache_images`: image files decoded once, at the run's size and colour mode, and kept.

`memory` holds a uint8 array; `disk` writes `<split>.npy` under the cache
folder, batch by batch through a memory map (never whole in memory), beside
`<split>.key.json`, and a later run with the same files and view reuses it.
Either way the result replaces the `ImageFiles` in the `ImageData`, and the
training pipeline reads it per batch.
"""

import dataclasses
import json
import logging
import os
import time

import numpy as np

from knowledge_distillation.data.images import conversion_digest
from knowledge_distillation.data.pipeline import read_images
from knowledge_distillation.util.files import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


def _key(files, view):
    resize = {k: v for k, v in view.describe().items() if k != "preprocessing"}
    return {"format": CACHE_FORMAT, "files": files.fingerprint(), "count": len(files),
            "code": conversion_digest(),
            "view": {k: list(v) if isinstance(v, tuple) else v for k, v in resize.items()}}


def cached_images(files, view, where, cache_dir=None, name="train"):
    """The images of `files` through `view` (resized, converted; not scaled), as uint8 `(N, H, W, C)`.

    Args:
        files: `ImageFiles` or a streamed tfds split (arrays are returned as they are).
        view: the run's `ImageView`; its size must be fixed (set or common).
        where: "memory" or "disk".
        cache_dir: the folder of `disk` caches.
        name: the split's name, the stem of its files.

    Returns:
        A NumPy array (memory) or a read-only memmap (disk).
    """
    if isinstance(files, np.ndarray):
        return files
    view = dataclasses.replace(view, channels=view.channels or files.channels)
    shape = (len(files),) + tuple(view.output_shape(files.shape[1:]))
    nbytes = int(np.prod(shape, dtype=np.int64))
    key = _key(files, view)
    start = time.perf_counter()
    if where == "memory":
        logger.info("cache_images: decoding %d %s images into memory (%.1f MB)", len(files), name,
                    nbytes / 1e6)
        out = np.empty(shape, np.uint8)
        _fill(out, files, view)
        logger.info("cache_images: %d images in %.1f s", len(files), time.perf_counter() - start)
        return out
    os.makedirs(cache_dir, exist_ok=True)
    array_path = os.path.join(cache_dir, f"{name}.npy")
    key_path = os.path.join(cache_dir, f"{name}.key.json")
    stored = _read_key(key_path)
    if stored == key and os.path.isfile(array_path):
        array = np.load(array_path, mmap_mode="r")
        if array.shape == shape and array.dtype == np.uint8:
            logger.info("cache_images: reusing %s (same files, size and colour mode)", array_path)
            return array
    if os.path.exists(key_path):
        os.remove(key_path)  # a crash before the new key must not pair it with the old array
    logger.info("cache_images: decoding %d %s images into %s (%.1f MB)", len(files), name,
                array_path, nbytes / 1e6)
    with atomic_path(array_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        _fill(out, files, view)
        out.flush()
        del out
    write_json_atomic(key_path, key)
    logger.info("cache_images: %d images in %.1f s", len(files), time.perf_counter() - start)
    return np.load(array_path, mmap_mode="r")


def _fill(out, files, view):
    done = 0
    for begin, batch in read_images(files, view):
        out[begin:begin + len(batch)] = batch
        done = begin + len(batch)
        if done % 20480 < len(batch):
            logger.info("cache_images: %d of %d", done, len(files))
    if done != len(files):
        raise ValueError(f"{files}: decoded {done} images; expected {len(files)}")


def _read_key(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
