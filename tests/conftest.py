"""Shared fixtures: small slices of the real Fashion-MNIST through the real loader."""

import os

import keras
import pytest

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
