"""The model zoo and safe loading of users' models.

Every builder takes the input shape and class count from the data and returns
a functional model with logits (no softmax) as output.
"""

import os
import zipfile

from knowledge_distillation import compat
from knowledge_distillation.compat import keras

layers = keras.layers


def seed_convnet(input_shape, num_classes, filters, name):
    """The keras-io / ModelZoo convnet: two strided convs and one Dense.

    Conv(f1, 3x3, s2) -> LeakyReLU(0.2) -> MaxPool(2, s1) -> Conv(f2, 3x3, s2)
    -> Flatten -> Dense(num_classes).
    """
    first, second = filters
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Conv2D(first, (3, 3), strides=(2, 2), padding="same"),
            compat.leaky_relu(0.2),
            layers.MaxPooling2D(pool_size=(2, 2), strides=(1, 1), padding="same"),
            layers.Conv2D(second, (3, 3), strides=(2, 2), padding="same"),
            layers.Flatten(),
            layers.Dense(num_classes),
        ],
        name=name,
    )


def seed_teacher(input_shape, num_classes):
    """The seed teacher: 256 and 512 filters (about 116 MFLOP per 28x28 image)."""
    return seed_convnet(input_shape, num_classes, (256, 512), "seed_teacher")


def seed_student(input_shape, num_classes):
    """The seed student: 16 and 32 filters (about 0.5 MFLOP per 28x28 image)."""
    return seed_convnet(input_shape, num_classes, (16, 32), "seed_student")


# Moving statistics settle within a few hundred steps, so short runs and
# small data sets evaluate sensibly too.
BN_MOMENTUM = 0.9


def _conv_bn_relu(x, filters, name):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def cnn_teacher(input_shape, num_classes):
    """The default teacher: a small VGG-style convnet with BatchNorm.

    BatchNorm and dropout let it train fast at Adam's default learning rate
    and generalise: 93.1-93.3% on Fashion-MNIST in 5 epochs, where the seed
    teacher ends below the seed student. About 38 MFLOP per 28x28 image.
    """
    inputs = keras.Input(shape=input_shape)
    x = _conv_bn_relu(inputs, 32, "conv1")
    x = _conv_bn_relu(x, 32, "conv2")
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = _conv_bn_relu(x, 64, "conv3")
    x = _conv_bn_relu(x, 64, "conv4")
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.3, name="dropout1")(x)
    x = layers.Dense(256, use_bias=False, name="fc1")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="fc1_bn")(x)
    x = layers.ReLU(name="fc1_relu")(x)
    x = layers.Dropout(0.5, name="dropout2")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="cnn_teacher")


def _mlp(input_shape, num_classes, width, dropout, name):
    model_layers = [keras.Input(shape=input_shape), layers.Flatten()]
    for _ in range(2):
        model_layers.append(layers.Dense(width, activation="relu"))
        if dropout:
            model_layers.append(layers.Dropout(dropout))
    model_layers.append(layers.Dense(num_classes))
    return keras.Sequential(model_layers, name=name)


def mlp_teacher(input_shape, num_classes):
    """Hinton et al.'s teacher: two 1200-unit ReLU layers with dropout 0.5."""
    return _mlp(input_shape, num_classes, 1200, 0.5, "mlp_teacher")


def mlp_student(input_shape, num_classes):
    """Hinton et al.'s student: two 800-unit ReLU layers, no dropout."""
    return _mlp(input_shape, num_classes, 800, 0.0, "mlp_student")


# keras.applications networks, built with weights=None (nothing downloads)
# at the data's size and class count, with logits out. Where Keras offers
# it, their own input rescaling is switched off, so that --preprocessing
# alone decides the scaling; EfficientNet has no such switch and rescales
# 0-255 input itself (give it --preprocessing none).
APPLICATIONS = {
    "mobilenet_v2": ("MobileNetV2", {"alpha": None}),
    "mobilenet_v3_small": ("MobileNetV3Small", {"alpha": None, "include_preprocessing": False}),
    "resnet50": ("ResNet50", {}),
    "efficientnet_b0": ("EfficientNetB0", {}),
    "convnext_tiny": ("ConvNeXtTiny", {"include_preprocessing": False}),
}
# The applications that rescale their input themselves (see above).
RESCALES_ITSELF = {"efficientnet_b0": "none"}
MIN_APPLICATION_SIZE = 32


def build_application(name, input_shape, num_classes, alpha_width=1.0):
    """A keras.applications network by zoo name (`APPLICATIONS`), untrained, emitting logits.

    Args:
        name: a key of `APPLICATIONS`.
        input_shape: `(H, W, C)`; H and W at least 32.
        num_classes: number of output logits.
        alpha_width: width multiplier of the MobileNets. Defaults to 1.0.

    Raises:
        ValueError: one line when this Keras lacks the network or it cannot
            be built at this input shape.
    """
    class_name, options = APPLICATIONS[name]
    builder = getattr(keras.applications, class_name, None)
    if builder is None:
        raise ValueError(f"{name}: keras.applications.{class_name} is not in {compat.STACK}; "
                         "choose another model or use the Keras 3 stack")
    height, width = input_shape[:2]
    if min(height, width) < MIN_APPLICATION_SIZE:
        raise ValueError(f"{name}: input {height}x{width} is too small; keras.applications "
                         f"networks take at least {MIN_APPLICATION_SIZE}x"
                         f"{MIN_APPLICATION_SIZE}: resize with --image_size")
    kwargs = {key: (alpha_width if key == "alpha" else value) for key, value in options.items()}
    try:
        return builder(input_shape=tuple(input_shape), weights=None, classes=int(num_classes),
                       classifier_activation=None, **kwargs)
    except (ValueError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{name}: cannot be built for input {tuple(input_shape)}: "
                         f"{reason}") from e


TEACHERS = {
    "cnn": cnn_teacher,
    "seed_teacher": seed_teacher,
    "mlp_teacher": mlp_teacher,
}
STUDENTS = {
    "seed_student": seed_student,
    "mlp_student": mlp_student,
}
MODELS = {**TEACHERS, **STUDENTS, **{name: build_application for name in APPLICATIONS}}


def build_model(name, input_shape, num_classes, seed=None, alpha_width=1.0):
    """Builds a zoo model by name, shaped by the data.

    Args:
        name: one of `MODELS` (the zoo's own, or a keras.applications name).
        input_shape: `(H, W, C)` of one example.
        num_classes: number of output logits.
        seed: if given, seeds weight initialisation (same seed, same weights).
        alpha_width: width multiplier of the MobileNets. Defaults to 1.0.

    Returns:
        A `keras.Model` producing logits.
    """
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}"
        )
    if seed is not None:
        compat.set_random_seed(seed)
    if name in APPLICATIONS:
        return build_application(name, tuple(input_shape), int(num_classes), alpha_width)
    return MODELS[name](tuple(input_shape), int(num_classes))


def load_model(path, flag="--model"):
    """Loads a user's model file: `.keras` (Keras 3, safe_mode on) or Keras 2 HDF5 (`.h5`).

    Keras 3 loads both, so a model the Keras 2.6 (Ascend) trainer wrote can
    be distilled from or quantized here; Keras 2.6 loads `.h5`.

    Args:
        path: the model file.
        flag: the flag that named it, for error messages.

    Returns:
        The loaded `keras.Model`.

    Raises:
        ValueError: one line naming the flag and file when it is missing, not
            a model file this Keras reads, or cannot be loaded safely.
    """
    expected = " or ".join(compat.MODEL_EXTS)
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {path} is a folder; expected a {expected} model file")
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: {path} does not exist; expected a {expected} model file")
    if path.endswith(".keras") and not compat.KERAS3:
        raise ValueError(
            f"{flag}: {path} is a Keras 3 .keras file, which {compat.STACK} cannot read; "
            "on a Keras 3 host, save it as HDF5 (model.save('name.h5'))")
    if not path.endswith(compat.MODEL_EXTS):
        raise ValueError(
            f"{flag}: {path} is not a {expected} model file; save the model with "
            f"model.save('name{compat.MODEL_EXT}')"
        )
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise ValueError(
            f"{flag}: {path} is not a .keras archive (not a zip file: truncated or another "
            "format); save the model with model.save('name.keras')")
    if path.endswith(compat.H5_EXTS) and not _is_hdf5(path):
        raise ValueError(
            f"{flag}: {path} is not an HDF5 file (truncated or another format); save the "
            f"model with model.save('name.h5')")
    try:
        model = compat.load_model_file(path)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{flag}: cannot load {path}: {reason}") from e
    if not isinstance(model, keras.Model):
        raise ValueError(f"{flag}: {path} holds a {type(model).__name__}, not a model")
    return model


def _is_hdf5(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def check_compatible(model, input_shape, num_classes, flag, size_flag="--image_size"):
    """Raises a clear error if `model` does not fit the data (`input_shape` after resizing)."""
    model_in = tuple(model.input_shape[1:]) if hasattr(model, "input_shape") else None
    if model_in is not None and None not in model_in and model_in != tuple(input_shape):
        raise ValueError(
            f"{flag}: model input shape {model_in} does not match the data's "
            f"{tuple(input_shape)}; resize the images to the model's with "
            f"{size_flag} {model_in[0]},{model_in[1]}"
            + (f" (and --channels {model_in[2]})" if model_in[2] != input_shape[2] else "")
        )
    out = model.output_shape[-1] if hasattr(model, "output_shape") else None
    if out is not None and out != num_classes:
        raise ValueError(
            f"{flag}: model has {out} outputs but the data has {num_classes} classes"
        )
