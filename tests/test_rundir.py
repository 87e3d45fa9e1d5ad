"""The output folder's record and lock (knowledge_distillation/rundir.py)."""

import json
import logging
import os
import subprocess
import sys

import pytest

from knowledge_distillation import compat
from knowledge_distillation import rundir
from knowledge_distillation.config import TrainConfig


def _folder(path, **config):
    return rundir.RunFolder(str(path), rundir.deciding_settings(TrainConfig(**config)),
                            overwrite=config.get("overwrite", False))


def test_settings_that_decide_the_models_are_recorded_and_others_are_not():
    base = rundir.deciding_settings(TrainConfig())
    assert rundir.deciding_settings(TrainConfig(log_steps=7, output_dir="x", quantize=True,
                                                steps_per_execution=4)) == base
    for change in ({"epoch": 2}, {"alpha": 0.5}, {"seed": 1}, {"teacher": "mlp_teacher"}):
        assert rundir.deciding_settings(TrainConfig(**change)) != base, change


def test_a_folder_the_other_stack_wrote_is_refused_naming_the_stack(tmp_path, monkeypatch):
    run = _folder(tmp_path, epoch=1)
    run.claim()
    run.release()
    (tmp_path / f"teacher{compat.MODEL_EXT}").write_bytes(b"a model")
    monkeypatch.setattr(compat, "STACK", "TensorFlow 2.6.5 + Keras 2.6.0 (tf.keras)"
                        if compat.KERAS3 else "TensorFlow 2.21.0 + Keras 3.15.1")
    with pytest.raises(ValueError, match=r"holds a run with other settings: stack: "):
        _folder(tmp_path, epoch=1).claim()


def test_a_user_model_file_counts_by_content(tmp_path):
    model = tmp_path / f"t{compat.MODEL_EXT}"
    model.write_bytes(b"one")
    first = rundir.deciding_settings(TrainConfig(teacher_model=str(model)))
    model.write_bytes(b"two")
    assert rundir.deciding_settings(TrainConfig(teacher_model=str(model))) != first


def test_other_settings_over_earlier_outputs_are_one_error_naming_them(tmp_path):
    run = _folder(tmp_path, epoch=1)
    run.claim()
    run.release()
    (tmp_path / f"teacher{compat.MODEL_EXT}").write_bytes(b"a model")
    with pytest.raises(ValueError) as e:
        _folder(tmp_path, epoch=2, alpha=0.9).claim()
    assert "holds a run with other settings: alpha: 0.1 -> 0.9; epoch: 1 -> 2" in str(e.value)
    assert "--overwrite" in str(e.value)
    again = _folder(tmp_path, epoch=1)
    again.claim()  # same settings: resumes
    again.release()


def test_overwrite_removes_only_what_a_run_writes(tmp_path):
    _folder(tmp_path, epoch=1).claim()
    for name in (f"teacher{compat.MODEL_EXT}", "summary.json", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoints" / "teacher").mkdir(parents=True)
    os.remove(tmp_path / rundir.LOCK_FILE)
    run = _folder(tmp_path, epoch=2, overwrite=True)
    run.claim()
    assert sorted(os.listdir(tmp_path)) == [rundir.LOCK_FILE, "notes.txt", rundir.RUN_FILE]
    assert json.loads((tmp_path / rundir.RUN_FILE).read_text())["settings"]["epoch"] == 2
    run.release()


def test_outputs_without_a_record_are_refused(tmp_path):
    (tmp_path / f"distilled{compat.MODEL_EXT}").write_text("x")
    with pytest.raises(ValueError, match=r"holds run outputs \(distilled\.(keras|h5)\) but no run.json"):
        _folder(tmp_path).claim()


def test_the_data_must_match_the_record(tmp_path):
    run = _folder(tmp_path)
    run.claim()
    run.check_data({"name": "a", "train": "1", "test": "2"})
    (tmp_path / f"scratch{compat.MODEL_EXT}").write_text("x")
    with pytest.raises(ValueError, match="holds a run on other data"):
        run.check_data({"name": "a", "train": "9", "test": "2"})
    run.release()


def test_a_resume_must_compute_in_the_recorded_dtype_policy(tmp_path):
    run = _folder(tmp_path)
    run.claim()
    run.check_compute("mixed_bfloat16", "allow_mix_precision")
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["compute"]["dtype_policy"] == "mixed_bfloat16"
    assert record["settings"] == rundir.deciding_settings(TrainConfig())
    # Nothing trained yet: another host may take the run over, and records itself.
    run.check_compute("float32", "allow_mix_precision")
    assert json.loads((tmp_path / "run.json").read_text())["compute"]["dtype_policy"] == "float32"
    (tmp_path / f"scratch{compat.MODEL_EXT}").write_text("x")
    run.check_compute("float32", "allow_mix_precision")  # the same policy resumes
    with pytest.raises(ValueError) as e:
        run.check_compute("mixed_bfloat16", "allow_mix_precision")
    assert "holds a run that trained in float32" in str(e.value)
    assert "--precision_mode=allow_mix_precision computes in mixed_bfloat16 here" in str(e.value)
    assert "--overwrite" in str(e.value)
    assert json.loads((tmp_path / "run.json").read_text())["compute"]["dtype_policy"] == "float32"
    run.release()


def test_an_unreadable_compute_record_is_re_recorded_with_a_warning(tmp_path, caplog):
    run = _folder(tmp_path)
    run.claim()
    (tmp_path / f"scratch{compat.MODEL_EXT}").write_text("x")
    for earlier in (None, "float32", {"host": "h"}):  # an older version's run.json, damaged ones
        record = json.loads((tmp_path / "run.json").read_text())
        record["compute"] = earlier
        (tmp_path / "run.json").write_text(json.dumps(record))
        with caplog.at_level(logging.WARNING, logger="knowledge_distillation.rundir"):
            run.check_compute("mixed_bfloat16", "allow_mix_precision")
        assert "cannot check it: recording mixed_bfloat16" in caplog.text
        caplog.clear()
        assert json.loads((tmp_path / "run.json").read_text())["compute"]["dtype_policy"] == (
            "mixed_bfloat16")
    run.release()


@pytest.mark.parametrize("mode, on_npu, global_policy, low, expected", [
    ("must_keep_origin_dtype", False, "float32", "mixed_bfloat16", "float32"),
    ("allow_mix_precision", False, "mixed_bfloat16", "mixed_bfloat16", "mixed_bfloat16"),
    ("allow_mix_precision", False, "float32", "float32", "float32"),  # a CPU without bfloat16
    ("allow_fp32_to_fp16", False, "float32", "mixed_float16", "float32 with mixed_float16 layers"),
    ("allow_fp32_to_bf16", False, "float32", "float32", "float32"),
    ("allow_mix_precision", True, "float32", None, "npu_device"),
])
def test_what_a_run_trains_in_names_layer_policies_under_a_float32_global_one(
        mode, on_npu, global_policy, low, expected):
    import types

    from knowledge_distillation.ascend.precision import run_compute
    from knowledge_distillation.compat import keras

    keras.mixed_precision.set_global_policy(global_policy)
    session = types.SimpleNamespace(on_npu=on_npu, low_policy=low)
    assert run_compute(session, mode) == expected


def test_a_busy_folder_is_refused_naming_the_other_run(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / rundir.LOCK_FILE).write_text(json.dumps(
            {"pid": other.pid, "host": os.uname().nodename, "started": "today"}))
        with pytest.raises(ValueError, match=f"is in use by another run \\(pid {other.pid} on"):
            _folder(tmp_path).claim()
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / rundir.LOCK_FILE).write_text(json.dumps(
        {"pid": dead.pid, "host": os.uname().nodename, "started": "yesterday"}))
    run = _folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="knowledge_distillation"):
        run.claim()
    assert f"taking over the lock of pid {dead.pid}" in caplog.text
    assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()
    run.release()
    assert not (tmp_path / rundir.LOCK_FILE).exists()


@pytest.mark.parametrize("make, problem", [
    (lambda p: p / "file", "is a file"),
    (lambda p: p / "file" / "sub", "cannot be written"),
    (lambda p: "", "is empty"),
    (lambda p: "/proc/kd-test", "cannot be written"),
])
def test_unwritable_output_folders_name_the_flag(tmp_path, make, problem):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"--output_dir.*{problem}"):
        rundir.check_writable_dir(str(make(tmp_path)), "--output_dir")
