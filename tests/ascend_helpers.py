"""Shared pieces of the ascend/ tests: the npu_device stand-in, tiny models and data."""

import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from knowledge_distillation import compat
from knowledge_distillation.ascend import device
from knowledge_distillation.compat import keras

layers = keras.layers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPU_STUB = os.path.join(REPO_ROOT, "tests", "npu_stub")
LOW = "mixed_bfloat16"  # this CPU-only suite's low-precision policy


@pytest.fixture(autouse=True)
def tensorflow_defaults():
    """Undoes the process-wide optimizer options a fusion switch sets."""
    yield
    device._fusion_switcher.reset()


@pytest.fixture
def npu(monkeypatch):
    """The recording `npu_device` stand-in, freshly imported."""
    monkeypatch.syspath_prepend(NPU_STUB)
    monkeypatch.delitem(sys.modules, "npu_device", raising=False)
    monkeypatch.setattr(device, "_opened_npu_device", None)
    import npu_device

    yield npu_device
    sys.modules.pop("npu_device", None)


def tiny_model(name="tiny", softmax=True, seed=0, conv_init="glorot_uniform"):
    compat.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(4, 3, kernel_initializer=conv_init, name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(3, name="dense")(x)
    if softmax:
        x = layers.Softmax(name="softmax")(x)
    return keras.Model(inputs, x, name=name)


def quadrant_data(n=96, seed=0):
    """Learnable 8x8 images: the class is the bright quadrant (of 3)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.random((n, 8, 8, 1), dtype=np.float32) * 0.2
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, 4 * r : 4 * r + 4, 4 * col : 4 * col + 4] += 0.8
    return x, y.astype(np.int32)


def dataset(x, y, batch=16, drop_remainder=True):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(
        batch, drop_remainder=drop_remainder
    )


def compiled(model, session, optimizer=None, from_logits=False):
    model.compile(
        optimizer=session.wrap_optimizer(optimizer or keras.optimizers.SGD(0.1)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        **session.compile_kwargs(),
    )
    return model


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)
