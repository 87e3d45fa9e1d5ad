"""Run integrity from the command line: reruns, changed settings, busy and unwritable
folders, non-finite values, suspicious data, checks before the first training step."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from knowledge_distillation import compat

from conftest import REPO_ROOT

TINY = ["--train_size=256", "--test_size=128", "--batch_size=32", "--epoch=1",
        "--teacher=mlp_teacher", "--precision_mode=must_keep_origin_dtype"]


def _run(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "knowledge_distillation", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _error_line(result):
    lines = [l for l in result.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, fashion_mnist_path):
    out = tmp_path_factory.mktemp("finished")
    result = _run(TINY + [f"--data_path={fashion_mnist_path}", f"--output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _copy(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def test_rerun_of_the_same_command_re_reports_and_keeps_every_figure(finished, tmp_path, fashion_mnist_path):
    run = _copy(finished, tmp_path)
    before = (run / "summary.json").read_bytes()
    model = _digest(run / f"distilled{compat.MODEL_EXT}")
    result = _run(TINY + [f"--data_path={fashion_mnist_path}", f"--output_dir={run}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "re-reporting" in result.stdout and "training mlp_student" not in result.stdout
    assert (run / "summary.json").read_bytes() == before
    assert json.loads(before)["examples_per_sec"] > 0
    assert _digest(run / f"distilled{compat.MODEL_EXT}") == model


def test_rerun_with_settings_that_decide_the_models_is_refused(finished, tmp_path, fashion_mnist_path):
    run = _copy(finished, tmp_path)
    model = _digest(run / f"distilled{compat.MODEL_EXT}")
    args = [a for a in TINY if not a.startswith("--epoch")] + [
        "--epoch=2", "--alpha=0.9", f"--data_path={fashion_mnist_path}", f"--output_dir={run}"]
    result = _run(args)
    assert result.returncode != 0
    line = _error_line(result)
    assert "holds a run with other settings: alpha: 0.1 -> 0.9; epoch: 1 -> 2" in line
    assert "--overwrite" in line
    assert _digest(run / f"distilled{compat.MODEL_EXT}") == model
    # --overwrite starts over in the same folder, with the new settings.
    result = _run(args + ["--overwrite"])
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["alpha"] == 0.9 and summary["config"]["epoch"] == 2


def test_resume_on_a_host_computing_in_another_dtype_policy_is_refused(
        finished, tmp_path, fashion_mnist_path):
    run = _copy(finished, tmp_path)
    record = json.loads((run / "run.json").read_text())
    assert record["compute"]["dtype_policy"] == "float32"  # must_keep_origin_dtype, recorded
    # As if the scratch twin had trained in bfloat16 on an AMX host and the
    # run were killed before the distilled phase.
    record["compute"] = {"dtype_policy": "mixed_bfloat16", "host": "amx-host"}
    (run / "run.json").write_text(json.dumps(record))
    os.remove(run / f"distilled{compat.MODEL_EXT}")
    scratch = _digest(run / f"scratch{compat.MODEL_EXT}")
    result = _run(TINY + [f"--data_path={fashion_mnist_path}", f"--output_dir={run}"])
    assert result.returncode != 0
    line = _error_line(result)
    assert "holds a run that trained in mixed_bfloat16 (on amx-host)" in line
    assert "--precision_mode=must_keep_origin_dtype computes in float32 here" in line
    assert not (run / f"distilled{compat.MODEL_EXT}").exists()
    assert _digest(run / f"scratch{compat.MODEL_EXT}") == scratch


def test_rerun_with_another_teacher_is_refused(finished, tmp_path, fashion_mnist_path):
    run = _copy(finished, tmp_path)
    args = [a.replace("mlp_teacher", "cnn") for a in TINY]
    result = _run(args + [f"--data_path={fashion_mnist_path}", f"--output_dir={run}"])
    assert result.returncode != 0
    assert "teacher: 'mlp_teacher' -> 'cnn'" in _error_line(result)


def test_two_runs_in_one_folder_the_second_is_refused_at_once(tmp_path, fashion_mnist_path):
    out = tmp_path / "busy"
    first = subprocess.Popen(
        [sys.executable, "-m", "knowledge_distillation", *TINY, "--epoch=50",
         f"--data_path={fashion_mnist_path}", f"--output_dir={out}"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / ".lock").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / ".lock").exists()
        result = _run(TINY + ["--epoch=50", f"--data_path={fashion_mnist_path}",
                              f"--output_dir={out}"], timeout=120)
        assert result.returncode != 0
        assert f"is in use by another run (pid {first.pid} on" in _error_line(result)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


@pytest.mark.parametrize("flag, message", [
    ("--learning_rate=nan", "--learning_rate must be a finite number, got nan"),
    ("--temperature=inf", "--temperature must be a finite number, got inf"),
    ("--temperature=nan", "--temperature must be a finite number, got nan"),
    ("stray", "unexpected argument 'stray'"),
])
def test_non_finite_flags_and_stray_arguments_are_errors(flag, message, tmp_path):
    result = _run(TINY + [flag, f"--output_dir={tmp_path}"], timeout=60)
    assert result.returncode == 2
    assert message in _error_line(result)


def _npz(folder, x_train, y_train, x_test=None, y_test=None):
    folder.mkdir()
    np.savez(folder / "mnist.npz", x_train=x_train, y_train=y_train,
             x_test=x_train[:16] if x_test is None else x_test,
             y_test=y_train[:16] if y_test is None else y_test)
    return folder


def test_a_nan_pixel_is_an_error_naming_the_file(small_data, tmp_path):
    x = small_data.x_train[:64].astype(np.float32) / 255.0
    x[3, 5, 7, 0] = np.nan
    data = _npz(tmp_path / "nan", x, small_data.y_train[:64])
    result = _run(TINY[1:] + ["--train_size=64", "--test_size=16", f"--data_path={data}",
                              f"--output_dir={tmp_path / 'out'}"], timeout=120)
    assert result.returncode != 0
    line = _error_line(result)
    assert "mnist.npz" in line and "image 3 holds nan at (5, 7, 0)" in line


def test_suspicious_data_is_named(small_data, tmp_path):
    x = small_data.x_train[:64].astype(np.float64)  # 0-255 floats
    y = small_data.y_train[:64].copy()
    y[0] = 200
    data = _npz(tmp_path / "odd", x, y)
    result = _run(TINY[1:] + ["--train_size=64", "--test_size=16", "--teacher_epoch=1",
                              f"--data_path={data}", f"--output_dir={tmp_path / 'out'}"],
                  timeout=300)
    assert "floating-point images range over [0, 255]" in result.stdout
    assert "labels go up to 200, so the model gets 201 outputs, but only" in result.stdout


def test_a_single_class_is_named(small_data, tmp_path):
    data = _npz(tmp_path / "one", small_data.x_train[:64], np.zeros(64, np.int64))
    result = _run(TINY[1:] + ["--train_size=64", "--test_size=16", "--teacher_epoch=1",
                              f"--data_path={data}", f"--output_dir={tmp_path / 'out'}"],
                  timeout=300)
    assert "every label is 0: a single class" in result.stdout


def test_a_bad_student_is_found_before_the_teacher_trains(finished, tmp_path, fashion_mnist_path):
    result = _run(TINY + ["--student=bogus", f"--output_dir={tmp_path / 'a'}",
                          f"--data_path={fashion_mnist_path}"], timeout=120)
    assert result.returncode != 0
    assert "--student: unknown model 'bogus'" in _error_line(result)
    # A student file for 5 classes, against 10-class data.
    from knowledge_distillation.compat import keras

    five = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(5)])
    five.save(tmp_path / f"five{compat.MODEL_EXT}")
    result = _run(TINY + [f"--student_model={tmp_path / ('five' + compat.MODEL_EXT)}",
                          f"--output_dir={tmp_path / 'b'}", f"--data_path={fashion_mnist_path}"],
                  timeout=120)
    assert result.returncode != 0
    assert "--student_model: model has 5 outputs but the data has 10 classes" in _error_line(result)
    assert "teacher: training" not in result.stdout
    assert not (tmp_path / "b" / f"teacher{compat.MODEL_EXT}").exists()


@pytest.mark.parametrize("make, problem", [
    (lambda p: "/proc/kd-test", "cannot be written"),
    (lambda p: str(p / "file" / "sub"), "cannot be written"),
    (lambda p: str(p / "file"), "is a file"),
    (lambda p: "", "is empty"),
])
def test_unwritable_output_dir_is_one_error_naming_the_flag(make, problem, tmp_path):
    (tmp_path / "file").write_text("x")
    result = _run(TINY + [f"--output_dir={make(tmp_path)}"], timeout=60)
    assert result.returncode != 0
    line = _error_line(result)
    assert "--output_dir" in line and problem in line
    assert "Traceback" not in result.stderr


def test_non_finite_weights_end_the_run_naming_the_phase(tmp_path, fashion_mnist_path):
    result = _run(TINY + ["--learning_rate=1e30", f"--output_dir={tmp_path}",
                          f"--data_path={fashion_mnist_path}"])
    assert result.returncode != 0
    line = _error_line(result)
    assert "teacher: training produced non-finite weights" in line and "--over_dump" in line
    assert not (tmp_path / f"teacher{compat.MODEL_EXT}").exists()
    assert not (tmp_path / "summary.json").exists()


def test_the_first_line_a_user_sees_is_ours(tmp_path, fashion_mnist_path):
    result = _run(TINY + ["--student=bogus", f"--output_dir={tmp_path}",
                          f"--data_path={fashion_mnist_path}"], timeout=120)
    first = (result.stdout + result.stderr).splitlines()[0]
    assert "knowledge_distillation" in first, first
    for noise in ("absl::InitializeLog", "oneDNN custom operations", "cpu_feature_guard"):
        assert noise not in result.stderr
