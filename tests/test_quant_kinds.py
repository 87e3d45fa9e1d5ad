"""The layer kinds quantized by capability, exported to ONNX in all three forms."""

import keras
import numpy as np
import pytest
from keras import layers

from knowledge_distillation import models
from knowledge_distillation.quant import build_onnx, create_distill_config, create_quant_model, onnx_session
from knowledge_distillation.quant.quantize import evaluation_batch_size
from knowledge_distillation.quant.quantize_distill import distill
from knowledge_distillation.util import cpu as cpu_info


class _StandardisedConv(layers.Conv2D):
    """Weight standardisation (BiT's StdConv): keeps call(), changes convolution_op()."""

    def convolution_op(self, inputs, kernel):
        mean = keras.ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
        return super().convolution_op(inputs, kernel - mean)


def _run(proto, x, optimize="basic"):
    session = onnx_session(proto, optimize=optimize)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _kinds_model():
    keras.utils.set_random_seed(11)
    inputs = keras.Input((9, 9, 3))
    x = layers.SeparableConv2D(6, 3, padding="same", depth_multiplier=2, name="sep")(inputs)
    x = layers.Conv2DTranspose(6, 3, strides=2, padding="same", output_padding=1, name="up1")(x)
    x = layers.ReLU(name="up1_relu")(x)
    x = layers.Conv2DTranspose(4, 2, strides=3, padding="valid", output_padding=1, name="up2")(x)
    x = layers.Reshape((-1, 4), name="seq")(layers.AveragePooling2D(4, name="pool")(x))
    x = layers.Conv1D(8, 3, padding="causal", dilation_rate=2, activation="relu", name="c1")(x)
    x = layers.Conv1D(8, 5, strides=2, padding="same", groups=2, name="c2")(x)
    x = layers.Dense(6, activation="relu", name="seq_dense")(x)
    x = layers.EinsumDense("abc,cd->abd", output_shape=(None, 5), bias_axes="d", name="ein")(x)
    outputs = layers.Dense(4, name="logits")(layers.GlobalAveragePooling1D(name="gap")(x))
    return keras.Model(inputs, outputs)


def test_every_kind_exports_like_the_tf_simulation():
    model = _kinds_model()
    images = np.random.default_rng(3).uniform(0, 1, (16, 9, 9, 3)).astype(np.float32)
    qmodel = create_quant_model(model, create_distill_config(model))
    assert list(qmodel.quant_layers) == ["sep_depthwise", "sep", "up1", "up2", "c1", "c2",
                                         "seq_dense", "ein", "logits"]
    distill(qmodel, images, epochs=0)
    simulation = qmodel.keras_model(images).numpy()
    float_out = model(images).numpy()
    assert np.abs(simulation - float_out).max() <= 0.1 * np.abs(float_out).max()
    scale = np.abs(simulation).max()
    fake = build_onnx(qmodel.keras_model, "fake_quant")
    np.testing.assert_allclose(_run(fake, images), simulation, atol=1e-5 * scale)
    integer = build_onnx(qmodel.keras_model, "deploy", deploy_format="integer")
    np.testing.assert_allclose(_run(integer, images), simulation, atol=1e-5 * scale)
    qdq = build_onnx(qmodel.keras_model, "deploy", deploy_format="qdq")
    if cpu_info.is_x86_64() and not cpu_info.vnni_flags(cpu_info.read_cpu_flags()):
        pytest.skip("x86 without VNNI: ORT's fused kernels may saturate (auto picks integer)")
    step = (simulation.max() - simulation.min()) / 255.0
    assert np.abs(_run(qdq, images, optimize="all") - simulation).max() <= step


def test_a_subclass_changing_the_convolution_stays_float():
    inputs = keras.Input((8, 8, 2))
    x = _StandardisedConv(4, 3, name="std")(inputs)
    outputs = layers.Dense(2, name="logits")(layers.Flatten()(x))
    qmodel = create_quant_model(keras.Model(inputs, outputs),
                                create_distill_config(keras.Model(inputs, outputs)))
    assert list(qmodel.quant_layers) == ["logits"]
    assert qmodel.float_layers() == [{
        "layer": "std", "type": "_StandardisedConv",
        "reason": "a subclass of Conv2D that overrides convolution_op()"}]


def test_a_name_taken_by_a_separable_part_is_one_error():
    inputs = keras.Input((8, 8, 2))
    x = layers.SeparableConv2D(4, 3, name="a")(inputs)
    x = layers.Conv2D(4, 1, name="a_depthwise")(x)
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    with pytest.raises(ValueError, match="'a_depthwise' .* depthwise part of SeparableConv2D 'a'"):
        create_quant_model(model, create_distill_config(model))


def test_evaluation_batches_shrink_with_the_activations():
    assert evaluation_batch_size(models.build_model("mlp_student", (28, 28, 1), 10)) == 256
    flat = evaluation_batch_size(models.build_model("mobilenet_v2", (224, 224, 3), 10))
    assert 8 <= flat <= 16
    backbone = keras.applications.MobileNetV2(input_shape=(None, None, 3), weights=None,
                                              include_top=False)
    inputs = keras.Input((224, 224, 3))
    nested = keras.Model(inputs, layers.Dense(10)(layers.GlobalAveragePooling2D()(backbone(inputs))))
    assert evaluation_batch_size(nested) <= flat
