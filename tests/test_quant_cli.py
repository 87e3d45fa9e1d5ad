"""`python -m knowledge_distillation.quant` on a small model and real data."""

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import keras
import pytest
from keras import layers

from knowledge_distillation.data import load_data, make_dataset

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "knowledge_distillation.quant", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def model_path(fashion_mnist_path, tmp_path_factory):
    data = load_data(fashion_mnist_path, train_size=2048, test_size=10)
    keras.utils.set_random_seed(0)
    inputs = keras.Input(data.input_shape)
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="conv")(inputs)
    x = layers.BatchNormalization(name="conv_bn")(x)
    x = layers.ReLU(name="conv_relu")(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(data.num_classes, name="logits")(x)
    model = keras.Model(inputs, outputs, name="tiny")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(make_dataset(data.x_train, data.y_train, 64, shuffle=True, seed=0), verbose=0)
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    model.save(path)
    return str(path)


def test_cli_writes_every_output_and_prints_both_lines(model_path, fashion_mnist_path, tmp_path):
    config = tmp_path / "simple.cfg"
    config.write_text("batch_num: 2\n"
                      "distill_weight_quant_config { arq_distill { dst_type: INT8 } }\n")
    out = tmp_path / "out"
    proc = _run(["--model", model_path, "--data_path", fashion_mnist_path,
                 "--config_defination", str(config), "--calibration_size", "128",
                 "--test_size", "300", "--batch_size", "32", "--num_parallel_reads", "2",
                 "--output_dir", str(out), "--distributed",
                 "--deploy_format", "integer", "--deploy_activation_dtype", "uint8"],
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    before = [l for l in lines if l.startswith("[INFO] tiny before quantize top1:")]
    after = [l for l in lines if l.startswith("[INFO] tiny after quantize  top1:")]
    assert len(before) == 1 and len(after) == 1 and " top5:" in after[0]
    for name in ("tmp/distill_config.json", "tmp/scale_offset_record.txt",
                 "result/tiny_fake_quant_model.onnx", "result/tiny_deploy_model.onnx",
                 "amct_log/quantize.log", "quantize_summary.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "quantize_summary.json").read_text())
    assert summary["config"]["batch_size"] == 32 and summary["test_size"] == 300
    assert float(after[0].split("top1:")[1].split()[0]) == summary["after"]["top1"]
    assert summary["after"]["top1"] >= summary["before"]["top1"] - 0.02
    assert summary["deploy_activation_dtype"] == "uint8"
    assert summary["config"]["deploy_activation_dtype"] == "uint8"
    assert summary["deploy_format"] == "integer" and summary["float_layers"] == []
    # batch_num 2 at batch 32: 64 of the 128 calibration images set the ranges.
    assert (summary["batch_num"], summary["calibration_range_images"]) == (2, 64)
    assert ("activation ranges: min/max of the first 64 of the 128 calibration images "
            "(batch_num 2 x batch_size 32)") in proc.stdout
    assert "deploy model (integer, uint8 activations) written to" in proc.stdout
    # One CPU device: --distributed is a logged one-replica run (see the distribute package).
    assert "--distributed with a single device: running one replica" in proc.stdout


@pytest.mark.parametrize("args, code, message", [
    ([], 2, "--model is required"),
    (["--model", "missing.keras"], 1, "--model: missing.keras does not exist"),
    (["--model", "{model}", "--config_defination", "{bad}"], 1, "bad.cfg:1:1 : .*no field named"),
    (["--model", "{model}", "--batch_size", "0"], 2, "--batch_size must be positive"),
    (["--model", "{model}", "--deploy_activation_dtype", "int4"], 2,
     "error: flag --deploy_activation_dtype=int4: value should be one of <auto|int8|uint8>"),
    (["--model", "{model}", "--deploy_format", "tensorrt"], 2,
     "error: flag --deploy_format=tensorrt: value should be one of <auto|qdq|integer>"),
])
def test_cli_errors(model_path, tmp_path, args, code, message):
    bad = tmp_path / "bad.cfg"
    bad.write_text("group_sise: 2\n")
    args = [a.format(model=model_path, bad=bad) for a in args]
    proc = _run(args + ["--output_dir", str(tmp_path / "out")], cwd=tmp_path)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert re.search(message, proc.stderr), proc.stderr[-2000:]


def _set_digests(out):
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_killed_quantizer_leaves_the_earlier_complete_set(model_path, fashion_mnist_path, tmp_path):
    out = tmp_path / "out"
    args = ["--model", model_path, "--data_path", fashion_mnist_path, "--calibration_size", "128",
            "--test_size", "200", "--output_dir", str(out)]
    first = _run(args + ["--epochs", "0"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    earlier = _set_digests(out)
    assert "quantize_summary.json" in earlier and "tmp/distill_config.json" in earlier
    for name in earlier:
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o666 & ~_umask(), name
    int4 = tmp_path / "int4.cfg"
    int4.write_text("distill_weight_quant_config { arq_distill { dst_type: INT4 } }\n")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "knowledge_distillation.quant", *args, "--epochs", "50",
         "--config_defination", str(int4)], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        # Killed mid-distillation: the new INT4 config is written, nothing else yet.
        while time.time() < deadline and not list(out.glob(".staging-*/tmp/distill_config.json")):
            time.sleep(0.1)
        assert list(out.glob(".staging-*/tmp/distill_config.json")), "never started"
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = {k: v for k, v in _set_digests(out).items() if not k.startswith(".staging-")}
    assert left == earlier
    # The next run clears the dead run's staging folder and replaces the set whole.
    again = _run(args + ["--epochs", "0", "--config_defination", str(int4)], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list(out.glob(".staging-*")) and not list(out.glob(".previous-*"))
    assert '"INT4"' in (out / "tmp" / "distill_config.json").read_text()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("args, message", [
    (["--name", "../../x"], "--name='../../x': expected a file-name stem"),
    (["--model", "{folder}"], "--model: {folder} is a folder"),
    (["--model", "{corrupt}"], "is not a .keras archive (not a zip file"),
    (["--model", "{two_inputs}"], "has 2 inputs and 1 outputs; the quantizer takes a model with one"),
    (["--output_dir", "{file}"], "--output_dir={file} is a file"),
])
def test_bad_quantizer_input_is_found_before_quantizing(model_path, tmp_path, args, message):
    folder, corrupt, file = tmp_path / "folder", tmp_path / "corrupt.keras", tmp_path / "file"
    folder.mkdir()
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    file.write_text("x")
    a, b = keras.Input((28, 28, 1)), keras.Input((28, 28, 1))
    two = keras.Model([a, b], layers.Dense(10)(layers.Flatten()(layers.Add()([a, b]))))
    two.save(tmp_path / "two.keras")
    names = {"folder": folder, "corrupt": corrupt, "file": file, "two_inputs": tmp_path / "two.keras"}
    args = [x.format(**names) for x in args]
    if "--model" not in args:
        args = ["--model", model_path] + args
    if "--output_dir" not in args:
        args += ["--output_dir", str(tmp_path / "out")]
    proc = _run(args + ["--test_size", "50", "--calibration_size", "64"], cwd=tmp_path)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert message.format(**names) in errors[0]
    assert "after quantize" not in proc.stdout
