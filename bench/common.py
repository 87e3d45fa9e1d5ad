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


def model_view(model_name, image_size=None, preprocessing=None):
    """The `data.ImageView` a benchmark model sees: `image_size` square RGB for the
    keras.applications networks (default 64), `symmetric` scaling unless the network
    rescales itself; the zoo's own models take the stored images, `unit` scaling."""
    from knowledge_distillation import data as data_lib
    from knowledge_distillation import models

    if model_name in models.APPLICATIONS:
        size = image_size or 64
        default = models.RESCALES_ITSELF.get(model_name, "symmetric")
        return data_lib.ImageView((size, size), 3, "bilinear", preprocessing or default)
    size = (image_size, image_size) if image_size else None
    return data_lib.ImageView(size, None, "bilinear", preprocessing or "unit")


def processed(x, view, batch_size=256):
    """Stored images through `view` (resized, scaled) as one float32 array."""
    from knowledge_distillation import data as data_lib

    dataset = data_lib.make_dataset(x, np.zeros(len(x), np.int64), batch_size, view=view)
    return np.concatenate([images.numpy() for images, _ in dataset])


def recalibrate_batchnorm(model, dataset, batches=100):
    """Sets every BatchNormalization's moving mean and variance to the average of its
    batch statistics over `batches` batches of `dataset`, the weights staying as trained.

    After a brief training the moving averages describe the weights of earlier
    steps: measured on keras.applications MobileNetV2 trained on 10,000
    Fashion-MNIST images for 2 epochs (Adam 1e-3), 17% top-1 in inference
    mode against 85% in training mode. Averaging with momentum k / (k + 1) at
    batch k gives the mean over the batches, of the final weights.
    """
    import keras

    norms = [layer for layer in model._flatten_layers()
             if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    try:
        for k, (images, _) in enumerate(dataset.take(batches if norms else 0)):
            for layer in norms:
                layer.momentum = k / (k + 1.0)
            model(images, training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum


def float_model_and_data(model_path, data_path, model_name, train_size, test_size, train_epochs,
                         seed=0, image_size=None, preprocessing=None, model_cache=None):
    """The float Keras model to quantize, the data and the view, for the ONNX benchmarks.

    `model_path` (a trained `.keras`, e.g. the trainer's `distilled.keras`)
    is loaded; without it the zoo model `model_name` (one of ours or a
    keras.applications network) is trained here for `train_epochs` (Adam
    1e-3, batch 32, float32) on the first `train_size` training images
    through `model_view`, its BatchNorm statistics recalibrated
    (`recalibrate_batchnorm`), so the benchmark needs no earlier run. With
    `model_cache` (a folder) the trained model is kept there under a name
    holding every setting above and reused by the next run.

    Returns:
        `(model, data, view)`.
    """
    import keras

    from knowledge_distillation import data as data_lib
    from knowledge_distillation import models
    from knowledge_distillation.util.files import save_model_atomic

    data = data_lib.load_data(data_path, train_size=train_size, test_size=test_size)
    view = model_view(model_name, image_size, preprocessing)
    cached = None
    if model_cache and not model_path:
        size = "x".join(map(str, view.image_size)) if view.image_size else "stored"
        cached = os.path.join(model_cache, f"{model_name}_{size}_{view.preprocessing}_"
                                           f"n{len(data.x_train)}_e{train_epochs}_s{seed}.keras")
    if model_path or (cached and os.path.exists(cached)):
        model = models.load_model(model_path or cached, "--model")
        print(f"float model: {model_path or cached}", file=sys.stderr)
    else:
        shape = view.output_shape(data.x_train.shape[1:])
        model = models.build_model(model_name, shape, data.num_classes, seed=seed)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        start = time.perf_counter()
        model.fit(data_lib.make_dataset(data.x_train, data.y_train, 32, shuffle=True, seed=seed,
                                        view=view),
                  epochs=train_epochs, verbose=0)
        print(f"trained {model_name} on {len(data.x_train)} images x {train_epochs} epochs "
              f"at {shape}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        recalibrate_batchnorm(model, data_lib.make_dataset(data.x_train, data.y_train, 64,
                                                           shuffle=True, seed=seed + 1,
                                                           view=view))
        if cached:
            os.makedirs(model_cache, exist_ok=True)
            save_model_atomic(model, cached, {"preprocessing": view.preprocessing,
                                              "interpolation": view.interpolation})
    model(processed(data.x_test[:1], view))  # ONNX export wants a called model
    return model, data, view


def onnx_latency(paths, x, seconds=2.0, rounds=3, batches=(1, 32)):
    """Median ms per run of each ONNX model (`{name: path}`, one of them "float") at
    each batch size, ORT with every optimisation, in interleaved rounds of about
    `seconds` per model; and each model's ratio to "float"."""
    import collections

    from knowledge_distillation import quant

    sessions = {name: quant.onnx_session(path, optimize="all") for name, path in paths.items()}
    result = {}
    for batch in batches:
        feed = x[:batch]
        times = collections.defaultdict(list)
        for _ in range(rounds):
            for name, session in sessions.items():
                input_name = session.get_inputs()[0].name
                session.run(None, {input_name: feed})
                runs, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds or runs < 3:
                    session.run(None, {input_name: feed})
                    runs += 1
                times[name].append((time.perf_counter() - start) / runs * 1e3)
        medians = {name: float(np.median(t)) for name, t in times.items()}
        result[f"batch{batch}_ms"] = medians
        result[f"batch{batch}_vs_float"] = {name: ms / medians["float"] for name, ms in
                                            medians.items()}
    return result


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
    flags.DEFINE_string("model", None, "Float .keras model (default: train --model_name here; give --model_name "
                        "too for a keras.applications file, whose view it sets).")
    flags.DEFINE_string("model_name", "mlp_student",
                        "Zoo model (ours or keras.applications: mobilenet_v2, mobilenet_v3_small, "
                        "resnet50, efficientnet_b0, convnext_tiny) trained when --model is not "
                        "given.")
    flags.DEFINE_integer("image_size", None,
                         "Square size the images are resized to (keras.applications: 64).")
    flags.DEFINE_string("preprocessing", None,
                        "Pixel scaling (default: symmetric for keras.applications, none for "
                        "EfficientNet, unit for ours).")
    flags.DEFINE_string("model_cache", None,
                        "Folder keeping the model trained here, reused by the next run.")
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
