"""End-to-end runs of the trainer CLI on small slices of real Fashion-MNIST."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import csv
import numpy as np
import pytest

from knowledge_distillation import compat

from conftest import REPO_ROOT

SMALL = ["--train_size=1024", "--test_size=256", "--batch_size=32", "--log_steps=8"]


def _run(args, timeout=300, script=None):
    cmd = [sys.executable] + ([script] if script else ["-m", "knowledge_distillation"]) + args
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fashion_mnist_path):
    out = tmp_path_factory.mktemp("run")
    result = _run(SMALL + [f"--data_path={fashion_mnist_path}", "--epoch=2",
                           f"--output_dir={out}", "--precision_mode=must_keep_origin_dtype"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_run_writes_summary_models_checkpoints_and_logs(finished_run):
    out, result = finished_run
    summary = json.loads((out / "summary.json").read_text())
    for phase in ("teacher", "scratch", "distilled"):
        assert summary[phase]["accuracy"] > 0.3  # well above chance at 10 classes
        assert np.isfinite(summary[phase]["loss"])
        assert (out / f"{phase}{compat.MODEL_EXT}").is_file()
        epochs = sorted(os.listdir(out / "checkpoints" / phase))
        assert epochs == ["epoch_001.weights.h5", "epoch_002.weights.h5"]
        rows = list(csv.DictReader(open(out / "logs" / f"{phase}.csv")))
        assert [int(r["epoch"]) for r in rows] == [0, 1]
        assert os.listdir(out / "logs" / "tensorboard" / phase / "train")
    assert summary["data"] == {"name": "fashion-mnist", "train_examples": 1024,
                               "test_examples": 256, "input_shape": [28, 28, 1],
                               "teacher_input_shape": [28, 28, 1], "num_classes": 10,
                               "class_names": None, "source": "arrays", "cache_images": "none",
                               "preprocessing": "unit", "interpolation": "bilinear"}
    assert summary["stack"]["keras"] == compat.KERAS_VERSION
    assert summary["stack"]["stack"] == compat.STACK
    assert summary["examples_per_sec"] > 0
    assert summary["distilled"]["parameters"] == summary["scratch"]["parameters"]
    # Even two short epochs on 1024 images teach something.
    assert summary["teacher"]["accuracy"] > 0.5
    assert "distilled student  test accuracy" in result.stdout
    assert (out / "train.log").read_text().count("test accuracy") == 3
    # 32 steps per compiled call by default on CPU; the throughput log still
    # counts every step (1024 images / 32 = 32 steps per epoch)
    assert "training: 32 steps per compiled call (default on GPU/CPU)" in result.stdout
    assert "teacher: step 64," in result.stdout


def test_distilled_student_saves_alone_and_reloads_with_its_accuracy(finished_run, small_data):
    out, _ = finished_run
    summary = json.loads((out / "summary.json").read_text())
    student = compat.load_model_file(str(out / f"distilled{compat.MODEL_EXT}"))
    assert student.count_params() == summary["distilled"]["parameters"]
    from knowledge_distillation.data import preprocess
    logits = student.predict(preprocess(small_data.x_test), verbose=0)
    accuracy = float(np.mean(np.argmax(logits, -1) == small_data.y_test))
    assert accuracy == pytest.approx(summary["distilled"]["accuracy"], abs=1e-6)


def test_rerun_of_a_finished_output_dir_re_reports_every_phase(finished_run, fashion_mnist_path):
    out, _ = finished_run
    before = json.loads((out / "summary.json").read_text())
    result = _run(SMALL + [f"--data_path={fashion_mnist_path}", "--epoch=2",
                           f"--output_dir={out}", "--precision_mode=must_keep_origin_dtype"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "every phase finished in an earlier run with these settings: re-reporting" in result.stdout
    after = json.loads((out / "summary.json").read_text())
    for phase in ("teacher", "scratch", "distilled"):
        assert after[phase]["accuracy"] == pytest.approx(before[phase]["accuracy"], abs=1e-6)


def test_killed_run_resumes_from_last_finished_epoch(tmp_path, fashion_mnist_path):
    out = tmp_path / "run"
    args = ["--train_size=2048", "--test_size=256", f"--data_path={fashion_mnist_path}",
            "--epoch=1", "--teacher_epoch=3", f"--output_dir={out}",
            "--precision_mode=must_keep_origin_dtype"]
    proc = subprocess.Popen([sys.executable, "-m", "knowledge_distillation"] + args,
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "checkpoints" / "teacher" / "epoch_001.weights.h5"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert first.exists(), "the teacher never finished its first epoch"
    assert not (out / f"teacher{compat.MODEL_EXT}").exists(), "killed too late to test resuming"
    killed_rows = list(csv.DictReader(open(out / "logs" / "teacher.csv")))

    result = _run(args)
    assert result.returncode == 0, result.stderr[-2000:]
    epochs = [int(r["epoch"]) for r in csv.DictReader(open(out / "logs" / "teacher.csv"))]
    # Resumed: the epochs logged before the kill are not trained again, and
    # the shuffle order goes on from the last finished one.
    assert epochs == list(range(3)), epochs
    assert re.search(r"resuming at epoch [23]: the shuffle order moved on past the [12] "
                     r"finished epoch", result.stdout), result.stdout[-3000:]
    assert len(killed_rows) >= 1
    assert json.loads((out / "summary.json").read_text())["teacher"]["trained"] is True


def test_rerun_after_losing_the_distilled_phase_reuses_the_teacher_cache(
        finished_run, fashion_mnist_path, tmp_path):
    out, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    first = json.loads((run / "summary.json").read_text())
    assert (run / "teacher_cache" / "teacher_logits.npy").is_file()
    os.remove(run / f"distilled{compat.MODEL_EXT}")
    shutil.rmtree(run / "backup" / "distilled", ignore_errors=True)
    result = _run(SMALL + [f"--data_path={fashion_mnist_path}", "--epoch=2",
                           f"--output_dir={run}", "--precision_mode=must_keep_origin_dtype"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("finished in an earlier run") == 2
    summary = json.loads((run / "summary.json").read_text())
    # The teacher came back from teacher.keras, recompiled, with new variable
    # paths: the same logits all the same.
    assert summary["distilled"]["teacher_cache"] == "reused"
    assert "teacher cache: reusing" in result.stdout
    assert summary["distilled"]["accuracy"] == pytest.approx(first["distilled"]["accuracy"], abs=1e-6)


def test_user_teacher_model_is_evaluated_not_retrained(finished_run, fashion_mnist_path, tmp_path):
    out, _ = finished_run
    teacher_path = out / f"teacher{compat.MODEL_EXT}"
    result = _run(SMALL + [f"--data_path={fashion_mnist_path}", "--epoch=1",
                           f"--teacher_model={teacher_path}", f"--output_dir={tmp_path}",
                           "--precision_mode=must_keep_origin_dtype"])
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    original = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["trained"] is False
    assert not (tmp_path / f"teacher{compat.MODEL_EXT}").exists()
    assert summary["teacher"]["accuracy"] == pytest.approx(original["teacher"]["accuracy"], abs=1e-6)


@pytest.mark.parametrize("augment", [[], ["--augment", "--augment_mix=mixup"],
                                     ["--augment", "--teacher_views=2"]],
                         ids=["plain", "augmented", "view_cache"])
def test_alpha_one_distillation_is_scratch_training(finished_run, fashion_mnist_path, tmp_path,
                                                    augment):
    # alpha=1 leaves only the label loss: with the same initial weights, the
    # same data order and (augmented) the same views and mixed labels, the
    # distilled student must be the scratch student.
    out, _ = finished_run
    result = _run(SMALL + [f"--data_path={fashion_mnist_path}", "--epoch=2", "--alpha=1",
                           f"--teacher_model={out / ('teacher' + compat.MODEL_EXT)}", f"--output_dir={tmp_path}",
                           "--precision_mode=must_keep_origin_dtype"] + augment)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    if "--augment_mix=mixup" in augment:
        assert summary["recipe"]["augmentation"] == "shift 2 px, flip, mixup alpha 1"
        assert summary["recipe"]["teacher"] == "per step"
    if augment:
        assert "scratch: training batches augmented" in result.stdout + result.stderr
    assert summary["distilled"]["accuracy"] == summary["scratch"]["accuracy"]
    assert summary["distilled"]["loss"] == pytest.approx(summary["scratch"]["loss"], rel=1e-6)
    scratch = compat.load_model_file(str(tmp_path / f"scratch{compat.MODEL_EXT}"))
    distilled = compat.load_model_file(str(tmp_path / f"distilled{compat.MODEL_EXT}"))
    for a, b in zip(scratch.get_weights(), distilled.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data_path=/nonexistent/fmnist"], "/nonexistent/fmnist"),
        (["--alpha=1.5"], "--alpha must be between 0.0 and 1.0, got 1.5"),
        (["--precision_mode=fp8"], "precision_mode"),
        (["--teacher_model=/nonexistent/t.keras"], "--teacher_model: /nonexistent/t.keras does not exist"),
        (["--teacher=resnet"], "unknown model 'resnet'"),
        (["--steps_per_execution=0"], "--steps_per_execution must be positive, got 0"),
        (["--steps_per_execution=4", "--over_dump"],
         "--steps_per_execution 4: --over_dump inspects every training step"),
        (["--steps_per_execution=4", "--distributed"],
         "--steps_per_execution 4: Keras cannot run several steps per call under --distributed"),
    ],
)
def test_bad_input_is_one_clear_error_line_and_nonzero_exit(args, expected, tmp_path):
    result = _run(SMALL + ["--epoch=1", f"--output_dir={tmp_path}"] + args, timeout=120)
    assert result.returncode != 0
    error_lines = [l for l in result.stderr.splitlines() if "error:" in l]
    assert len(error_lines) == 1, result.stderr[-2000:]
    assert expected in error_lines[0]
    assert not (tmp_path / "summary.json").exists()


def test_modelzoo_shim_and_eval_static_alias_parse():
    result = _run(["--help"], script="knowledge_distillation.py", timeout=60)
    assert result.returncode == 0
    for flag in ("--data_path", "--epoch", "--static", "--log_steps", "--precision_mode",
                 "--over_dump", "--data_dump_flag", "--profiling", "--use_mixlist",
                 "--fusion_off_flag", "--alpha", "--temperature"):
        assert flag.lstrip("-") in result.stdout
    from absl import flags
    from knowledge_distillation import flags as kd_flags

    fv = flags.FlagValues()
    kd_flags.define_trainer_flags(fv)
    fv(["prog", "--eval_static=True", "--epoch=3"])
    config = kd_flags.train_config(fv)
    assert config.device.static is True and config.epoch == 3
    assert config.batch_size == 32 and config.log_steps == 100
    assert config.device.precision_mode == "allow_mix_precision"
    assert config.device.data_dump_step == "10"


def test_a_model_file_that_is_not_what_its_name_says_is_one_error_naming_it(tmp_path):
    fake = tmp_path / f"teacher{compat.MODEL_EXT}"
    fake.write_bytes(b"not a model at all")
    result = _run(SMALL + ["--epoch=1", f"--output_dir={tmp_path / 'out'}",
                           f"--teacher_model={fake}"], timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"--teacher_model: {fake} is not" in errors[0], result.stderr[-2000:]


@pytest.mark.skipif(compat.KERAS3, reason="Keras 3 runs the quantizer and reads .keras files")
def test_keras2_refuses_what_needs_keras3_with_one_line(tmp_path):
    keras3_file = tmp_path / "teacher.keras"
    keras3_file.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip archive
    for args, expected in (
            (["--quantize"], "--quantize needs Keras 3"),
            ([f"--teacher_model={keras3_file}"], "is a Keras 3 .keras file")):
        result = _run(SMALL + ["--epoch=1", f"--output_dir={tmp_path / 'out'}"] + args,
                      timeout=120)
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
        assert expected in errors[0]
    quant = subprocess.run([sys.executable, "-m", "knowledge_distillation.quant", "--help"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert quant.returncode != 0
    assert "knowledge_distillation.quant needs Keras 3" in quant.stderr
    assert "Traceback" not in quant.stderr


def test_view_cache_run(finished_run, fashion_mnist_path, tmp_path):
    out, _ = finished_run
    result = _run(SMALL + [f"--data_path={fashion_mnist_path}", "--epoch=2", "--alpha=0",
                           "--augment", "--teacher_views=2", "--distillation_loss=kl",
                           f"--teacher_model={out / ('teacher' + compat.MODEL_EXT)}",
                           f"--output_dir={tmp_path}", "--precision_mode=must_keep_origin_dtype"])
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["recipe"]["teacher"] == "view cache"
    assert summary["recipe"]["temperature"] == 1.0
    assert summary["distilled"]["teacher_cache"] == "views: computed"
    assert summary["distilled"]["accuracy"] > 0.5
    assert (tmp_path / "teacher_cache" / "teacher_view_logits.npy").is_file()
    assert "view cache (--teacher_views 2)" in result.stdout + result.stderr
