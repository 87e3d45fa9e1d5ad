"""Precision modes and mixlists on CPU: Keras dtype policies per layer."""

import logging

import numpy as np
import pytest

from knowledge_distillation import compat
from knowledge_distillation.ascend import device
from knowledge_distillation.ascend.device import setup_device
from knowledge_distillation.compat import keras
from knowledge_distillation.config import PRECISION_MODES, DeviceConfig
from knowledge_distillation.kd.distiller import Distiller

from ascend_helpers import (  # noqa: F401  (fixtures are used by name)
    LOW,
    compiled,
    dataset,
    quadrant_data,
    tensorflow_defaults,
    tiny_model,
    write_json,
)

layers = keras.layers


# -- precision modes on CPU --------------------------------------------------


@pytest.fixture
def cpu_bfloat16(request, monkeypatch):
    """bfloat16 compute on the CPU, as on a CPU with bfloat16 instructions
    (without them the low precision is float32:
    `test_a_cpu_without_bfloat16_instructions_computes_float32`). TensorFlow
    2.6 has no bfloat16 convolution on the CPU (traced it fails, eager it
    returns float32), so its trainer computes in float32 there:
    `test_keras2_cpu_computes_float32_and_says_why`."""
    mode = getattr(getattr(request.node, "callspec", None), "params", {}).get("mode")
    if not compat.KERAS3 and mode not in ("must_keep_origin_dtype", "force_fp32"):
        pytest.skip(f"{compat.STACK} has no bfloat16 CPU convolution")
    monkeypatch.setattr(device.cpu_info, "has_bf16", lambda flags=None: True)


def test_a_built_float32_layer_switched_to_mixed_computes_low_and_keeps_its_weights():
    layer = layers.Dense(3)
    x = np.ones((2, 4), np.float32)
    before = layer(x).numpy()
    compat.set_dtype_policy(layer, "mixed_float16")
    out = layer(x)
    assert out.dtype == "float16" and layer.compute_dtype == "float16"
    assert [v.dtype for v in layer.weights] == ["float32", "float32"]
    np.testing.assert_allclose(out.numpy().astype(np.float32), before, rtol=1e-2, atol=1e-2)
    compat.set_dtype_policy(layer, "float32")
    assert layer(x).dtype == "float32"


def test_a_built_float32_batchnorm_switched_to_mixed_keeps_float32_statistics():
    inputs = keras.Input((4,))
    # Seeded: an unlucky random kernel gives a channel of near-zero batch variance,
    # whose normalisation amplifies float16 rounding past any tolerance.
    dense = layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    model = keras.Model(inputs, layers.BatchNormalization(name="bn")(dense(inputs)))
    x = np.linspace(-2, 2, 16, dtype=np.float32).reshape(4, 4)
    before = model(x, training=True).numpy()
    for layer in model.layers[1:]:
        compat.set_dtype_policy(layer, "mixed_float16")
    out = model(x, training=True)
    assert out.dtype == "float16"
    assert all(v.dtype == "float32" for v in model.get_layer("bn").weights)
    np.testing.assert_allclose(out.numpy().astype(np.float32), before, rtol=1e-2, atol=1e-2)

EXPECTED_POLICIES = {
    "must_keep_origin_dtype": dict.fromkeys(
        ["conv", "bn", "relu", "flatten", "dense", "softmax"], "float32"
    ),
    "allow_fp32_to_fp16": {
        "conv": LOW, "bn": "float32", "relu": "float32", "flatten": "float32",
        "dense": LOW, "softmax": "float32",
    },
    "allow_mix_precision": {
        "conv": LOW, "bn": LOW, "relu": LOW, "flatten": LOW, "dense": LOW,
        "softmax": "float32",
    },
    "force_fp16": dict.fromkeys(["conv", "bn", "relu", "flatten", "dense", "softmax"], LOW),
    "force_fp32": dict.fromkeys(["conv", "bn", "relu", "flatten", "dense", "softmax"], "float32"),
}
# bfloat16 is this CPU suite's low precision, so the bf16 modes match their base modes here.
EXPECTED_POLICIES["allow_fp32_to_bf16"] = EXPECTED_POLICIES["allow_fp32_to_fp16"]
EXPECTED_POLICIES["allow_mix_precision_bf16"] = EXPECTED_POLICIES["allow_mix_precision"]


@pytest.mark.parametrize("mode", PRECISION_MODES)
def test_precision_mode_sets_layer_compute_dtypes_and_keeps_float32_weights(cpu_bfloat16, tmp_path, mode):
    session = setup_device(DeviceConfig(precision_mode=mode), str(tmp_path))
    model = tiny_model()
    weights = model.get_weights()
    session.prepare_model(model)
    policies = {l.name: l.dtype_policy.name for l in model.layers[1:]}
    assert policies == EXPECTED_POLICIES[mode]
    assert all(v.dtype == "float32" for v in model.weights)
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
    x, _ = quadrant_data(4)
    low = [n for n, p in policies.items() if p == LOW]
    probe = keras.Model(model.input, [model.get_layer(n).output for n in policies])
    for name, out in zip(policies, probe(x)):
        assert out.dtype == ("bfloat16" if name in low else "float32"), name


@pytest.mark.parametrize("mode, low_layers", [
    ("allow_mix_precision", {"conv_1", "leaky", "pool", "conv_2", "flatten", "logits"}),
    ("allow_fp32_to_fp16", {"conv_1", "conv_2", "logits"}),
])
def test_precision_modes_on_a_sequential_seed_convnet(cpu_bfloat16, tmp_path, mode, low_layers):
    session = setup_device(DeviceConfig(precision_mode=mode), str(tmp_path))
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        layers.Conv2D(4, 3, strides=2, padding="same", name="conv_1"),
        layers.LeakyReLU(0.2, name="leaky"),
        layers.MaxPooling2D(2, strides=1, padding="same", name="pool"),
        layers.Conv2D(8, 3, strides=2, padding="same", name="conv_2"),
        layers.Flatten(name="flatten"),
        layers.Dense(3, name="logits"),
    ])
    session.prepare_model(model)
    assert {l.name for l in model.layers if l.compute_dtype == "bfloat16"} == low_layers
    assert model(np.zeros((1, 8, 8, 1), np.float32)).dtype == "bfloat16"


def test_force_fp16_overrides_a_layer_pinned_to_float32(cpu_bfloat16, tmp_path):
    session = setup_device(DeviceConfig(precision_mode="force_fp16"), str(tmp_path))
    inputs = keras.Input((4,))
    outputs = layers.Dense(2, dtype="float32", name="pinned")(inputs)
    model = session.prepare_model(keras.Model(inputs, outputs))
    assert model.get_layer("pinned").compute_dtype == "bfloat16"


@pytest.mark.parametrize("mode", PRECISION_MODES)
def test_short_run_under_each_precision_mode_stays_finite_and_learns(tmp_path, mode):
    session = setup_device(DeviceConfig(precision_mode=mode), str(tmp_path))
    model = compiled(session.prepare_model(tiny_model()), session)
    x, y = quadrant_data(192)
    untrained = model.evaluate(x, y, verbose=0)
    losses = model.fit(dataset(x, y), epochs=4, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert model.evaluate(x, y, verbose=0) < 0.5 * untrained


def test_distiller_losses_stay_float32_under_mixed_precision(cpu_bfloat16, tmp_path):
    x, y = quadrant_data(32)

    def distiller_loss(teacher, student):
        distiller = Distiller(teacher=teacher, student=student)
        distiller.compile(optimizer="sgd", alpha=0.1, temperature=10.0)
        logits = student(x)
        loss = distiller.compute_loss(x=x, y=y, y_pred=logits)
        return loss, logits.dtype, distiller.distillation_loss_tracker.result()

    # Same seeds, built before and after the mixed policy is set up.
    reference, _, _ = distiller_loss(
        tiny_model("teacher", softmax=False, seed=1), tiny_model("student", softmax=False, seed=2)
    )
    session = setup_device(DeviceConfig(precision_mode="allow_mix_precision"), str(tmp_path))
    teacher = session.prepare_model(tiny_model("teacher", softmax=False, seed=1))
    student = session.prepare_model(tiny_model("student", softmax=False, seed=2))
    loss, logits_dtype, kd = distiller_loss(teacher, student)
    assert logits_dtype == "bfloat16"  # the student really computes low precision
    assert loss.dtype == "float32" and kd.dtype == "float32"
    # bfloat16 logits are ~1% off; the float32 loss computed from them follows.
    assert float(loss) == pytest.approx(float(reference), rel=0.05)
    assert float(loss) != float(reference)


@pytest.mark.skipif(compat.KERAS3, reason="Keras 3's TensorFlow runs bfloat16 graphs on any CPU")
@pytest.mark.parametrize("mode", ["allow_mix_precision", "force_fp16"])
def test_keras2_cpu_computes_float32_and_says_why(tmp_path, caplog, mode):
    assert not compat.cpu_runs_bfloat16()  # TensorFlow 2.6: no bfloat16 Conv2D in a graph
    with caplog.at_level(logging.WARNING):
        session = setup_device(DeviceConfig(precision_mode=mode), str(tmp_path))
    assert "cannot run bfloat16 convolutions on the CPU" in caplog.text
    model = compiled(session.prepare_model(tiny_model()), session)
    assert {layer.compute_dtype for layer in model.layers} == {"float32"}
    x, y = quadrant_data(32)
    assert np.isfinite(model.fit(dataset(x, y), epochs=1, verbose=0).history["loss"][0])


@pytest.mark.skipif(not compat.KERAS3, reason="TensorFlow 2.6 computes float32 on any CPU")
@pytest.mark.parametrize("mode, low", [
    ("allow_mix_precision", "float32"),
    ("force_fp16", "float32"),
    ("allow_fp32_to_fp16", "float32"),
    ("allow_mix_precision_bf16", "mixed_bfloat16"),
    ("allow_fp32_to_bf16", "mixed_bfloat16"),
])
def test_a_cpu_without_bfloat16_instructions_computes_float32(
        tmp_path, monkeypatch, caplog, mode, low):
    monkeypatch.setattr(device.cpu_info, "has_bf16", lambda flags=None: False)
    with caplog.at_level(logging.INFO):
        session = setup_device(DeviceConfig(precision_mode=mode), str(tmp_path))
    assert session.low_policy == low
    model = compiled(session.prepare_model(tiny_model()), session)
    computed = {layer.compute_dtype for layer in model.layers}
    if low == "float32":
        assert computed == {"float32"}
        assert "this CPU has no bfloat16 instructions" in caplog.text
        twin = {"allow_mix_precision": "allow_mix_precision_bf16",
                "allow_fp32_to_fp16": "allow_fp32_to_bf16"}.get(mode)
        assert (f"--precision_mode={twin} forces bfloat16" in caplog.text) == bool(twin)
        assert ("forces bfloat16" in caplog.text) == bool(twin)
    else:  # the bf16 modes still ask for bfloat16, with a warning that it is emulated
        assert "bfloat16" in computed
        assert "bfloat16 is emulated and slower than float32" in caplog.text


def test_wrap_optimizer_adds_loss_scaling_only_for_float16(cpu_bfloat16, tmp_path):
    cpu = setup_device(DeviceConfig(), str(tmp_path))
    sgd = keras.optimizers.SGD()
    assert cpu.wrap_optimizer(sgd) is sgd  # bfloat16 needs no loss scaling
    gpu = device.DeviceSession(
        DeviceConfig(precision_mode="allow_fp32_to_fp16"), str(tmp_path), low_policy="mixed_float16"
    )
    wrapped = gpu.wrap_optimizer(sgd)
    assert isinstance(wrapped, compat.LossScaleOptimizer)
    assert gpu.wrap_optimizer(wrapped) is wrapped
    keep = device.DeviceSession(
        DeviceConfig(precision_mode="must_keep_origin_dtype"), str(tmp_path),
        low_policy="mixed_float16",
    )
    assert keep.wrap_optimizer(sgd) is sgd


@pytest.mark.parametrize("mode, low, scaled", [
    ("allow_mix_precision", "mixed_float16", True),
    ("allow_mix_precision_bf16", "mixed_bfloat16", False),
    ("allow_fp32_to_bf16", "mixed_bfloat16", False),
    ("force_fp32", "mixed_float16", False),
])
def test_on_a_gpu_the_bf16_modes_use_bfloat16_without_loss_scaling(
        tmp_path, monkeypatch, mode, low, scaled):
    real = device.tf.config.list_physical_devices
    monkeypatch.setattr(device.tf.config, "list_physical_devices",
                        lambda kind=None: ["/physical_device:GPU:0"] if kind == "GPU" else real(kind))
    session = setup_device(DeviceConfig(precision_mode=mode), str(tmp_path))
    assert session.low_policy == low
    wrapped = session.wrap_optimizer(keras.optimizers.SGD())
    assert isinstance(wrapped, compat.LossScaleOptimizer) == scaled


def test_force_fp32_computes_float32_even_in_a_layer_built_low(tmp_path):
    session = setup_device(DeviceConfig(precision_mode="force_fp32"), str(tmp_path))
    inputs = keras.Input((4,))
    outputs = layers.Dense(2, dtype="mixed_float16", name="built_low")(inputs)
    model = session.prepare_model(keras.Model(inputs, outputs))
    assert model.get_layer("built_low").compute_dtype == "float32"
    assert model(np.ones((1, 4), np.float32)).dtype == "float32"


# -- mixlist ----------------------------------------------------------------


def test_mixlist_moves_layers_between_lists(cpu_bfloat16, tmp_path):
    mixlist = write_json(
        tmp_path / "ops_info.json",
        {
            "black-list": {"to-add": ["Relu"], "to-remove": ["Softmax"]},
            "white-list": {"to-add": ["SoftmaxV2"], "to-remove": ["MatMulV2"]},
        },
    )
    session = setup_device(
        DeviceConfig(use_mixlist=True, mixlist_file=mixlist), str(tmp_path)
    )
    model = session.prepare_model(tiny_model())
    policies = {l.name: l.dtype_policy.name for l in model.layers[1:]}
    assert policies == {
        "conv": LOW,  # white by default
        "bn": LOW,  # gray: follows conv
        "relu": "float32",  # black-listed by the file
        "flatten": "float32",  # gray: follows relu
        "dense": "float32",  # MatMul removed from white: gray, follows flatten
        "softmax": LOW,  # Softmax moved to white (Ascend spelling SoftmaxV2)
    }


def test_mixlist_unknown_op_type_is_an_error_listing_known_ones(tmp_path):
    mixlist = write_json(tmp_path / "ops_info.json", {"white-list": {"to-add": ["Conv9D"]}})
    with pytest.raises(ValueError) as e:
        setup_device(DeviceConfig(use_mixlist=True, mixlist_file=mixlist), str(tmp_path))
    message = str(e.value)
    assert "unknown op type(s) ['Conv9D']" in message and mixlist in message
    assert "Known op types:" in message
    for op in ("Conv2D", "MatMul", "Softmax", "BiasAdd", "Relu", "MaxPool", "AvgPool",
               "FusedBatchNormV3"):
        assert op in message


MIXLIST = ("use_mixlist", "mixlist_file", "ops_info.json")
FUSION = ("fusion_off_flag", "fusion_off_file", "fusion_switch.cfg")


@pytest.mark.parametrize(
    "flags, content, problem",
    [
        (MIXLIST, "{bad json", "not valid JSON"),
        (MIXLIST, '["Conv2D"]', "expected a JSON object"),
        (MIXLIST, '{"grey-list": {}}', "unknown section"),
        (MIXLIST, '{"white-list": {"to-add": "Conv2D"}}', "must be a list of op type strings"),
        (MIXLIST, '{"white-list": {"add": ["Conv2D"]}}', 'must be an object with "to-add"'),
        (MIXLIST, '{"white-list": {"to-add": ["Relu"]}, "black-list": {"to-add": ["Relu"]}}',
         "added to both"),
        (FUSION, "{bad", "not valid JSON"),
        (FUSION, '{"GraphFusion": {"ALL": "off"}}', 'expected {"Switch"'),
        (FUSION, '{"Switch": {"Fusion": {}}}', "unknown section"),
        (FUSION, '{"Switch": {"GraphFusion": {"ALL": "maybe"}}}', 'must be "on" or "off"'),
    ],
)
def test_malformed_mixlist_or_fusion_file_is_one_error_line_naming_it(
    tmp_path, flags, content, problem
):
    enable, flag, name = flags
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        setup_device(DeviceConfig(**{enable: True, flag: str(path)}), str(tmp_path))
    assert str(e.value).startswith(f"--{flag}={path}: ")
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_missing_mixlist_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="--mixlist_file=nope.json: file not found"):
        setup_device(DeviceConfig(use_mixlist=True, mixlist_file="nope.json"), str(tmp_path))


def test_mixlist_with_another_mode_is_ignored_with_a_warning(cpu_bfloat16, tmp_path, caplog):
    config = DeviceConfig(precision_mode="force_fp16", use_mixlist=True, mixlist_file="nope.json")
    with caplog.at_level(logging.WARNING):
        session = setup_device(config, str(tmp_path))
    assert "--use_mixlist is ignored with --precision_mode=force_fp16" in caplog.text
    model = session.prepare_model(tiny_model())
    assert model.get_layer("softmax").compute_dtype == "bfloat16"
