"""The npu_device contract: the options ModelZoo's npu_config() sets, strictly checked."""

import json
import logging

import pytest

from knowledge_distillation import compat
from knowledge_distillation.ascend.device import setup_device
from knowledge_distillation.compat import keras
from knowledge_distillation.config import PRECISION_MODES, DeviceConfig

from ascend_helpers import (  # noqa: F401  (fixtures are used by name)
    npu,
    tensorflow_defaults,
    tiny_model,
    write_json,
)


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


@pytest.mark.parametrize("mode", [m for m in PRECISION_MODES
                                  if m not in ("allow_mix_precision", "allow_mix_precision_bf16")])
def test_npu_mixlist_is_only_set_with_the_mix_precision_modes(npu, tmp_path, caplog, mode):
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
    assert session.compile_kwargs() == compat.jit_compile_off()  # {} on Keras 2.6: no XLA unless asked
    optimizer = keras.optimizers.SGD()
    assert session.wrap_optimizer(optimizer) is optimizer


def test_npu_malformed_fusion_file_fails_before_opening(npu, tmp_path):
    bad = tmp_path / "fusion.cfg"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"--fusion_off_file={bad}: not valid JSON"):
        setup_device(DeviceConfig(fusion_off_flag=True, fusion_off_file=str(bad)), str(tmp_path))
    assert ("open",) not in npu.calls


def test_npu_leaves_the_training_loop_to_npu_device(npu, tmp_path):
    session = setup_device(DeviceConfig(over_dump=True), str(tmp_path))
    assert session.steps_per_execution() == (1, "npu_device runs the training loop")


def test_the_stand_in_is_as_strict_as_npu_device(npu):
    options = npu.global_options()
    with pytest.raises(ValueError, match="has no option precison_mode"):
        options.precison_mode = "allow_mix_precision"
    with pytest.raises(ValueError, match="'fp8' not in optional list"):
        options.precision_mode = "fp8"
    with pytest.raises(ValueError, match="'both' not in optional list"):
        options.dump_config.dump_mode = "both"
    with pytest.raises(ValueError, match="has no option profiling_config.enable"):
        options.profiling_config.enable = True
    assert npu.calls == []  # nothing rejected was recorded
