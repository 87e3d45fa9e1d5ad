"""ONNX export: float, fake-quant and deploy models against Keras and each other."""

import logging

import keras
import numpy as np
import onnx
import pytest
from keras import layers

from knowledge_distillation.quant import (
    build_onnx,
    create_distill_config,
    create_quant_model,
    onnx_session,
)
from knowledge_distillation.quant import quantize_onnx, quantize_onnx_builder
from knowledge_distillation.util import cpu as cpu_info


class _Doubled(layers.Conv2D):
    """A Conv2D subclass computing something else: stays float, exported through tf2onnx."""

    def call(self, inputs):
        return super().call(inputs) * 2.0


def _model():
    """Every native handler once, plus layers exported through tf2onnx."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((14, 14, 2))
    x = layers.Rescaling(2.0, offset=-1.0, name="rescale")(inputs)
    x = layers.ZeroPadding2D(((1, 0), (2, 1)), name="pad")(x)
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    y = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    y = layers.LeakyReLU(0.1, name="dw_leaky")(y)
    y = layers.Conv2D(8, 1, name="project", activation="swish")(y)
    x = layers.Add(name="add")([x, y])
    x = layers.SeparableConv2D(8, 3, padding="same", name="sep")(x)
    x = _Doubled(8, 1, name="doubled")(x)  # tf2onnx, float
    x = layers.UpSampling2D(name="up")(x)  # tf2onnx
    x = layers.Conv2D(6, 3, strides=2, groups=2, padding="valid", name="grouped")(x)
    x = layers.BatchNormalization(name="free_bn")(layers.ELU(name="elu")(x))
    a = layers.MaxPooling2D(2, padding="same", name="maxpool")(x)
    b = layers.AveragePooling2D(2, padding="same", name="avgpool")(x)
    x = layers.Concatenate(name="concat")([a, b])
    g = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(16, activation="relu", name="fc")(x)
    x = layers.Concatenate(name="concat2")([x, g])
    x = layers.Dropout(0.5, name="dropout")(x)
    outputs = layers.Dense(5, name="logits")(x)
    model = keras.Model(inputs, outputs, name="zoo")
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, n), rng.normal(0, 0.5, n),
                               rng.normal(0, 0.5, n), rng.uniform(0.5, 2, n)])
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(0, 1, (64, 14, 14, 2)).astype(np.float32)


def _run(proto, x):
    session = onnx_session(proto)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_float_export_matches_keras(model, images):
    proto = build_onnx(model, "float")
    types = {node.op_type for node in proto.graph.node}
    assert {"Conv", "MatMul", "Pad", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat",
            "Clip", "LeakyRelu", "Elu"} <= types
    np.testing.assert_allclose(_run(proto, images), model(images).numpy(), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def frozen(model, images):
    config = create_distill_config(
        model, 'distill_override_layers { layer_name: "grouped" '
               'distill_weight_quant_config { arq_distill { dst_type: INT4 } } }')
    qmodel = create_quant_model(model, config)
    assert set(qmodel.quant_layers) == {"stem", "dw", "project", "sep_depthwise", "sep",
                                        "grouped", "fc", "logits"}
    assert qmodel.float_layers() == [
        {"layer": "doubled", "type": "_Doubled",
         "reason": "a subclass of Conv2D that overrides call()"},
        {"layer": "free_bn", "type": "BatchNormalization",  # after the ELU: not folded
         "reason": "no quantized form: it runs in float between the quantized layers"}]
    from knowledge_distillation.quant.quantize_distill import distill

    distill(qmodel, images, epochs=0)
    return qmodel


def test_fake_quant_onnx_reproduces_tf_simulation(frozen, images):
    proto = build_onnx(frozen.keras_model, "fake_quant")
    quant_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quant_nodes) == 2 * len(frozen.quant_layers)  # input and weight of each
    got = _run(proto, images)
    expected = frozen.keras_model(images).numpy()
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 0.02 * scale
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.98


def test_deploy_runs_integer_kernels_and_matches_fake_quant(frozen, images):
    fake = build_onnx(frozen.keras_model, "fake_quant")
    deploy = build_onnx(frozen.keras_model, "deploy")
    ops = [n.op_type for n in deploy.graph.node]
    assert ops.count("ConvInteger") == 6 and ops.count("MatMulInteger") == 2
    assert "DequantizeLinear" not in ops
    inits = {t.name: t for t in deploy.graph.initializer}
    for node in deploy.graph.node:
        if node.op_type in ("ConvInteger", "MatMulInteger"):
            source = node.input[1]
            if source not in inits:  # INT4 weights are cast to int8 first
                cast = next(n for n in deploy.graph.node if n.output[0] == source)
                assert cast.op_type == "Cast"
                source = cast.input[0]
                assert inits[source].data_type == onnx.TensorProto.INT4
                continue
            weights = onnx.numpy_helper.to_array(inits[source])
            assert weights.dtype == np.int8 and np.abs(weights).max() <= 127
            # the activation operand is int8 too (S8S8: no u8 x s8 saturation)
            producer = next(n for n in deploy.graph.node if n.output[0] == node.input[0])
            assert producer.op_type == "QuantizeLinear"
            zero_point = inits[producer.input[2]]
            assert zero_point.data_type == onnx.TensorProto.INT8
    got, reference = _run(deploy, images), _run(fake, images)
    assert np.abs(got - reference).max() <= 0.02 * np.abs(reference).max()
    assert np.mean(got.argmax(-1) == reference.argmax(-1)) >= 0.98


def test_integer_exact_layers_agree_bitwise(images):
    """Quantized layers, ReLU6, Add, padding, pooling: no float sum differs."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((14, 14, 2))
    x = layers.ZeroPadding2D(1, name="pad")(inputs)
    x = layers.Conv2D(16, 3, strides=2, use_bias=False, name="stem")(x)
    x = layers.ReLU(6.0, name="stem_relu")(layers.BatchNormalization(name="stem_bn")(x))
    y = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = layers.Conv2D(16, 1, name="pw")(layers.ReLU(6.0, name="dw_relu")(y))
    x = layers.MaxPooling2D(name="pool")(layers.Add(name="add")([x, y]))
    outputs = layers.Dense(7, name="logits")(layers.Flatten(name="flatten")(x))
    model = keras.Model(inputs, outputs)
    config = create_distill_config(
        model, 'distill_override_layers { layer_name: "pw" '
               'distill_weight_quant_config { arq_distill { dst_type: INT4 } } }')
    qmodel = create_quant_model(model, config)
    from knowledge_distillation.quant.quantize_distill import distill

    distill(qmodel, images, epochs=0)
    expected = qmodel.keras_model(images).numpy()
    np.testing.assert_array_equal(_run(build_onnx(qmodel.keras_model, "fake_quant"), images), expected)
    np.testing.assert_array_equal(_run(build_onnx(qmodel.keras_model, "deploy"), images), expected)


def test_unfrozen_model_cannot_be_exported(model):
    qmodel = create_quant_model(model, create_distill_config(model))
    with pytest.raises(ValueError, match="is not frozen"):
        build_onnx(qmodel.keras_model, "deploy")


def test_mixed_precision_model_is_quantized_in_float32(images):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    inputs = keras.Input((14, 14, 2))
    x = layers.Conv2D(4, 3, name="conv")(inputs)
    x = layers.ReLU(name="relu")(layers.BatchNormalization(name="bn")(x))
    outputs = layers.Dense(3, name="logits")(layers.Flatten(name="flatten")(x))
    model = keras.Model(inputs, outputs)
    qmodel = create_quant_model(model, create_distill_config(model))
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    for layer in qmodel.keras_model.layers + qmodel.teacher_model.layers:
        assert layer.dtype_policy.name == "float32", layer.name
    from knowledge_distillation.quant.quantize_distill import distill

    distill(qmodel, images[:32], epochs=1, batch_size=16)
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    expected = qmodel.keras_model(images).numpy()
    assert expected.dtype == np.float32
    np.testing.assert_allclose(_run(build_onnx(qmodel.keras_model, "fake_quant"), images),
                               expected, atol=1e-4 * np.abs(expected).max())


def test_data_dump_distils_from_memory_mapped_files(images, tmp_path):
    keras.utils.set_random_seed(7)
    inputs = keras.Input((14, 14, 2))
    x = layers.Conv2D(4, 3, name="conv", activation="relu")(inputs)
    outputs = layers.Dense(3, name="logits")(layers.Flatten(name="flatten")(x))
    model = keras.Model(inputs, outputs)
    config = create_distill_config(model, "data_dump: true")
    assert config.data_dump
    from knowledge_distillation.quant import record_to_text
    from knowledge_distillation.quant.quantize_distill import distill

    records = []
    for dump_dir in (None, str(tmp_path)):
        qmodel = create_quant_model(model, config)
        distill(qmodel, images, epochs=1, batch_size=16, dump_dir=dump_dir)
        records.append(record_to_text(qmodel.states()))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "block000_input.npy", "block000_target.npy", "block001_input.npy", "block001_target.npy"]
    assert records[0] == records[1]


def _integer_op_operands(proto):
    """(activation zero point, activation producer, weight source) of each integer op."""
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {n.output[0]: n for n in proto.graph.node}
    for node in proto.graph.node:
        if node.op_type in ("ConvInteger", "MatMulInteger"):
            weight = inits.get(node.input[1])
            if weight is None:  # INT4 weights, cast to int8
                cast = producers[node.input[1]]
                assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.INT8
                weight = inits[cast.input[0]]
            yield inits[node.input[2]], producers[node.input[0]], inits, weight


def test_uint8_and_int8_deploy_activations_give_identical_logits(small_data):
    """On Fashion-MNIST: the uint8 model (zero point + 128) is the int8 model, bitwise."""
    from knowledge_distillation.data import preprocess
    from knowledge_distillation.quant.quantize_distill import distill

    keras.utils.set_random_seed(11)
    inputs = keras.Input(small_data.input_shape)
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = layers.ReLU(name="conv_relu")(layers.BatchNormalization(name="conv_bn")(x))
    x = layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw")(x)
    x = layers.Conv2D(8, 1, name="pw", activation="relu")(x)
    x = layers.Flatten(name="flatten")(layers.MaxPooling2D(name="pool")(x))
    outputs = layers.Dense(small_data.num_classes, name="logits")(x)
    model = keras.Model(inputs, outputs)
    config = create_distill_config(
        model, 'distill_override_layers { layer_name: "pw" '
               'distill_weight_quant_config { arq_distill { dst_type: INT4 } } }')
    qmodel = create_quant_model(model, config)
    distill(qmodel, preprocess(small_data.x_train[:256]).numpy(), epochs=0)
    offsets = {name: state.offset_d for name, state in qmodel.states().items()}
    assert any(offset != -128 for offset in offsets.values()), offsets  # signed inputs too

    int8 = build_onnx(qmodel.keras_model, "deploy")
    uint8 = build_onnx(qmodel.keras_model, "deploy", activation_dtype="uint8")
    for proto, dtype in ((int8, onnx.TensorProto.INT8), (uint8, onnx.TensorProto.UINT8)):
        operands = list(_integer_op_operands(proto))
        assert len(operands) == 4
        for zero_point, producer, inits, weight in operands:
            assert zero_point.data_type == dtype
            assert producer.op_type == "QuantizeLinear"
            assert inits[producer.input[2]].name == zero_point.name  # quantized with it
            assert weight.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)
    zero_points = sorted(int(onnx.numpy_helper.to_array(z)) for z, *_ in _integer_op_operands(uint8))
    assert zero_points == sorted(offset + 128 for offset in offsets.values())

    images = preprocess(small_data.x_test).numpy()
    got = _run(uint8, images)
    np.testing.assert_array_equal(got, _run(int8, images))
    np.testing.assert_array_equal(got, qmodel.keras_model(images).numpy())


@pytest.mark.parametrize("mode, options, message", [
    ("deploy", {"activation_dtype": "auto"}, "activation_dtype must be one of int8, uint8, got 'auto'"),
    ("fake_quant", {"activation_dtype": "uint8"}, "deploy model only, not to the fake_quant model"),
    ("deploy", {"deploy_format": "trt"}, "deploy_format must be one of qdq, integer, got 'trt'"),
    ("fake_quant", {"deploy_format": "qdq"}, "deploy model only, not to the fake_quant model"),
])
def test_deploy_options_are_checked(frozen, mode, options, message):
    with pytest.raises(ValueError, match=message):
        build_onnx(frozen.keras_model, mode, **options)


@pytest.mark.parametrize("flags, machine, requested, expected, warns", [
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", "auto", "uint8", False),
    ({"avx2", "avx_vnni"}, "x86_64", "auto", "uint8", False),
    ({"avx2", "fma"}, "x86_64", "auto", "int8", False),
    ({"avx2", "fma"}, "x86_64", "uint8", "uint8", True),
    ({"avx2", "fma"}, "x86_64", "int8", "int8", False),
    ({"avx512_vnni"}, "x86_64", "int8", "int8", False),
    ({"asimd", "asimddp"}, "aarch64", "auto", "int8", False),
    ({"asimd", "asimddp"}, "aarch64", "uint8", "uint8", False),
])
def test_deploy_activation_dtype_follows_the_cpu(caplog, flags, machine, requested, expected,
                                                 warns):
    with caplog.at_level(logging.INFO, logger="knowledge_distillation"):
        assert quantize_onnx.deploy_activation_dtype(requested, cpu_flags=flags,
                                                     machine=machine) == expected
    records = [r for r in caplog.records if r.name == quantize_onnx.logger.name]
    assert len(records) == 1 and f"{expected} activations" in records[0].getMessage()
    assert (records[0].levelno == logging.WARNING) == warns
    if warns:
        assert "saturate" in records[0].getMessage()


def test_deploy_activation_dtype_reads_cpuinfo(caplog, monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2 avx512_vnni\n")
    monkeypatch.setattr(cpu_info, "CPUINFO", str(cpuinfo))
    assert quantize_onnx.deploy_activation_dtype(machine="x86_64") == "uint8"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2\n")
    assert quantize_onnx.deploy_activation_dtype(machine="x86_64") == "int8"
    # flags unreadable (not Linux): int8, the safe choice, and uint8 without a warning
    monkeypatch.setattr(cpu_info, "CPUINFO", str(tmp_path / "missing"))
    caplog.clear()  # earlier tests may leave the logger at INFO: drop the two lines above
    with caplog.at_level(logging.INFO, logger="knowledge_distillation"):
        assert quantize_onnx.deploy_activation_dtype(machine="x86_64") == "int8"
        assert quantize_onnx.deploy_activation_dtype("uint8", machine="AMD64") == "uint8"
    messages = [(r.levelno, r.getMessage()) for r in caplog.records
                if r.name == quantize_onnx.logger.name]
    assert len(messages) == 2 and all(level == logging.INFO for level, _ in messages)
    assert "cannot be read" in messages[0][1]
    with pytest.raises(ValueError, match="deploy activation dtype must be one of auto, int8, "
                                         "uint8, got 'int4'"):
        quantize_onnx.deploy_activation_dtype("int4")


@pytest.mark.parametrize("shape", [(3, 5), (64, 128)])
def test_int4_initializers_are_packed_two_per_byte(shape):
    values = np.random.default_rng(0).integers(-7, 8, size=shape)
    builder = quantize_onnx_builder.Builder()
    builder.int4_const("w", values)
    (tensor,) = builder.initializers
    assert tensor.data_type == onnx.TensorProto.INT4
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), values)
    assert len(tensor.raw_data) == -(-values.size // 2)


def _optimized_ops(proto, tmp_path):
    """Op counts of ONNX Runtime's optimised graph (EXTENDED: its QDQ fusions), saved to disk."""
    import collections

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session, collections.Counter(
        node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def test_qdq_deploy_model_is_fused_by_ort_and_follows_the_fake_quant_model(frozen, images,
                                                                            tmp_path):
    qdq = build_onnx(frozen.keras_model, "deploy", deploy_format="qdq")
    onnx.checker.check_model(qdq, full_check=True)
    ops = [node.op_type for node in qdq.graph.node]
    assert "ConvInteger" not in ops and "MatMulInteger" not in ops
    inits = {t.name: t for t in qdq.graph.initializer}
    biases = [inits[n.input[0]] for n in qdq.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0].endswith("/bias_int32")]
    assert len(biases) == len(frozen.quant_layers)
    assert all(b.data_type == onnx.TensorProto.INT32 for b in biases)
    weights = {inits[n.input[0]].data_type for n in qdq.graph.node
               if n.op_type == "DequantizeLinear" and "/weight_int" in n.input[0]}
    assert weights == {onnx.TensorProto.INT8, onnx.TensorProto.INT4}  # "grouped" is INT4
    session, optimized = _optimized_ops(qdq, tmp_path)
    # ORT fuses a layer whose output is quantized next (stem -> ReLU6 -> dw) and the
    # logits' DQ -> Gemm; the rest run as float ops on dequantized integers.
    assert optimized["QLinearConv"] >= 1 and optimized["QGemm"] >= 1, optimized
    reference = _run(build_onnx(frozen.keras_model, "fake_quant"), images)
    got = session.run(None, {session.get_inputs()[0].name: images})[0]
    if cpu_info.is_x86_64() and not cpu_info.vnni_flags(cpu_info.read_cpu_flags()):
        pytest.skip("x86 without VNNI: ORT's fused kernels may saturate (auto picks integer)")
    step = (reference.max() - reference.min()) / 255.0  # one int8 step of the logits' range
    assert np.abs(got - reference).max() <= step
    assert np.mean(got.argmax(-1) == reference.argmax(-1)) >= 0.98


@pytest.mark.parametrize("flags, machine, requested, expected, warns", [
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", "auto", "qdq", False),
    ({"avx2", "avx_vnni"}, "x86_64", "auto", "qdq", False),
    ({"avx2", "fma"}, "x86_64", "auto", "integer", False),
    ({"avx2", "fma"}, "x86_64", "qdq", "qdq", True),
    ({"avx512_vnni"}, "x86_64", "integer", "integer", False),
    ({"asimd", "asimddp"}, "aarch64", "auto", "qdq", False),
])
def test_deploy_format_follows_the_cpu(caplog, flags, machine, requested, expected, warns):
    with caplog.at_level(logging.INFO, logger="knowledge_distillation"):
        assert quantize_onnx.resolve_deploy_format(requested, cpu_flags=flags,
                                                   machine=machine) == expected
        dtype = quantize_onnx.deploy_activation_dtype("auto", cpu_flags=flags, machine=machine,
                                                      deploy_format=expected)
    assert dtype == ("int8" if expected == "qdq" or "avx512_vnni" not in flags else "uint8")
    records = [r for r in caplog.records if r.name == quantize_onnx.logger.name]
    assert len(records) == 2 and f"{expected} format" in records[0].getMessage()
    assert (records[0].levelno == logging.WARNING) == warns
    if warns:
        assert "saturate" in records[0].getMessage()


def _convnext_like():
    """A nested Sequential stem, LayerNormalization, Dense on 4-D, LayerScale, keras.ops
    arithmetic and a Normalization layer: ConvNeXt's, MobileNetV3's and EfficientNet's parts."""
    from keras.src.applications.convnext import LayerScale

    keras.utils.set_random_seed(7)
    inputs = keras.Input((12, 12, 3))
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    norm = layers.Normalization(mean=[0.4, 0.5, 0.6], variance=[0.05, 0.08, 0.1], name="norm")
    x = norm(x)
    stem = keras.Sequential([layers.Conv2D(8, 2, strides=2, name="stem_conv"),
                             layers.LayerNormalization(epsilon=1e-6, name="stem_ln")],
                            name="stem")
    x = stem(x)
    y = layers.Conv2D(8, 3, padding="same", groups=8, name="dw")(x)
    y = layers.LayerNormalization(epsilon=1e-6, name="ln")(y)
    y = layers.Dense(16, name="pw1")(y)
    y = layers.Activation("gelu", name="gelu")(y)
    y = layers.Dense(8, name="pw2")(y)
    y = LayerScale(0.5, 8, name="scale")(y)
    x = x + y  # a keras.ops Add of two tensors
    x = layers.ReLU(6.0, name="relu6")(x + 3.0) * (1.0 / 6.0)  # hard-sigmoid, keras.ops
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(4, name="logits")(x)
    return keras.Model(inputs, outputs, name="convnext_like")


def test_nested_models_and_elementwise_layers_export_natively(caplog):
    model = _convnext_like()
    images = np.random.default_rng(2).uniform(0, 255, (32, 12, 12, 3)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="knowledge_distillation"):
        proto = build_onnx(model, "float")
        qmodel = create_quant_model(model, create_distill_config(model))
        from knowledge_distillation.quant.quantize_distill import distill

        distill(qmodel, images, epochs=0)
        fake = build_onnx(qmodel.keras_model, "fake_quant")
    assert not [r for r in caplog.records if "through tf2onnx" in r.getMessage()]
    types = {node.op_type for node in proto.graph.node}
    assert {"LayerNormalization", "Div", "Sub"} <= types
    np.testing.assert_allclose(_run(proto, images), model(images).numpy(), rtol=1e-4, atol=1e-4)
    # the nested stem's conv is quantized like any other layer
    assert list(qmodel.quant_layers) == ["stem_conv", "dw", "pw1", "pw2", "logits"]
    # the layers with weights of other kinds run in float, and are listed
    # (Normalization given its mean and variance holds them as constants, not weights)
    assert [(r["layer"], r["type"]) for r in qmodel.float_layers()] == [
        ("stem_ln", "LayerNormalization"), ("ln", "LayerNormalization"),
        ("scale", "LayerScale")]
    np.testing.assert_allclose(_run(fake, images), qmodel.keras_model(images).numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_keras_applications_quantize_every_layer_and_export(name):
    from knowledge_distillation import models

    model = models.build_model(name, (32, 32, 3), 10, seed=0)
    rng = np.random.default_rng(1)
    for layer in model.layers:  # untrained statistics make every logit vanish
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n),
                               rng.normal(0, 0.1, n), rng.uniform(0.5, 2, n)])
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    qmodel = create_quant_model(model, create_distill_config(model))
    # every Conv/Dense is quantized; EfficientNet's input Normalization runs in float
    assert {r["type"] for r in qmodel.float_layers()} <= {"Normalization"}
    from knowledge_distillation.quant.quantize_distill import distill

    distill(qmodel, images, epochs=0)
    fake = build_onnx(qmodel.keras_model, "fake_quant")
    expected = qmodel.keras_model(images).numpy()
    got = _run(fake, images)
    assert np.abs(expected).max() > 1e-2
    # swish / sigmoid differ by an ulp between TF and ORT: now and then an activation
    # rounds to the next level, and the difference travels on
    assert np.median(np.abs(got - expected)) <= 1e-5 * np.abs(expected).max()
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()
