"""Shared fixtures: small slices of the real Fashion-MNIST through the real loader.

The suite runs on both stacks (see `knowledge_distillation/compat.py`). On
Keras 2.6 the quantizer's tests are not collected (the quantizer is Keras 3
only), and tests of Keras-3-only behaviour carry `keras3_only`.
"""

import os

import pytest

from knowledge_distillation import compat
from knowledge_distillation.compat import keras

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

collect_ignore_glob = [] if compat.KERAS3 else ["test_quant*.py"]
keras3_only = pytest.mark.skipif(not compat.KERAS3, reason=f"needs Keras 3; this is {compat.STACK}")


def keras2_gap(reason):
    """A known gap of the Keras 2.6 stack (issue 10): expected to fail there, and
    reported as soon as it passes (strict), so the mark is removed with the fix."""
    return pytest.mark.xfail(not compat.KERAS3, strict=True, reason=f"Keras 2.6: {reason}")


@pytest.fixture(scope="session")
def fashion_mnist_path():
    if not os.path.isdir(FASHION_MNIST):
        pytest.fail(
            f"{FASHION_MNIST} is missing: install Debian's dataset-fashion-mnist "
            "(bash .ci/run does)"
        )
    return FASHION_MNIST


@pytest.fixture(scope="session")
def small_data(fashion_mnist_path):
    from knowledge_distillation.data import load_data

    return load_data(fashion_mnist_path, train_size=512, test_size=256)


@pytest.fixture(autouse=True)
def float32_policy():
    """Every test starts and ends with the float32 global dtype policy."""
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")
