"""Distributed training in subprocesses: the Distiller's loss under a
strategy, trainer runs on 2 logical CPU devices and on 2 worker processes,
resume after a killed worker, and the npu_device contract.

Logical CPU devices and MultiWorkerMirroredStrategy must be set up before
TensorFlow starts, so those runs are subprocesses (tests/distribute_probe.py
or the trainer CLI). Workers listen on 127.0.0.1 only, on ports the OS hands
out; every subprocess has a deadline and is killed in a `finally`.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from knowledge_distillation import compat
from knowledge_distillation.compat import keras

from conftest import REPO_ROOT, keras3_only

NPU_STUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "npu_stub")
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distribute_probe.py")
DIGEST = re.compile(r"final weights of (\S+): digest ([0-9a-f]{32})")
# Seconds for any one subprocess: a guard against hangs, generous for a busy shared machine.
DEADLINE = 600


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "RANK_SIZE", "RANK_ID")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def _tf_config(cluster, task_type, index):
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# -- the Distiller's loss under MirroredStrategy (subprocesses) ----------------


def _probe(num_cpu_devices):
    result = subprocess.run([sys.executable, PROBE, str(num_cpu_devices)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=DEADLINE, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_two_logical_devices_train_the_distiller_like_one_device_on_the_same_global_batch():
    one, two = _probe(0), _probe(2)
    assert (one["replicas"], two["replicas"]) == (1, 2)
    keras_distillation = ("feature_mse", "feature_mse_object", "logits_kl_object",
                          "logits_kl_string", "logits_mse_object")
    variants = ("live_teacher", "cached_teacher", "keras_io_losses", "classifier") + (
        keras_distillation if compat.KERAS3 else ("output_mse_object",))
    assert set(variants) <= set(one)
    for variant in variants:
        for key, values in one[variant]["history"].items():
            np.testing.assert_allclose(two[variant]["history"][key], values, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{variant} {key}")
        for w1, w2 in zip(one[variant]["weights"], two[variant]["weights"]):
            np.testing.assert_allclose(w2, w1, rtol=1e-5, atol=1e-6, err_msg=variant)
    # The reported terms are global means, not per-replica shares.
    assert two["live_teacher"]["history"]["student_loss"][0] > 1.0
    # Keras' KL-on-logits default becomes Hinton's KD, as KLDivergence() does.
    if compat.KERAS3:
        np.testing.assert_allclose(one["logits_kl_string"]["history"]["distillation_loss"],
                                   one["logits_kl_object"]["history"]["distillation_loss"],
                                   rtol=1e-6)


# -- the trainer CLI on logical devices and on two workers ---------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny teacher and student (no dropout, no BatchNorm: replicas agree exactly)."""
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for name, width, seed in (("teacher", 32, 0), ("student", 16, 1)):
        compat.set_random_seed(seed)
        model = keras.Sequential([
            keras.Input((28, 28, 1)), keras.layers.Flatten(),
            keras.layers.Dense(width, activation="relu"), keras.layers.Dense(10)],
            name=f"tiny_{name}")
        paths[name] = str(folder / f"{name}{compat.MODEL_EXT}")
        model.save(paths[name])
    return paths


def _trainer_args(tiny_models, data_path, output_dir, epoch=2, train_size=512, test_size=256):
    return ["-m", "knowledge_distillation", f"--data_path={data_path}",
            f"--train_size={train_size}", f"--test_size={test_size}", "--batch_size=32",
            f"--epoch={epoch}", "--log_steps=1000", "--precision_mode=must_keep_origin_dtype",
            f"--teacher_model={tiny_models['teacher']}",
            f"--student_model={tiny_models['student']}", f"--output_dir={output_dir}"]


def _run_trainer(args):
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=DEADLINE, env=_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _summary(output_dir):
    with open(os.path.join(output_dir, "summary.json")) as f:
        return json.load(f)


def _assert_same_training(summary, reference):
    for phase in ("scratch", "distilled"):
        for key in ("accuracy", "loss", "train_loss", "train_accuracy"):
            assert summary[phase][key] == pytest.approx(reference[phase][key], rel=1e-4, abs=1e-5), (
                phase, key)


@pytest.fixture(scope="module")
def one_device_run(tiny_models, fashion_mnist_path, tmp_path_factory):
    """The reference: the same run without --distributed."""
    out = tmp_path_factory.mktemp("one_device")
    _run_trainer(_trainer_args(tiny_models, fashion_mnist_path, out))
    return _summary(out)


def test_trainer_on_two_logical_cpu_devices_matches_one_device(
        one_device_run, tiny_models, fashion_mnist_path, tmp_path):
    result = _run_trainer(_trainer_args(tiny_models, fashion_mnist_path, tmp_path)
                          + ["--distributed", "--num_cpu_devices=2"])
    summary = _summary(tmp_path)
    assert summary["distribute"] == {
        "engine": "mirrored", "num_replicas": 2, "num_workers": 1, "global_batch": 32,
        "per_replica_batch": 16, "devices": ["/device:CPU:0", "/device:CPU:1"]}
    assert one_device_run["distribute"]["engine"] == "single"
    _assert_same_training(summary, one_device_run)
    assert "global batch 32 = 2 replicas x 16" in result.stdout


def _start_worker(args, log_path, env):
    log = open(log_path, "w")
    try:
        return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()


def _worker_commands(args, ports, chief_by_tf_config=False):
    """Worker 0 from --worker_hosts/--task_index; worker 1 from TF_CONFIG + --dist_url."""
    hosts = [f"127.0.0.1:{port}" for port in ports]
    first = (args + ["--distributed", f"--worker_hosts={','.join(hosts)}", "--task_index=0"], _env())
    second = (args + ["--distributed", f"--dist_url=tcp://{hosts[0]}"],
              _env(TF_CONFIG=_tf_config({"worker": hosts}, "worker", 1)))
    return [first, second]


def _wait_all(procs, logs, deadline):
    end = time.monotonic() + deadline
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=max(1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker did not finish in {deadline} s:\n{open(log).read()[-3000:]}")


def _kill_all(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _digests(log_path):
    return DIGEST.findall(open(log_path).read())


def test_two_workers_on_localhost_train_to_the_end_and_agree(
        one_device_run, tiny_models, fashion_mnist_path, tmp_path):
    out = tmp_path / "out"
    args = _trainer_args(tiny_models, fashion_mnist_path, out)
    logs = [str(tmp_path / f"worker{i}.log") for i in range(2)]
    procs = []
    try:
        for (cmd, env), log in zip(_worker_commands(args, _free_ports(2)), logs):
            procs.append(_start_worker(cmd, log, env))
        _wait_all(procs, logs, DEADLINE)
    finally:
        _kill_all(procs)
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, open(log).read()[-3000:]
    chief, worker = _digests(logs[0]), _digests(logs[1])
    assert [name for name, _ in chief] == ["tiny_student", "tiny_student"]  # scratch, distilled
    assert chief == worker
    summary = _summary(out)
    assert summary["distribute"]["engine"] == "multi_worker"
    assert (summary["distribute"]["num_workers"], summary["distribute"]["num_replicas"]) == (2, 2)
    _assert_same_training(summary, one_device_run)
    # Only the chief wrote; the other worker's folder is gone after success.
    assert not (out / "workertemp_1").exists()
    assert sorted(os.listdir(out / "logs")) == ["distilled.csv", "scratch.csv", "tensorboard"]


def _backup_epoch(folder):
    """The last epoch (from 0) a BackupAndRestore folder holds, or None."""
    if not compat.KERAS3:  # a TensorFlow checkpoint with the saved epoch in it
        try:
            reader = tf.train.load_checkpoint(os.path.join(folder, "chief"))
            key = next(k for k in reader.get_variable_to_shape_map()
                       if k.startswith("ckpt_saved_epoch"))
            return int(reader.get_tensor(key))
        except (ValueError, StopIteration, tf.errors.OpError):
            return None
    try:
        with open(os.path.join(folder, "training_metadata.json")) as f:
            return json.load(f)["epoch"]
    except (OSError, ValueError, KeyError):
        return None


def test_killed_worker_resumes_through_backup_and_restore(
        tiny_models, fashion_mnist_path, tmp_path):
    out = tmp_path / "out"
    epochs = 6
    args = _trainer_args(tiny_models, fashion_mnist_path, out, epoch=epochs, train_size=128,
                         test_size=64)
    chief_backup = str(out / "backup" / "scratch")
    worker_backup = str(out / "workertemp_1" / "backup" / "scratch")
    procs = []
    try:
        logs = [str(tmp_path / f"first{i}.log") for i in range(2)]
        for (cmd, env), log in zip(_worker_commands(args, _free_ports(2)), logs):
            procs.append(_start_worker(cmd, log, env))
        end = time.monotonic() + DEADLINE
        while True:  # both workers have backed up the same epoch >= 2: kill worker 1
            epoch = _backup_epoch(chief_backup)
            # Keras 2.6 keeps the chief's checkpoint only, which every worker reads.
            worker_saved = not compat.KERAS3 or _backup_epoch(worker_backup) == epoch
            if epoch is not None and epoch >= 2 and worker_saved:
                procs[1].kill()
                break
            assert all(p.poll() is None for p in procs), open(logs[0]).read()[-3000:]
            assert time.monotonic() < end, "no epoch backed up in time"
            time.sleep(0.02)
        killed_at = epoch
        procs[1].wait(timeout=30)
        # The chief cannot go on alone: the coordination service's heartbeats
        # tell it (after ~10-20 s) and it exits with an error; a cluster
        # manager then restarts every worker. Stop it if it is slower.
        try:
            procs[0].wait(timeout=40)
        except subprocess.TimeoutExpired:
            procs[0].kill()
            procs[0].wait(timeout=30)
        assert _backup_epoch(chief_backup) is not None, "the backup must survive the failure"

        logs = [str(tmp_path / f"second{i}.log") for i in range(2)]
        procs = [_start_worker(cmd, log, env)
                 for (cmd, env), log in zip(_worker_commands(args, _free_ports(2)), logs)]
        _wait_all(procs, logs, DEADLINE)
    finally:
        _kill_all(procs)
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, open(log).read()[-3000:]
    second_log = open(logs[0]).read()
    resumed = re.search(r"every worker resumes at epoch (\d+)", second_log)
    assert resumed, second_log[-3000:]
    restored = int(resumed.group(1)) - 1
    assert restored >= killed_at
    # The CSV log: the first run's epochs from 0, then the second run's from
    # the restored epoch on, not from 0 again.
    rows = [int(line.split(",")[0]) for line in open(out / "logs" / "scratch.csv")
            if line[0].isdigit()]
    first = len(rows) - (epochs - restored)
    assert rows[:first] == list(range(first)) and first >= restored - 1, rows
    assert rows[first:] == list(range(restored, epochs)), rows
    assert _digests(logs[0]) == _digests(logs[1])
    # BackupAndRestore removes the backup when the phase ends (Keras 2.6 its checkpoint).
    assert not os.path.exists(chief_backup) if compat.KERAS3 else _backup_epoch(chief_backup) is None


# -- the quantizer under --distributed ------------------------------------------


def _record_values(path):
    """(key, value) pairs of a scale_offset_record.txt, in order."""
    pairs = re.findall(r"^\s*(key|scale_d|offset_d|scale_w|offset_w|dst_type): (.+)$",
                       open(path).read(), re.MULTILINE)
    return [(k, v.strip('"') if k in ("key", "dst_type") else float(v)) for k, v in pairs]


@keras3_only
def test_quantizer_record_under_distributed_matches_one_device(fashion_mnist_path, tmp_path):
    compat.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="conv")(inputs)
    x = keras.layers.ReLU(name="conv_relu")(keras.layers.BatchNormalization(name="conv_bn")(x))
    outputs = keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(x))
    model_path = tmp_path / f"tiny_conv{compat.MODEL_EXT}"
    keras.Model(inputs, outputs, name="tiny_conv").save(model_path)
    runs = {}
    for label, extra in (("one", []), ("two", ["--distributed", "--num_cpu_devices=2"])):
        out = tmp_path / label
        _run_trainer(["-m", "knowledge_distillation.quant", f"--model={model_path}",
                      f"--data_path={fashion_mnist_path}", "--calibration_size=128",
                      "--test_size=100", "--batch_size=32", f"--output_dir={out}", *extra])
        with open(out / "quantize_summary.json") as f:
            runs[label] = (_record_values(out / "tmp" / "scale_offset_record.txt"), json.load(f))
    (one, one_summary), (two, two_summary) = runs["one"], runs["two"]
    assert [k for k, _ in two] == [k for k, _ in one] and len(one) > 10
    for (key, a), (_, b) in zip(one, two):
        if isinstance(a, float):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-6), key
        else:
            assert a == b
    assert two_summary["after"]["top1"] == pytest.approx(one_summary["after"]["top1"], abs=0.01)
    assert [b["kept"] for b in two_summary["blocks"]] == [b["kept"] for b in one_summary["blocks"]]
