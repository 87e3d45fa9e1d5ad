"""Teacher-output cache: the teacher's logits computed once, reused every step.

The teacher's forward pass dominates distillation (the default teacher costs
far more per example than the student), yet with a deterministic input
pipeline its outputs for one image never change. `teacher_outputs` computes
them once, batched, in inference mode, and keeps them:

- in memory when they fit under `memory_budget_bytes`;
- otherwise in a memory-mapped `.npy` file under `cache_dir`, written chunk by
  chunk so the whole array is never held in memory.

Either way, with a `cache_dir` the array is stored as `teacher_logits.npy`
beside `teacher_logits.key.json`, and a later run (a resumed one, say) reuses
it when the key matches. The key covers everything that changes the outputs:

- the teacher's weights (every variable, moving statistics included) and its
  architecture config;
- the images: shape, dtype and a hash of *all* their bytes. A sampled digest
  would be cheaper but can miss an edited image; hashing reads each byte once
  while the teacher spends thousands of FLOPs on it, so the full hash costs a
  few percent of one teacher pass at most (`bench/distill_speed.py` prints
  both times). Image files count by their list: every path, size and
  modification time;
- the preprocessing: its version string (the trainer adds the teacher's
  view: image size, colour mode, interpolation, scaling) and a hash of the
  preprocessing function's source, so editing `data.preprocess` invalidates
  the cache without anyone remembering to bump a number;
- the dtype policies (global and per layer): bfloat16 and float32 teachers
  give different logits.

A mismatch is logged with what changed, and the logits are recomputed.

Random augmentation makes the teacher's input differ at every step, so no
cache of one view per image can hold its outputs: `cache_decision` says so,
and the trainer then runs the teacher per step and logs why, unless it was
asked for a view cache (`--teacher_views K`, `views=` here): K fixed
augmented views per image (`augment.ViewTable`), whose outputs are stored
`(N, K, ...)` under their own file names, with the views' settings, seed
and K in the key.

Example:

```python
outputs = teacher_outputs(teacher, x_train, predict=my_batched_predict,
                          cache_dir="output/teacher_cache")
train = make_dataset(x_train, y_train, 32, extra=outputs.column())
train = train.map(outputs.lookup)  # -> ((x, teacher_logits), y)
```
"""

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import time
from typing import Optional

import numpy as np
import tensorflow as tf

from knowledge_distillation import compat
from knowledge_distillation.compat import keras
from knowledge_distillation.util.digest import hash_array, weights_digest
from knowledge_distillation.util.files import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

# Bump when the meaning of the stored array changes (layout, dtype).
CACHE_FORMAT = 1
PREPROCESSING_VERSION = "1"
DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30
# Images per `predict` call: as many as fit this many bytes as float32 (the
# preprocessed batch): every call pays Keras' set-up and a partial last
# batch, so all of Fashion-MNIST in one call was 1.2x faster than 8192-image
# chunks (seed teacher, bfloat16, 60000 images: 19-20 s against 23-24 s).
DEFAULT_CHUNK_BYTES = 256 << 20
ARRAY_FILE = "teacher_logits.npy"
KEY_FILE = "teacher_logits.key.json"
VIEWS_ARRAY_FILE = "teacher_view_logits.npy"
VIEWS_KEY_FILE = "teacher_view_logits.key.json"


def hash_architecture(model):
    """Hex digest of the model's class and layer config (layers, shapes, dtypes).

    The compile config (optimizer, loss, metrics) is left out: it does not
    change the outputs, and a reloaded, recompiled teacher differs there.
    """
    config = {"class": type(model).__name__, "config": model.get_config()}
    text = json.dumps(config, sort_keys=True, default=_json_default)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _json_default(value):
    # Keras objects left in a config (an initializer, a dtype policy) by their
    # own config; never str(), which can hold a memory address.
    if hasattr(value, "get_config"):
        return {"class": type(value).__name__, "config": value.get_config()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):  # Keras 2.6 keeps some shapes as arrays
        return {"ndarray": value.tolist(), "dtype": value.dtype.str}
    raise TypeError(f"cannot fingerprint a {type(value).__name__} in the teacher's config")


def dtype_policies(model):
    """The global policy and each layer's dtype policy, as a sorted string."""
    layers = sorted(
        f"{layer.name}={getattr(layer.dtype_policy, 'name', layer.dtype_policy)}"
        for layer in model._flatten_layers(include_self=False)
    )
    return f"global={keras.mixed_precision.global_policy().name};" + ",".join(layers)


def preprocessing_fingerprint(fn, version=PREPROCESSING_VERSION):
    """`version` plus a digest of `fn`'s source (its bytecode and constants if no source).

    Never `repr(fn)`: it holds a memory address, which would make every
    process compute a new key.

    Raises:
        ValueError: `fn` has neither source nor bytecode (e.g. a builtin or a
            callable object), so nothing stable identifies it.
    """
    try:
        body = inspect.getsource(fn).encode()
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        if code is None:
            raise ValueError(
                f"cannot fingerprint the preprocessing {type(fn).__name__} for the "
                "teacher cache: it has no source or bytecode; pass a plain function"
            ) from None
        body = code.co_code + repr(code.co_consts).encode()
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    return f"{version}:{name}:{hashlib.blake2b(body, digest_size=8).hexdigest()}"


def cache_key(teacher, images, preprocess, preprocessing_version=PREPROCESSING_VERSION,
              views=None):
    """The dict that identifies a teacher's outputs on `images`.

    Args:
        teacher: the teacher `keras.Model`.
        images: the raw images the outputs are computed from.
        preprocess: the preprocessing function applied to them.
        preprocessing_version: a version string of that preprocessing.
            Defaults to `PREPROCESSING_VERSION`.
        views: an `augment.ViewTable` for a view cache, else None.

    Returns:
        A JSON-serialisable dict; equal dicts mean reusable outputs.
    """
    if hasattr(images, "fingerprint"):
        # Image files (data.ImageFiles): their list of paths, sizes and
        # modification times; the resize settings are in the preprocessing version.
        described = {"shape": [len(images)], "files": images.fingerprint()}
    else:
        images = np.asarray(images) if not isinstance(images, np.ndarray) else images
        described = {"shape": list(images.shape), "dtype": images.dtype.str,
                     "bytes": hash_array(images)}
    key = {
        "format": CACHE_FORMAT,
        "teacher_weights": weights_digest(teacher),
        "teacher_architecture": hash_architecture(teacher),
        "images": described,
        "preprocessing": preprocessing_fingerprint(preprocess, preprocessing_version),
        "dtype_policy": hashlib.blake2b(
            dtype_policies(teacher).encode(), digest_size=16
        ).hexdigest(),
    }
    if views is not None:
        key["views"] = views.key()
    return key


def describe_change(old, new):
    """The names of the key fields that differ, e.g. `["teacher_weights"]`."""
    if not isinstance(old, dict):
        return ["unreadable key"]
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def cache_decision(augmentation):
    """`(use_cache, reason)` for a training pipeline.

    Args:
        augmentation: `None` (or empty) when the training pipeline is
            deterministic; otherwise a description of its random
            augmentation (e.g. `"random flip"`).

    Returns:
        `(True, "...")` when teacher outputs may be cached, `(False, why)`
        when the teacher must run every step.
    """
    if augmentation:
        return False, (
            f"the training pipeline applies random augmentation ({augmentation}): "
            "each step sees new images, so the teacher runs on every step"
        )
    return True, "the training pipeline is deterministic (no random augmentation)"


@dataclasses.dataclass
class TeacherOutputs:
    """Teacher outputs for every training example, and where they came from.

    Attributes:
        array: `(N, ...)` float32 (`(N, K, ...)` for K views), a NumPy array
            or a read-only memmap.
        key: the cache key they belong to.
        source: `"computed"` or `"reused"`.
        path: the `.npy` file, or None when kept in memory only.
        seconds: time spent computing (0 when reused).
        hash_seconds: time spent computing the key.
    """

    array: np.ndarray
    key: dict
    source: str
    path: Optional[str] = None
    seconds: float = 0.0
    hash_seconds: float = 0.0

    @property
    def in_memory(self):
        return not isinstance(self.array, np.memmap)

    def column(self):
        """The array to batch alongside the images (`make_dataset(extra=...)`).

        In memory: the outputs themselves. Memory-mapped: the example indices,
        which `lookup` turns into output rows read from the file per batch, so
        the pipeline never copies the whole file into a tensor.
        """
        if self.in_memory:
            return self.array
        return np.arange(len(self.array), dtype=np.int64)

    def lookup(self, x, y, column):
        """`tf.data` map from `(x, y, column)` to `((x, teacher_outputs), y)`."""
        if self.in_memory:
            return (x, column), y
        array = self.array

        def rows(indices):
            return np.asarray(array[np.sort(indices)][np.argsort(np.argsort(indices))],
                              dtype=np.float32)

        outputs = compat.numpy_function(rows, [column], tf.float32)
        outputs.set_shape(column.shape[:1].concatenate(array.shape[1:]))
        return (x, outputs), y

    def prepare_rows(self):
        """Makes the in-memory tensor `rows` reads; call it eagerly, outside any pipeline trace."""
        if self.in_memory and getattr(self, "_flat_tensor", None) is None:
            n, k = self.array.shape[:2]
            self._flat_tensor = tf.constant(self.array.reshape((n * k,) + self.array.shape[2:]))

    def rows(self, flat):
        """Rows `flat` (`index * K + view`) of a `(N, K, ...)` view cache, as a tensor."""
        n, k = self.array.shape[:2]
        rest = self.array.shape[2:]
        if self.in_memory:
            if getattr(self, "_flat_tensor", None) is None:
                raise ValueError("TeacherOutputs.prepare_rows() must run before rows()")
            return tf.gather(self._flat_tensor, flat)
        from knowledge_distillation.data.pipeline import numpy_reader

        return numpy_reader(self.array.reshape((n * k,) + rest))(flat)


def _read_key(path):
    """The stored key; None when there is none; "unreadable" (logged) when it cannot be read."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        logger.warning("teacher cache: cannot read the key file %s (%s): recomputing", path, e)
        return "unreadable"


def _write_key(path, key):
    write_json_atomic(path, key)


def _load(path, key, in_memory):
    try:
        array = np.load(path, mmap_mode=None if in_memory else "r", allow_pickle=False)
    except (OSError, ValueError) as e:
        logger.warning("teacher cache: cannot read %s (%s): recomputing", path, e)
        return None
    if array.dtype != np.float32 or array.shape[:1] != tuple(key["images"]["shape"][:1]):
        logger.warning("teacher cache: %s has shape %s %s, not the data's: recomputing",
                       path, array.shape, array.dtype)
        return None
    return array


def teacher_outputs(
    teacher,
    images,
    predict,
    *,
    cache_dir=None,
    preprocess=None,
    preprocessing_version=PREPROCESSING_VERSION,
    memory_budget_bytes=DEFAULT_MEMORY_BUDGET_BYTES,
    chunk_examples=None,
    views=None,
):
    """The teacher's outputs on `images`, from the cache or computed once.

    Args:
        teacher: the teacher `keras.Model` (hashed for the key).
        images: raw training images `(N, ...)` in the order the training
            pipeline indexes them.
        predict: `predict(raw_images) -> outputs`, batched inference mode
            (e.g. `Trainer.teacher_logits`). Called on chunks of at most
            `chunk_examples` images.
        cache_dir: folder of the stored cache; None keeps it in memory only
            (and then it must fit the budget). Defaults to None.
        preprocess: the preprocessing `predict` applies, fingerprinted for
            the key. Defaults to `data.preprocess`.
        preprocessing_version: version string of that preprocessing.
        memory_budget_bytes: the largest output array kept in memory; larger
            ones are memory-mapped from `cache_dir`. Defaults to 1 GiB.
        chunk_examples: images per `predict` call. Defaults to as many as
            take `DEFAULT_CHUNK_BYTES` (256 MiB) as float32.
        views: an `augment.ViewTable`: compute the outputs of its K views of
            every image, `(N, K, ...)`, calling
            `predict(raw_images, geometry=(dy, dx, flip))` once per view and
            chunk. Defaults to None (one output per image).

    Returns:
        A `TeacherOutputs`.

    Raises:
        ValueError: when the outputs exceed the budget and there is no
            `cache_dir`, or `predict` returns the wrong number of rows.
    """
    if preprocess is None:
        from knowledge_distillation.data import preprocess
    n = len(images)
    if n == 0:
        raise ValueError("teacher_outputs got no images")
    start = time.perf_counter()
    key = cache_key(teacher, images, preprocess, preprocessing_version, views)
    hash_seconds = time.perf_counter() - start
    out_shape = tuple(int(d) for d in teacher.output_shape[1:])
    if views is not None:
        out_shape = (views.views,) + out_shape
    nbytes = n * int(np.prod(out_shape, dtype=np.int64)) * 4
    in_memory = nbytes <= memory_budget_bytes
    if not in_memory and cache_dir is None:
        raise ValueError(
            f"teacher outputs need {nbytes} bytes, over the {memory_budget_bytes}-byte "
            "memory budget: give cache_dir so they are memory-mapped from a file"
        )
    array_path = key_path = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        array_path = os.path.join(cache_dir, VIEWS_ARRAY_FILE if views else ARRAY_FILE)
        key_path = os.path.join(cache_dir, VIEWS_KEY_FILE if views else KEY_FILE)
        stored = _read_key(key_path)
        if stored == key and os.path.isfile(array_path):
            array = _load(array_path, key, in_memory)
            if array is not None:
                logger.info(
                    "teacher cache: reusing %s (%d outputs, %s; key matches: same "
                    "teacher, data, preprocessing and dtype policy)",
                    array_path, n * (views.views if views else 1),
                    "in memory" if in_memory else "memory-mapped")
                return TeacherOutputs(array, key, "reused", array_path, 0.0, hash_seconds)
        elif isinstance(stored, dict):
            logger.info("teacher cache: %s is stale (%s changed): recomputing",
                        array_path, ", ".join(describe_change(stored, key)))
    logger.info(
        "teacher cache: computing %d teacher outputs once, batched, inference mode "
        "(%.1f MB, %s)", n * (views.views if views else 1), nbytes / 1e6,
        "in memory" if in_memory else f"memory-mapped from {array_path}")
    start = time.perf_counter()
    if chunk_examples is None:
        # The teacher's input, as float32, is what one image takes in a chunk.
        dims = [d for d in tuple(teacher.input_shape)[1:] if d] or np.shape(images)[1:]
        image_bytes = 4 * int(np.prod(dims, dtype=np.int64))
        chunk_examples = max(1, DEFAULT_CHUNK_BYTES // max(image_bytes, 1))
    if cache_dir is not None and os.path.exists(key_path):
        # Invalidate first: a crash before the new key is written must not
        # pair a new array with an old key.
        os.remove(key_path)
    shape = (n,) + out_shape
    if in_memory:
        array = _compute(predict, images, shape, chunk_examples, None, views)
        if cache_dir is not None:
            with atomic_path(array_path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, array)
    else:
        # Written chunk by chunk into the file, never whole in memory.
        with atomic_path(array_path) as tmp:
            _compute(predict, images, shape, chunk_examples, tmp, views).flush()
        array = np.load(array_path, mmap_mode="r")
    seconds = time.perf_counter() - start
    if cache_dir is not None:
        _write_key(key_path, key)
    computed = n * (views.views if views else 1)
    logger.info("teacher cache: %d outputs in %.1f s, %.0f per second (key hashed in %.2f s)",
                computed, seconds, computed / max(seconds, 1e-9), hash_seconds)
    return TeacherOutputs(array, key, "computed", array_path, seconds, hash_seconds)


def _compute(predict, images, shape, chunk_examples, mmap_path, views=None):
    if mmap_path is None:
        out = np.empty(shape, np.float32)
    else:
        out = np.lib.format.open_memmap(mmap_path, mode="w+", dtype=np.float32, shape=shape)
    n = shape[0]
    row = shape[2:] if views is not None else shape[1:]
    for k in range(views.views if views is not None else 1):
        if views is not None:
            logger.info("teacher cache: view %d of %d", k + 1, views.views)
        for begin in range(0, n, chunk_examples):
            end = min(n, begin + chunk_examples)
            if views is None:
                chunk = predict(images[begin:end])
            else:
                chunk = predict(images[begin:end], geometry=views.view_geometry(k, begin, end))
            chunk = np.asarray(chunk, dtype=np.float32)
            if chunk.shape != (end - begin,) + row:
                raise ValueError(
                    f"predict returned shape {chunk.shape} for {end - begin} images; "
                    f"expected {(end - begin,) + row}"
                )
            if views is None:
                out[begin:end] = chunk
            else:
                out[begin:end, k] = chunk
    return out
