"""The device session on CPU: fusion switches, compile settings, output paths, dump steps."""

import logging
import os

import pytest
import tensorflow as tf
from tensorflow.python.eager import context

from knowledge_distillation import compat
from knowledge_distillation.ascend.device import parse_dump_steps, setup_device
from knowledge_distillation.config import DeviceConfig

from ascend_helpers import (  # noqa: F401  (fixtures are used by name)
    tensorflow_defaults,
    write_json,
)


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
    assert session.compile_kwargs() == compat.jit_compile_off()  # {} on Keras 2.6: no XLA unless asked
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
