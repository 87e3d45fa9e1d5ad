"""Helpers shared by the benchmarks: machine description, matmul peak, JSON output.

Every benchmark prints its figures as ONE JSON line on stdout (logs go to
stderr), and reports ratios against a baseline measured in the same process,
interleaved where possible, because this machine is shared and absolute
timings drift.
"""

import json
import os
import sys
import time

import numpy as np


def machine():
    """CPU model, core count, ISA flags that matter, and the 1-minute load."""
    from knowledge_distillation.util import cpu

    return cpu.describe()


def matmul_gflops(n=2048, repeats=3, dtype=np.float32):
    """Best-of-`repeats` GFLOP/s of an n^3 NumPy matmul (2 n^3 FLOPs)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    a @ b  # warm-up: thread pool, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best / 1e9


# stdout carries the one JSON line alone: whatever else prints there (ONNX
# Runtime's calibrators print progress) goes to stderr with the logs.
_JSON_OUT = sys.stdout
sys.stdout = sys.stderr


def emit(payload):
    """Prints `payload` as one JSON line on the process's stdout."""
    _JSON_OUT.write(json.dumps(payload, sort_keys=True, default=float) + "\n")
    _JSON_OUT.flush()


def quiet_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def float_model_and_data(model_path, data_path, student, train_size, test_size, train_epochs,
                         seed=0):
    """The float Keras model to quantize and the data, for benchmarks 3 and 4.

    `model_path` (a trained `.keras`, e.g. the trainer's `distilled.keras`)
    is loaded; without it a zoo `student` is trained for `train_epochs` here,
    so the benchmark needs no earlier run.
    """
    import keras

    from knowledge_distillation import data as data_lib
    from knowledge_distillation import models

    data = data_lib.load_data(data_path, train_size=train_size, test_size=test_size)
    if model_path:
        model = models.load_model(model_path, "--model")
    else:
        model = models.build_model(student, data.input_shape, data.num_classes, seed=seed)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(data_lib.make_dataset(data.x_train, data.y_train, 32, shuffle=True, seed=seed),
                  epochs=train_epochs, verbose=0)
    model(data_lib.preprocess(data.x_test[:1]))  # ONNX export wants a called model
    return model, data


class CalibrationReader:
    """An `onnxruntime.quantization.CalibrationDataReader` over in-memory images."""

    def __init__(self, input_name, images, batch_size=32):
        self._batches = iter([{input_name: images[i:i + batch_size]}
                              for i in range(0, len(images), batch_size)])

    def get_next(self):
        return next(self._batches, None)


def define_float_model_flags(flags):
    """The flags that pick (or train) the float model the ONNX benchmarks start from."""
    flags.DEFINE_string("data_path", "/usr/share/datasets/fashion-mnist", "MNIST-format data folder.")
    flags.DEFINE_string("model", None, "Float .keras model (default: train --student here).")
    flags.DEFINE_string("student", "mlp_student", "Zoo model trained when --model is not given.")
    flags.DEFINE_integer("train_size", None, "Training images (default: all).")
    flags.DEFINE_integer("train_epochs", 1, "Epochs of the model trained here.")
    flags.DEFINE_integer("calibration_size", 1024, "Quantizer calibration images.")


# The AMCT simple config that asks for INT4 weights (per channel).
INT4_CONFIG = "distill_weight_quant_config { arq_distill { channel_wise: true dst_type: INT4 } }\n"


def define_quantizer_flags(flags, epochs_help):
    """The flags the quantizer benchmarks share: test images, distillation passes, weight types."""
    flags.DEFINE_integer("test_size", None, "Test images (default: all).")
    flags.DEFINE_integer("epochs", 1, epochs_help)
    flags.DEFINE_list("bits", ["INT8", "INT4"], "Weight types.")
