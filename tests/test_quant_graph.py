"""Units, BatchNorm folding and block partition on sequential and residual graphs."""

import keras
import numpy as np
import pytest
from keras import layers

from knowledge_distillation.quant import create_distill_config
from knowledge_distillation.quant.quantize_graph import Graph, find_units, partition
from knowledge_distillation.quant.quantize_layers import fold_batchnorm


def _randomize_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, n), rng.normal(0, 1, n),
                               rng.normal(0, 1, n), rng.uniform(0.2, 3, n)])


def _residual_model():
    """A MobileNetV2-like inverted residual plus a ResNet-like identity block."""
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    y = layers.Conv2D(16, 1, use_bias=False, name="expand")(x)
    y = layers.BatchNormalization(name="expand_bn")(y)
    y = layers.ReLU(6.0, name="expand_relu")(y)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(y)
    y = layers.BatchNormalization(name="dw_bn")(y)
    y = layers.ReLU(6.0, name="dw_relu")(y)
    y = layers.Conv2D(8, 1, use_bias=False, name="project")(y)
    y = layers.BatchNormalization(name="project_bn")(y)
    x = layers.Add(name="add1")([x, y])
    z = layers.Conv2D(8, 3, padding="same", name="res_a", activation="relu")(x)
    z = layers.Conv2D(8, 3, padding="same", name="res_b")(z)
    x = layers.Add(name="add2")([x, z])
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(4, name="logits")(x)
    model = keras.Model(inputs, outputs, name="residual")
    _randomize_bn(model)
    return model


def test_units_fold_single_consumer_batchnorm_and_activation():
    graph = Graph(_residual_model())
    units, skipped, unsupported = find_units(graph)
    assert [u.names for u in units] == [
        ["stem", "stem_bn", "stem_relu"], ["expand", "expand_bn", "expand_relu"],
        ["dw", "dw_bn", "dw_relu"], ["project", "project_bn"], ["res_a"], ["res_b"], ["logits"]]
    assert skipped == [] and unsupported == {}


@pytest.mark.parametrize("group_size, expected", [
    (1, [["stem", "stem_bn", "stem_relu"], ["expand", "expand_bn", "expand_relu"],
         ["dw", "dw_bn", "dw_relu"], ["project", "project_bn"], ["res_a"], ["res_b"], ["logits"]]),
    # chains stop where an output has two consumers (stem_relu feeds expand
    # and add1) and at merges: no block holds an Add
    (3, [["stem", "stem_bn", "stem_relu"],
         ["expand", "expand_bn", "expand_relu", "dw", "dw_bn", "dw_relu", "project", "project_bn"],
         ["res_a", "res_b"], ["logits"]]),
])
def test_residual_adds_never_straddle_a_block(group_size, expected):
    model = _residual_model()
    graph = Graph(model)
    units, _, _ = find_units(graph)
    blocks = partition(graph, units, group_size)
    assert blocks == expected
    for block in blocks:
        assert "add1" not in block and "add2" not in block
        for name in block[1:]:
            assert len(graph.by_name[name].inputs) == 1


def test_user_groups_single_path_only():
    model = _residual_model()
    config = create_distill_config(
        model, 'distill_group { start_layer_name: "expand" end_layer_name: "project_bn" }')
    assert ["expand", "expand_bn", "expand_relu", "dw", "dw_bn", "dw_relu", "project",
            "project_bn"] in config.distill_group
    with pytest.raises(ValueError, match=r"exactly one path.*'stem_relu' has 2 consumers"):
        create_distill_config(
            model, 'distill_group { start_layer_name: "stem" end_layer_name: "project_bn" }')
    with pytest.raises(ValueError, match=r"exactly one path.*'add2' merges 2 inputs"):
        create_distill_config(
            model, 'distill_group { start_layer_name: "res_b" end_layer_name: "logits" }')
    with pytest.raises(ValueError, match=r"start layer 'add1' has 2 inputs"):
        create_distill_config(
            model, 'distill_group { start_layer_name: "add1" end_layer_name: "res_a" }')


def test_skip_layers_and_types_stay_float():
    model = _residual_model()
    config = create_distill_config(
        model, 'quant_skip_layers: "stem"\nquant_skip_layer_types: "DepthwiseConv2D"')
    assert not config.layers["stem"].quant_enable and not config.layers["dw"].quant_enable
    assert all(name not in sum(config.distill_group, []) for name in ("stem", "dw", "dw_bn"))
    assert config.layers["expand"].quant_enable


@pytest.mark.parametrize("make_layer, shape", [
    (lambda: layers.Conv2D(6, 3, padding="same", use_bias=False), (2, 9, 9, 4)),
    (lambda: layers.Conv2D(6, 3, strides=2, groups=2), (2, 9, 9, 4)),
    (lambda: layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same"), (2, 9, 9, 3)),
    (lambda: layers.Dense(6), (2, 5)),
])
def test_batchnorm_folding_is_exact(make_layer, shape):
    layer = make_layer()
    bn = layers.BatchNormalization(epsilon=1e-3)
    x = np.random.default_rng(0).normal(0, 1, shape).astype(np.float32)
    y = bn(layer(x), training=False)
    rng = np.random.default_rng(1)
    n = y.shape[-1]
    bn.set_weights([rng.uniform(0.5, 2, n), rng.normal(0, 1, n), rng.normal(0, 1, n),
                    rng.uniform(0.1, 3, n)])
    expected = bn(layer(x), training=False).numpy()
    kernel, bias = fold_batchnorm(layer, bn)
    if isinstance(layer, layers.DepthwiseConv2D):
        folded = keras.ops.depthwise_conv(x, kernel, padding=layer.padding)
    elif isinstance(layer, layers.Dense):
        folded = x @ kernel
    else:
        folded = keras.ops.conv(x, kernel, strides=layer.strides, padding=layer.padding)
    np.testing.assert_allclose(np.asarray(folded) + bias, expected, rtol=1e-5, atol=2e-5)


def test_graph_errors():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Subclassed()
    model(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="no layer graph.*functional or sequential"):
        Graph(model)
    with pytest.raises(ValueError, match="not built with an input shape"):
        Graph(keras.Sequential([layers.Dense(2)]))
    a, b = keras.Input((3,)), keras.Input((3,))
    with pytest.raises(ValueError, match="2 inputs and 1 outputs"):
        Graph(keras.Model([a, b], layers.Add()([a, b])))
    inputs = keras.Input((4,))
    shared = layers.Dense(4, name="shared")
    with pytest.raises(ValueError, match="'shared' is called more than once"):
        Graph(keras.Model(inputs, shared(shared(inputs))))


class _Plain(layers.Conv2D):
    pass


class _Scaled(layers.Dense):
    def call(self, inputs):
        return super().call(inputs) * 0.5


def test_layers_are_quantized_by_capability_and_float_ones_have_a_reason():
    inputs = keras.Input((8, 8, 2))
    x = layers.SeparableConv2D(4, 3, name="sep")(inputs)
    x = _Plain(4, 3, name="plain")(x)  # a subclass that computes the same: quantized
    x = layers.Conv2DTranspose(4, 3, strides=2, name="up")(x)
    x = layers.Reshape((-1, 4), name="seq")(x)
    x = layers.Conv1D(4, 3, padding="causal", name="c1")(x)
    x = layers.EinsumDense("abc,cd->abd", output_shape=(None, 4), name="proj")(x)
    x = layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 2), name="heads")(x)
    x = layers.GlobalAveragePooling1D(name="pool")(layers.Reshape((-1, 4), name="flat")(x))
    x = _Scaled(3, name="scaled")(x)
    outputs = layers.Dense(2, name="logits")(x)
    units, _, unsupported = find_units(Graph(keras.Model(inputs, outputs)))
    assert [(u.head, u.kind) for u in units] == [
        ("sep", "separable"), ("plain", "conv2d"), ("up", "conv_transpose"), ("c1", "conv1d"),
        ("proj", "dense"), ("logits", "dense")]
    assert unsupported == {
        "heads": "equation 'abc,cde->abde' is not a projection of the last axis (such as "
                 "'abc,cd->abd')",
        "scaled": "a subclass of Dense that overrides call()"}
