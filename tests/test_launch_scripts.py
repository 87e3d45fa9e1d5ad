"""Tests of the ModelZoo launch scripts in test/, running the real trainer.

Each test uses its own ASCEND_DEVICE_ID, so its outputs land in a folder of
test/output/ that no user run shares; the folder is removed afterwards.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import csv
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_DIR = os.path.join(REPO_ROOT, "test")
NETWORK = "knowledge_distillation_ID2517_for_TensorFlow2.X"
SCRIPTS = (
    "train_full_1p.sh",
    "train_performance_1p_dynamic_eval.sh",
    "train_performance_1p_static_eval.sh",
)
CASE_KEYS = [
    "Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS",
    "TrainingTime", "TrainAccuracy", "ActualLoss", "E2ETrainingTime",
]
SMALL_RUN = ["--train_size=512", "--test_size=256", "--max_steps=5"]


@pytest.fixture
def device_id(request):
    """A device id of this test alone; its output folder is removed after."""
    number = 90000 + (os.getpid() * 101 + len(request.node.nodeid) * 7919) % 9000
    while os.path.exists(os.path.join(TEST_DIR, "output", str(number))):
        number += 1
    out_dir = os.path.join(TEST_DIR, "output", str(number))
    yield str(number)
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        os.rmdir(os.path.join(TEST_DIR, "output"))  # only when left empty
    except OSError:
        pass


def run_script(script, args, device_id, cwd):
    # PYTHON: the scripts run the trainer on this stack's interpreter.
    env = dict(os.environ, ASCEND_DEVICE_ID=device_id, PYTHON=sys.executable)
    return subprocess.run(
        ["bash", os.path.join(TEST_DIR, script), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


def read_case_log(path):
    pairs = []
    with open(path) as f:
        for line in f:
            key, sep, value = line.rstrip("\n").partition(" = ")
            assert sep, f"not a 'key = value' line: {line!r}"
            pairs.append((key, value))
    return pairs


# --- arguments -----------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_the_flags_and_outputs(script, device_id, tmp_path):
    result = run_script(script, ["--help"], device_id, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"usage: bash test/{script} --data_path=DIR" in result.stdout
    assert "${CaseName}.log" in result.stdout
    assert not os.path.exists(os.path.join(TEST_DIR, "output", device_id))


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--data_path=DIR is required"),
        (["--epoch=1"], "--data_path=DIR is required"),
        (["--data_path"], "--data_path needs a folder"),
        (["--data_path=does/not/exist"], "does/not/exist is not a folder"),
        (["--data_path=.", "extra"], "unexpected argument 'extra'"),
    ],
)
@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_arguments_exit_1_before_training(
    script, args, message, device_id, tmp_path
):
    result = run_script(script, args, device_id, tmp_path)
    assert result.returncode == 1
    assert f"{script}: error: " in result.stderr
    assert message in result.stderr
    assert "Final result" not in result.stdout
    assert not os.path.exists(os.path.join(TEST_DIR, "output", device_id))


# --- failures of the trainer ----------------------------------------------


def test_failed_training_exits_nonzero_and_writes_no_report(device_id, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_script(
        "train_performance_1p_dynamic_eval.sh", ["--data_path=empty"],
        device_id, tmp_path,
    )
    assert result.returncode == 1
    out_dir = os.path.join(TEST_DIR, "output", device_id)
    train_log = os.path.join(out_dir, f"train_{device_id}.log")
    assert f"training failed with exit code 1; full log: {train_log}" in result.stderr
    with open(train_log) as f:
        log = f.read()
    # The relative --data_path reached the trainer resolved from our cwd.
    assert f"data_path {empty} holds neither mnist.npz" in log
    assert "Final result" not in result.stdout
    assert set(os.listdir(out_dir)) == {
        "train_performance_1p_dynamic_eval", f"train_{device_id}.log"
    }


# --- real runs on a small slice of Fashion-MNIST ------------------------------


def check_report(result, script, device_id, batch_size, kind):
    """Checks the Final result block and both logs; returns the summary."""
    assert result.returncode == 0, result.stdout + result.stderr
    out_dir = os.path.join(TEST_DIR, "output", device_id)
    run_dir = os.path.join(out_dir, script[: -len(".sh")])
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)

    block = re.search(
        r"^-{18} Final result -{18}\n"
        r"Final Performance images/sec : (\S+)\n"
        r"Final Train Accuracy : (\S+)\n"
        r"E2E Training Duration sec : (\S+)\n\Z",
        result.stdout, re.M,
    )
    assert block, result.stdout
    fps, accuracy, e2e = block.groups()
    assert float(fps) == pytest.approx(summary["examples_per_sec"], abs=0.005)
    assert float(fps) > 0
    assert float(accuracy) == pytest.approx(summary["train_accuracy"], abs=5e-5)
    # The figure is the distilled student's last training epoch, as logged.
    with open(os.path.join(run_dir, "logs", "distilled.csv")) as f:
        last_epoch = list(csv.DictReader(f))[-1]
    assert float(accuracy) == pytest.approx(float(last_epoch["accuracy"]), abs=5e-5)
    # The script times the whole trainer process, start-up included.
    assert int(e2e) >= int(summary["wall_time_sec"])

    with open(os.path.join(out_dir, f"train_{device_id}.log")) as f:
        train_log = f.read()
    assert "summary written to" in train_log

    case_name = f"{NETWORK}_bs{batch_size}_1p_{kind}"
    pairs = read_case_log(os.path.join(out_dir, f"{case_name}.log"))
    assert [key for key, _ in pairs] == CASE_KEYS
    case = dict(pairs)
    assert case["Network"] == NETWORK
    assert case["RankSize"] == "1"
    assert case["BatchSize"] == str(batch_size)
    assert case["DeviceType"] == os.uname().machine
    assert case["CaseName"] == case_name
    assert case["ActualFPS"] == fps
    # ModelZoo's TrainingTime is milliseconds per step.
    assert float(case["TrainingTime"]) == pytest.approx(
        batch_size * 1000 / summary["examples_per_sec"], abs=0.005
    )
    assert case["TrainAccuracy"] == accuracy
    assert float(case["ActualLoss"]) == pytest.approx(summary["train_loss"], abs=5e-5)
    assert case["E2ETrainingTime"] == e2e
    assert summary["config"]["batch_size"] == batch_size
    return summary


def test_full_script_reports_a_real_run(device_id, tmp_path):
    result = run_script(
        "train_full_1p.sh",
        ["--data_path=/usr/share/datasets/fashion-mnist", "--epoch=1",
         "--teacher_epoch=1", "--batch_size=64", *SMALL_RUN],
        device_id, tmp_path,
    )
    summary = check_report(result, "train_full_1p.sh", device_id, 64, "acc")
    assert summary["config"]["device"]["static"] is False
    assert summary["data"]["train_examples"] == 512
    # Run twice: the script starts clean each time, as ModelZoo's do, and reports again.
    again = run_script(
        "train_full_1p.sh",
        ["--data_path=/usr/share/datasets/fashion-mnist", "--epoch=1",
         "--teacher_epoch=1", "--batch_size=64", *SMALL_RUN],
        device_id, tmp_path,
    )
    check_report(again, "train_full_1p.sh", device_id, 64, "acc")
    assert "teacher: training" in open(os.path.join(
        TEST_DIR, "output", device_id, f"train_{device_id}.log")).read()


@pytest.mark.parametrize(
    "script, static",
    [("train_performance_1p_static_eval.sh", True),
     ("train_performance_1p_dynamic_eval.sh", False)],
)
def test_perf_scripts_report_a_bounded_run(script, static, device_id, tmp_path):
    os.symlink("/usr/share/datasets/fashion-mnist", tmp_path / "fm")
    result = run_script(script, ["--data_path=fm", *SMALL_RUN], device_id, tmp_path)
    summary = check_report(result, script, device_id, 32, "perf")
    config = summary["config"]
    assert config["device"]["static"] is static
    assert config["epoch"] == 1 and config["teacher_epoch"] == 1
    assert config["max_steps"] == 5  # the user's flag beats the script's 100

    # A second run that fails must not report the first run's summary.
    again = run_script(script, ["--data_path=fm", "--alpha=2"], device_id, tmp_path)
    assert again.returncode == 1
    assert "training failed with exit code 2" in again.stderr
    assert "Final result" not in again.stdout
    run_dir = os.path.join(TEST_DIR, "output", device_id, script[: -len(".sh")])
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
