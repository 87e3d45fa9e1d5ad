"""Device layer: the npu_device contract, and what every flag does on CPU.

Models here are a few hundred weights on 8x8 inputs, so each fit takes well
under a second on two cores.
"""

import glob
import json
import logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers
from tensorflow.python.eager import context

from knowledge_distillation import device
from knowledge_distillation.config import PRECISION_MODES, DeviceConfig
from knowledge_distillation.device import parse_dump_steps, setup_device
from knowledge_distillation.device_callbacks import NonFiniteError, describe, non_finite_tensors
from knowledge_distillation.device_probe import StepTensors
from knowledge_distillation.distiller import Distiller

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
    keras.utils.set_random_seed(seed)
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


# -- npu_device contract ------------------------------------------------------


def test_npu_defaults_set_precision_mode_then_open_once(npu, tmp_path):
    session = setup_device(DeviceConfig(), str(tmp_path))
    assert npu.calls == [
        ("set", "precision_mode", "allow_mix_precision"),
        ("open",),
        ("as_default",),
    ]
    assert session.on_npu


@pytest.mark.parametrize("mode", PRECISION_MODES)
def test_npu_every_precision_mode_is_passed_through(npu, tmp_path, mode):
    setup_device(DeviceConfig(precision_mode=mode), str(tmp_path))
    assert ("set", "precision_mode", mode) in npu.calls


def test_npu_all_flags_set_exactly_modelzoo_options_in_order(npu, tmp_path):
    mixlist = write_json(tmp_path / "ops_info.json", {"black-list": {"to-add": ["DynamicRNN"]}})
    fusion = write_json(tmp_path / "fusion.cfg", {"Switch": {"GraphFusion": {"ALL": "off"}}})
    config = DeviceConfig(
        data_dump_flag=True,
        data_dump_step="10|20",
        data_dump_path=str(tmp_path / "dd"),
        over_dump=True,
        over_dump_path=str(tmp_path / "od"),
        profiling=True,
        profiling_dump_path=str(tmp_path / "prof"),
        use_mixlist=True,
        mixlist_file=mixlist,
        fusion_off_flag=True,
        fusion_off_file=fusion,
    )
    setup_device(config, str(tmp_path))
    options_json = next(
        c[2] for c in npu.calls if c[1:2] == ("profiling_config.profiling_options",)
    )
    profiling = json.loads(options_json)
    assert list(profiling.items()) == [
        ("output", str(tmp_path / "prof")),
        ("training_trace", "on"),
        ("task_trace", "on"),
        ("aicpu", "on"),
        ("aic_metrics", "PipeUtilization"),
        ("fp_point", ""),
        ("bp_point", ""),
    ]
    assert npu.calls == [
        ("set", "dump_config.enable_dump", True),
        ("set", "dump_config.dump_path", str(tmp_path / "dd")),
        ("set", "dump_config.dump_step", "10|20"),
        ("set", "dump_config.dump_mode", "all"),
        ("set", "dump_config.enable_dump_debug", True),
        ("set", "dump_config.dump_path", str(tmp_path / "od")),
        ("set", "dump_config.dump_debug_mode", "all"),
        ("set", "profiling_config.enable_profiling", True),
        ("set", "profiling_config.profiling_options", options_json),
        ("set", "precision_mode", "allow_mix_precision"),
        ("set", "modify_mixlist", mixlist),
        ("set", "fusion_switch_file", fusion),
        ("open",),
        ("as_default",),
    ]
    for folder in ("dd", "od", "prof"):
        assert (tmp_path / folder).is_dir()


@pytest.mark.parametrize("flags, expected", [
    ({"data_dump_flag": True, "data_dump_step": "5"}, [
        ("set", "dump_config.enable_dump", True),
        ("set", "dump_config.dump_path", "{out}/data_dump"),
        ("set", "dump_config.dump_step", "5"),
        ("set", "dump_config.dump_mode", "all"),
    ]),
    ({"over_dump": True}, [
        ("set", "dump_config.enable_dump_debug", True),
        ("set", "dump_config.dump_path", "{out}/over_dump"),
        ("set", "dump_config.dump_debug_mode", "all"),
    ]),
    ({"profiling": True}, [
        ("set", "profiling_config.enable_profiling", True),
        ("set", "profiling_config.profiling_options",
         '{"output": "{out}/profiling", "training_trace": "on", "task_trace": "on", '
         '"aicpu": "on", "aic_metrics": "PipeUtilization", "fp_point": "", "bp_point": ""}'),
    ]),
    ({"use_mixlist": True, "mixlist_file": "{out}/ops.json"}, [
        ("set", "precision_mode", "allow_mix_precision"),
        ("set", "modify_mixlist", "{out}/ops.json"),
    ]),
    ({"fusion_off_flag": True, "fusion_off_file": "{out}/fusion.cfg"}, [
        ("set", "precision_mode", "allow_mix_precision"),
        ("set", "fusion_switch_file", "{out}/fusion.cfg"),
    ]),
])
def test_npu_each_flag_alone_sets_its_modelzoo_options(npu, tmp_path, flags, expected):
    out = str(tmp_path)
    write_json(tmp_path / "ops.json", {"white-list": {"to-add": ["MatMulV2"]}})
    write_json(tmp_path / "fusion.cfg", {"Switch": {"UBFusion": {"ALL": "off"}}})
    flags = {k: v.replace("{out}", out) if isinstance(v, str) else v for k, v in flags.items()}
    setup_device(DeviceConfig(**flags), out)
    expected = [tuple(x.replace("{out}", out) if isinstance(x, str) else x for x in c)
                for c in expected]
    if ("set", "precision_mode", "allow_mix_precision") not in expected:
        # npu_config() sets the dump and profiling options first.
        expected.append(("set", "precision_mode", "allow_mix_precision"))
    assert [c for c in npu.calls if c[0] == "set"] == expected
    assert npu.calls[-2:] == [("open",), ("as_default",)]


def test_npu_default_dump_paths_are_created_under_the_output_dir(npu, tmp_path):
    setup_device(DeviceConfig(data_dump_flag=True, over_dump=True), str(tmp_path))
    assert ("set", "dump_config.dump_path", str(tmp_path / "data_dump")) in npu.calls
    assert ("set", "dump_config.dump_path", str(tmp_path / "over_dump")) in npu.calls
    assert (tmp_path / "data_dump").is_dir() and (tmp_path / "over_dump").is_dir()


@pytest.mark.parametrize("mode", [m for m in PRECISION_MODES if m != "allow_mix_precision"])
def test_npu_mixlist_is_only_set_with_allow_mix_precision(npu, tmp_path, caplog, mode):
    config = DeviceConfig(precision_mode=mode, use_mixlist=True, mixlist_file="missing.json")
    with caplog.at_level(logging.WARNING):
        setup_device(config, str(tmp_path))
    assert not [c for c in npu.calls if c[1:2] == ("modify_mixlist",)]
    assert "--use_mixlist is ignored" in caplog.text


def test_npu_is_opened_once_per_process(npu, tmp_path):
    setup_device(DeviceConfig(), str(tmp_path))
    setup_device(DeviceConfig(), str(tmp_path))
    assert npu.calls.count(("open",)) == 1
    assert npu.calls.count(("as_default",)) == 1


def test_npu_session_leaves_models_and_xla_to_cann(npu, tmp_path):
    session = setup_device(
        DeviceConfig(precision_mode="force_fp16", data_dump_flag=True, over_dump=True),
        str(tmp_path),
    )
    model = tiny_model()
    before = [layer.dtype_policy.name for layer in model.layers]
    assert session.prepare_model(model) is model
    assert [layer.dtype_policy.name for layer in model.layers] == before
    assert keras.mixed_precision.global_policy().name == "float32"
    assert session.callbacks() == []  # CANN dumps; no Keras-side probes
    assert session.compile_kwargs() == {"jit_compile": False}
    optimizer = keras.optimizers.SGD()
    assert session.wrap_optimizer(optimizer) is optimizer


def test_npu_malformed_fusion_file_fails_before_opening(npu, tmp_path):
    bad = tmp_path / "fusion.cfg"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"--fusion_off_file={bad}: not valid JSON"):
        setup_device(DeviceConfig(fusion_off_flag=True, fusion_off_file=str(bad)), str(tmp_path))
    assert ("open",) not in npu.calls


# -- precision modes on CPU --------------------------------------------------

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
}


@pytest.mark.parametrize("mode", PRECISION_MODES)
def test_precision_mode_sets_layer_compute_dtypes_and_keeps_float32_weights(tmp_path, mode):
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
def test_precision_modes_on_a_sequential_seed_convnet(tmp_path, mode, low_layers):
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


def test_force_fp16_overrides_a_layer_pinned_to_float32(tmp_path):
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


def test_distiller_losses_stay_float32_under_mixed_precision(tmp_path):
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


def test_wrap_optimizer_adds_loss_scaling_only_for_float16(tmp_path):
    cpu = setup_device(DeviceConfig(), str(tmp_path))
    sgd = keras.optimizers.SGD()
    assert cpu.wrap_optimizer(sgd) is sgd  # bfloat16 needs no loss scaling
    gpu = device.DeviceSession(
        DeviceConfig(precision_mode="allow_fp32_to_fp16"), str(tmp_path), low_policy="mixed_float16"
    )
    wrapped = gpu.wrap_optimizer(sgd)
    assert isinstance(wrapped, keras.optimizers.LossScaleOptimizer)
    assert gpu.wrap_optimizer(wrapped) is wrapped
    keep = device.DeviceSession(
        DeviceConfig(precision_mode="must_keep_origin_dtype"), str(tmp_path),
        low_policy="mixed_float16",
    )
    assert keep.wrap_optimizer(sgd) is sgd


# -- mixlist ----------------------------------------------------------------


def test_mixlist_moves_layers_between_lists(tmp_path):
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


def test_mixlist_with_another_mode_is_ignored_with_a_warning(tmp_path, caplog):
    config = DeviceConfig(precision_mode="force_fp16", use_mixlist=True, mixlist_file="nope.json")
    with caplog.at_level(logging.WARNING):
        session = setup_device(config, str(tmp_path))
    assert "--use_mixlist is ignored with --precision_mode=force_fp16" in caplog.text
    model = session.prepare_model(tiny_model())
    assert model.get_layer("softmax").compute_dtype == "bfloat16"


# -- fusion switch -------------------------------------------------------------


def _optimized_ops(fn, *args):
    """Op types of `fn`'s graph after Grappler."""
    ctx = context.context()
    ctx.enable_run_metadata()
    try:
        tf.function(fn)(*args)
        metadata = ctx.export_run_metadata()
    finally:
        ctx.disable_run_metadata()
    return {
        node.op
        for graph in metadata.function_graphs
        for node in graph.post_optimization_graph.node
    }


def _conv_bias_relu(x, kernel, bias):
    return tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias))


def test_fusion_all_off_switches_grappler_fusion_and_xla_off(tmp_path, caplog):
    args = (tf.ones((1, 8, 8, 2)), tf.ones((3, 3, 2, 4)), tf.ones((4,)))
    assert "_FusedConv2D" in _optimized_ops(_conv_bias_relu, *args)
    cfg = write_json(
        tmp_path / "fusion_switch.cfg",
        {"Switch": {"GraphFusion": {"ALL": "off"}, "UBFusion": {"ALL": "off"}}},
    )
    with caplog.at_level(logging.INFO):
        session = setup_device(
            DeviceConfig(fusion_off_flag=True, fusion_off_file=cfg), str(tmp_path)
        )
    ops = _optimized_ops(_conv_bias_relu, *args)
    assert "_FusedConv2D" not in ops and {"Conv2D", "BiasAdd", "Relu"} <= ops
    options = tf.config.optimizer.get_experimental_options()
    for name in ("remapping", "arithmetic_optimization", "layout_optimizer"):
        assert options[name] is False
    assert not tf.config.optimizer.get_jit()
    assert session.compile_kwargs() == {"jit_compile": False}
    passes = "arithmetic_optimization, layout_optimizer, remapping"
    assert f"Grappler passes off: {passes}" in caplog.text
    # A later set-up without the flag starts from TensorFlow's defaults again.
    setup_device(DeviceConfig(), str(tmp_path))
    assert "_FusedConv2D" in _optimized_ops(_conv_bias_relu, *args)


def test_fusion_named_passes_map_to_grappler_passes(tmp_path, caplog):
    cfg = write_json(
        tmp_path / "fusion_switch.cfg",
        {
            "Switch": {
                "GraphFusion": {
                    "ConvBatchnormFusionPass": "off",
                    "TransposeReshapeFusionPass": "off",
                    "constant_folding": "off",
                    "V100NotRequantFusionPass": "on",
                },
                "UBFusion": {"PlainNameWithoutHint": "off"},
            }
        },
    )
    with caplog.at_level(logging.INFO):
        session = setup_device(
            DeviceConfig(fusion_off_flag=True, fusion_off_file=cfg), str(tmp_path)
        )
    plan = session.fusion_plan
    assert plan.passes_off == ("constant_folding", "layout_optimizer", "remapping")
    assert plan.unmapped == (("UBFusion", "PlainNameWithoutHint"),)
    assert "PlainNameWithoutHint has no TensorFlow equivalent" in caplog.text
    assert "GraphFusion ConvBatchnormFusionPass off -> Grappler remapping off" in caplog.text


def test_cpu_default_compile_kwargs_leave_keras_auto(tmp_path):
    assert setup_device(DeviceConfig(), str(tmp_path)).compile_kwargs() == {}


def test_steps_per_execution_is_one_wherever_a_callback_inspects_every_step(tmp_path):
    plain = setup_device(DeviceConfig(), str(tmp_path))
    assert plain.steps_per_execution() == (32, "default on GPU/CPU")
    assert plain.steps_per_execution(4) == (4, "--steps_per_execution")
    for flag in ("data_dump_flag", "over_dump", "profiling"):
        session = setup_device(DeviceConfig(**{flag: True}), str(tmp_path / flag))
        steps, why = session.steps_per_execution()
        assert steps == 1 and f"--{flag}" in why
        assert session.steps_per_execution(1)[0] == 1
        with pytest.raises(ValueError, match=f"--steps_per_execution 8: --{flag} inspects"):
            session.steps_per_execution(8)


def test_npu_leaves_the_training_loop_to_npu_device(npu, tmp_path):
    session = setup_device(DeviceConfig(over_dump=True), str(tmp_path))
    assert session.steps_per_execution() == (1, "npu_device runs the training loop")


# -- output paths and dump steps ------------------------------------------------


@pytest.mark.parametrize("flag, enable", [
    ("data_dump_path", "data_dump_flag"),
    ("over_dump_path", "over_dump"),
    ("profiling_dump_path", "profiling"),
])
def test_unwritable_output_path_fails_in_setup_naming_flag_and_path(tmp_path, flag, enable):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = str(blocker / "dump")
    with pytest.raises(ValueError, match=f"--{flag}={bad} cannot be written"):
        setup_device(DeviceConfig(**{enable: True, flag: bad}), str(tmp_path))


def test_only_enabled_output_paths_are_created(tmp_path):
    session = setup_device(DeviceConfig(profiling=True), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["profiling"]
    assert session.paths == {"profiling_dump_path": str(tmp_path / "out" / "profiling")}


@pytest.mark.parametrize("text, steps", [
    ("10", (10,)), ("10|20", (10, 20)), ("0|5|10-12", (0, 5, 10, 11, 12)), (" 3 | 1 ", (1, 3)),
])
def test_dump_steps_parse_modelzoo_and_ascend_forms(text, steps):
    assert parse_dump_steps(text) == steps


@pytest.mark.parametrize("text", ["", "ten", "5-3", "1||2", "-1"])
def test_bad_dump_steps_are_an_error_naming_the_flag(text):
    with pytest.raises(ValueError, match="--data_dump_step"):
        parse_dump_steps(text)


# -- data dump ---------------------------------------------------------------


def _index(root):
    with open(os.path.join(root, "index.json"), encoding="utf-8") as f:
        return json.load(f)


def test_data_dump_writes_every_layer_output_and_gradient_of_the_steps(tmp_path):
    session = setup_device(
        DeviceConfig(
            precision_mode="must_keep_origin_dtype", data_dump_flag=True, data_dump_step="0|5"
        ),
        str(tmp_path),
    )
    model = compiled(session.prepare_model(tiny_model()), session)
    initial = [v.numpy() for v in model.variables]
    x, y = quadrant_data(64)
    model.fit(dataset(x, y), epochs=2, callbacks=session.callbacks(), verbose=0)

    root = tmp_path / "data_dump" / "tiny"
    index = _index(root)
    assert [s["step"] for s in index["steps"]] == [0, 5]
    for step in (0, 5):
        entries = [e for e in index["tensors"] if e["step"] == step]
        outputs = {e["layer"] for e in entries if e["kind"] == "output"}
        grads = {f"{e['layer']}/{e['tensor']}" for e in entries if e["kind"] == "gradient"}
        assert outputs == {"conv", "bn", "relu", "flatten", "dense", "softmax"}
        assert grads == {"conv/kernel", "conv/bias", "bn/gamma", "bn/beta",
                         "dense/kernel", "dense/bias"}
        for e in entries:
            array = np.load(root / e["file"])
            assert list(array.shape) == e["shape"] and str(array.dtype) == e["dtype"]

    # Step 0 is exactly the first real step: same weights, same batch.
    model2 = tiny_model()
    for v, value in zip(model2.variables, initial):
        v.assign(value)
    with tf.GradientTape() as tape:
        pred = model2(x[:16], training=True)
        loss = keras.losses.SparseCategoricalCrossentropy()(y[:16], pred)
    grads = tape.gradient(loss, model2.trainable_weights)
    names = ["/".join(w.path.split("/")[-2:]) for w in model2.trainable_weights]
    expected = dict(zip(names, grads))
    dumped = {
        f"{e['layer']}/{e['tensor']}": np.load(root / e["file"])
        for e in index["tensors"] if e["step"] == 0 and e["kind"] == "gradient"
    }
    for name, grad in expected.items():
        np.testing.assert_allclose(dumped[name], grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.load(root / "step_0" / "softmax.npy"), pred.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.load(root / "step_0" / "input.npy"), x[:16])
    # The replay does not disturb training: weights kept their post-step values.
    assert all(np.all(np.isfinite(v.numpy())) for v in model.weights)


@pytest.mark.parametrize("mode", ["must_keep_origin_dtype", "allow_mix_precision"])
def test_data_dump_gradients_are_the_ones_the_step_applied(tmp_path, mode):
    # With plain SGD the real update is -lr * gradient; the dumped gradient of
    # the replayed step must match it, dropout masks included.
    session = setup_device(
        DeviceConfig(precision_mode=mode, data_dump_flag=True, data_dump_step="2"),
        str(tmp_path),
    )
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 1))
    x = layers.Flatten(name="flatten")(inputs)
    x = layers.Dense(16, activation="relu", name="hidden")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    outputs = layers.Dense(3, name="logits")(x)
    model = compiled(session.prepare_model(keras.Model(inputs, outputs, name="mlp")), session,
                     optimizer=keras.optimizers.SGD(0.1), from_logits=True)
    data_x, data_y = quadrant_data(48)

    class Weights(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                self.before = [w.numpy() for w in model.trainable_weights]

        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                self.after = [w.numpy() for w in model.trainable_weights]

    weights = Weights()
    model.fit(dataset(data_x, data_y), callbacks=[weights, *session.callbacks()], verbose=0)
    root = tmp_path / "data_dump" / "mlp"
    index = _index(root)
    grads = [e for e in index["tensors"] if e["kind"] == "gradient"]
    assert [f"{e['layer']}/{e['tensor']}" for e in grads] == [
        "hidden/kernel", "hidden/bias", "logits/kernel", "logits/bias"]
    dropout = np.load(root / "step_2" / "dropout.npy")
    assert (dropout == 0).mean() > 0.3  # the replay ran dropout in training mode
    # float32 replays bit for bit (up to the division below); bfloat16 within
    # a rounding step, as the compiled step fuses kernels the eager replay runs
    # one by one. A different dropout mask would miss by whole gradients.
    tolerance = {"rtol": 1e-3, "atol": 1e-5} if mode.startswith("must") else {
        "rtol": 1e-2, "atol": 2e-3}
    for e, before, after in zip(grads, weights.before, weights.after):
        applied = (before - after) / 0.1
        np.testing.assert_allclose(np.load(root / e["file"]), applied, **tolerance)


@pytest.mark.parametrize("cached_teacher", [False, True])
def test_data_dump_of_a_distiller_dumps_the_student(tmp_path, cached_teacher):
    session = setup_device(
        DeviceConfig(data_dump_flag=True, data_dump_step="1"), str(tmp_path)
    )
    teacher = session.prepare_model(tiny_model("teacher", softmax=False, seed=1))
    student = session.prepare_model(tiny_model("student", softmax=False, seed=2))
    distiller = Distiller(teacher=teacher, student=student,
                          teacher_outputs_in_data=cached_teacher)
    distiller.compile(optimizer=session.wrap_optimizer(keras.optimizers.SGD(0.05)),
                      alpha=0.1, temperature=4.0, **session.compile_kwargs())
    x, y = quadrant_data(48)
    inputs = (x, teacher.predict(x, verbose=0)) if cached_teacher else x
    data = tf.data.Dataset.from_tensor_slices((inputs, y)).batch(16)
    distiller.fit(data, epochs=1, callbacks=session.callbacks(), verbose=0)
    index = _index(tmp_path / "data_dump" / "distiller")
    assert index["inspected_model"] == "student"
    grads = [e for e in index["tensors"] if e["kind"] == "gradient"]
    assert len(grads) == len(student.trainable_weights) == 6
    outputs = {e["layer"]: e["dtype"] for e in index["tensors"] if e["kind"] == "output"}
    assert outputs["conv"] == "bfloat16"  # dumped as computed
    assert all(np.isfinite(np.load(tmp_path / "data_dump" / "distiller" / e["file"])).all()
               for e in grads)


def test_data_dump_rejects_a_subclassed_model_before_training(tmp_path):
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.dense = layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    session = setup_device(DeviceConfig(data_dump_flag=True), str(tmp_path))
    model = compiled(Subclassed(), session, from_logits=True)
    x = np.ones((16, 4), np.float32)
    with pytest.raises(ValueError, match="needs a Functional or Sequential model"):
        model.fit(x, np.zeros(16), callbacks=session.callbacks(), verbose=0)


# -- overflow ------------------------------------------------------------------


def _exploding_batches(batch_at=2, n_batches=5):
    x, y = quadrant_data(16 * n_batches)
    # Finite, but a 3x3 conv of ones sums nine of them: inf.
    x[16 * batch_at : 16 * (batch_at + 1)] = 3e38
    return x, y


def _report(tmp_path, model="tiny"):
    with open(tmp_path / "over_dump" / model / "overflow_report.json", encoding="utf-8") as f:
        return json.load(f)


def test_overflow_from_an_exploding_input_stops_and_names_the_first_layer(tmp_path):
    session = setup_device(
        DeviceConfig(precision_mode="must_keep_origin_dtype", over_dump=True), str(tmp_path)
    )
    model = compiled(session.prepare_model(tiny_model(conv_init="ones")), session)
    x, y = _exploding_batches(batch_at=2)
    with pytest.raises(NonFiniteError, match="overflow at step 2 of tiny: first non-finite "
                       "tensor: output of layer 'conv'") as e:
        model.fit(dataset(x, y), epochs=1, callbacks=session.callbacks(), verbose=0)
    report = _report(tmp_path)
    assert e.value.step == 2 and e.value.report_path.endswith("overflow_report.json")
    assert report["step"] == 2 and report["first_layer"] == "conv"
    assert report["first_non_finite"]["kind"] == "output"
    assert report["action"] == "training stopped"
    index = _index(tmp_path / "over_dump" / "tiny")
    assert [s["step"] for s in index["steps"]] == [2]
    assert np.isinf(np.load(tmp_path / "over_dump" / "tiny" / "step_2" / "conv.npy")).any()


def test_overflow_from_an_exploding_learning_rate_stops_training(tmp_path):
    session = setup_device(
        DeviceConfig(precision_mode="must_keep_origin_dtype", over_dump=True), str(tmp_path)
    )
    model = compiled(session.prepare_model(tiny_model(softmax=False)), session,
                     optimizer=keras.optimizers.SGD(1e36), from_logits=True)
    x, y = quadrant_data(96)
    callbacks = session.callbacks()
    with pytest.raises(NonFiniteError) as e:
        model.fit(dataset(x, y), epochs=1, callbacks=callbacks, verbose=0)
    report = _report(tmp_path)
    # Step 0's update blows the Dense weights up to ~1e35; step 1's Dense
    # output is inf (BatchNorm renormalises the conv's).
    assert e.value.step == report["step"] == 1
    assert report["first_layer"] == "dense"
    assert [t["kind"] for t in report["non_finite_tensors"][:2]] == ["output", "loss"]
    assert callbacks[0].overflow_steps == [1]


def test_overflow_made_by_the_update_alone_blames_the_learning_rate():
    tensors = StepTensors(
        inputs=[("input", np.ones(2))], outputs=[("dense", "output", np.ones(2))],
        loss=np.float32(1.0), loss_scale=None,
        gradients=[("dense", "kernel", np.ones(2))], scaled_gradients_finite=[True],
        non_finite_after_update=[("dense", "kernel")], dtypes={},
    )
    [entry] = non_finite_tensors(tensors)
    assert entry["kind"] == "update" and entry["layer"] == "dense"
    assert "learning rate too large" in describe(entry)


def test_overflow_under_dynamic_loss_scaling_skips_the_step_and_goes_on(tmp_path, caplog):
    session = setup_device(
        DeviceConfig(precision_mode="must_keep_origin_dtype", over_dump=True), str(tmp_path)
    )
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05))
    model = compiled(
        session.prepare_model(tiny_model(conv_init="ones")), session, optimizer=optimizer
    )
    x, y = _exploding_batches(batch_at=2, n_batches=5)
    callbacks = session.callbacks()
    with caplog.at_level(logging.WARNING):
        model.fit(dataset(x, y), epochs=1, callbacks=callbacks, verbose=0)
    assert callbacks[0].overflow_steps == [2]
    assert "overflow at step 2 of tiny: dynamic loss scaling skipped the update" in caplog.text
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**14
    report = _report(tmp_path)
    assert report["first_layer"] == "conv" and report["loss_scale"] == 2.0**15
    assert report["action"].startswith("step skipped")
    assert all(np.all(np.isfinite(v.numpy())) for v in model.trainable_weights)


def test_overflow_that_loss_scaling_cannot_absorb_stops(tmp_path):
    session = setup_device(
        DeviceConfig(precision_mode="must_keep_origin_dtype", over_dump=True), str(tmp_path)
    )
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05), initial_scale=4.0)
    model = compiled(session.prepare_model(tiny_model()), session, optimizer=optimizer)
    x, y = quadrant_data(16 * 6)
    x[:] = 3e38
    with pytest.raises(NonFiniteError, match="fell to 0.5 after 3 skipped steps"):
        model.fit(dataset(x, y), epochs=1, callbacks=session.callbacks(), verbose=0)


# -- static shapes -------------------------------------------------------------


def test_static_traces_the_train_step_once_for_the_whole_run(tmp_path):
    session = setup_device(DeviceConfig(static=True, over_dump=True), str(tmp_path))
    model = compiled(session.prepare_model(tiny_model()), session)
    x, y = quadrant_data(80)
    callbacks = session.callbacks()
    model.fit(dataset(x, y, drop_remainder=True), epochs=3, callbacks=callbacks, verbose=0)
    guard = callbacks[0]
    assert guard.traces == 1
    assert guard.probe.trace_shapes == [[(16, 8, 8, 1), (16,)]]


def test_static_rejects_a_partial_last_batch(tmp_path):
    session = setup_device(DeviceConfig(static=True), str(tmp_path))
    model = compiled(session.prepare_model(tiny_model()), session)
    x, y = quadrant_data(40)
    with pytest.raises(ValueError, match="--static: .*drop_remainder=True"):
        model.fit(dataset(x, y, drop_remainder=False), callbacks=session.callbacks(), verbose=0)


def test_static_second_trace_is_an_error(tmp_path):
    session = setup_device(DeviceConfig(static=True), str(tmp_path))
    model = compiled(session.prepare_model(tiny_model()), session)
    x, y = quadrant_data(64)
    callbacks = session.callbacks()
    model.fit(dataset(x, y, batch=16), callbacks=callbacks, verbose=0)
    # Same fit's guard, new batch size: a second trace the static run forbids.
    with pytest.raises(RuntimeError, match="traced again"):
        model.fit(dataset(x, y, batch=8), callbacks=callbacks, verbose=0)


DISTRIBUTED_SCRIPT = """
import json, sys
import numpy as np, keras, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from knowledge_distillation.config import DeviceConfig
from knowledge_distillation.device import setup_device
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x = np.random.default_rng(0).random((64, 4), dtype=np.float32)
y = np.zeros(64, np.int32)
data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)
one_device = tf.distribute.MirroredStrategy(["/cpu:0"])
result = {}
for name, flag, strategy in (("static", "static", strategy),
                             ("dump", "data_dump_flag", strategy),
                             ("dump_one_replica", "data_dump_flag", one_device)):
    session = setup_device(DeviceConfig(**{flag: True, "data_dump_step": "1"}), sys.argv[1])
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callbacks = session.callbacks()
    try:
        model.fit(data, epochs=2, callbacks=callbacks, verbose=0)
        result[name] = {"traces": callbacks[0].probe.traces,
                        "shapes": callbacks[0].probe.trace_shapes,
                        "dumped": getattr(callbacks[0], "dumped", None)}
    except ValueError as e:
        result[name] = {"error": str(e)}
print(json.dumps(result))
"""


def test_under_tf_distribute_static_counts_per_run_and_dumps_need_one_replica(tmp_path):
    script = tmp_path / "distributed.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    # Logical devices must be set before TensorFlow starts: a fresh process.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO_ROOT}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["static"]["traces"] == 1
    assert result["static"]["shapes"] == [[[8, 4], [8]]]  # the batch of 16 split over 2
    assert "do not run with --distributed (2 replicas)" in result["dump"]["error"]
    assert result["dump_one_replica"]["dumped"] == [1]


# -- profiling ------------------------------------------------------------------


def test_profiling_writes_a_tensorboard_profile_trace(tmp_path):
    session = setup_device(DeviceConfig(profiling=True), str(tmp_path))
    model = compiled(session.prepare_model(tiny_model()), session)
    x, y = quadrant_data(96)
    callbacks = session.callbacks()
    model.fit(dataset(x, y), epochs=1, callbacks=callbacks, verbose=0)
    run = tmp_path / "profiling" / "tiny" / "plugins" / "profile"
    traces = glob.glob(str(run / "*" / "*.xplane.pb"))
    assert traces and all(os.path.getsize(t) > 0 for t in traces)
    assert callbacks[0].profiled == [3, 4, 5]
