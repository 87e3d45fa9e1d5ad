"""`python -m knowledge_distillation.quant` on a small model and real data."""

import json
import os
import re
import subprocess
import sys

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
                 "--deploy_activation_dtype", "uint8"], cwd=tmp_path)
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
    # batch_num 2 at batch 32: 64 of the 128 calibration images set the ranges.
    assert (summary["batch_num"], summary["calibration_range_images"]) == (2, 64)
    assert ("activation ranges: min/max of the first 64 of the 128 calibration images "
            "(batch_num 2 x batch_size 32)") in proc.stdout
    assert "deploy model (uint8 activations) written to" in proc.stdout
    # One CPU device: --distributed is a logged one-replica run (see the distribute package).
    assert "--distributed with a single device: running one replica" in proc.stdout


@pytest.mark.parametrize("args, code, message", [
    ([], 2, "--model is required"),
    (["--model", "missing.keras"], 1, "--model: missing.keras does not exist"),
    (["--model", "{model}", "--config_defination", "{bad}"], 1, "bad.cfg:1:1 : .*no field named"),
    (["--model", "{model}", "--batch_size", "0"], 2, "--batch_size must be positive"),
    (["--model", "{model}", "--deploy_activation_dtype", "int4"], 2,
     "error: flag --deploy_activation_dtype=int4: value should be one of <auto|int8|uint8>"),
])
def test_cli_errors(model_path, tmp_path, args, code, message):
    bad = tmp_path / "bad.cfg"
    bad.write_text("group_sise: 2\n")
    args = [a.format(model=model_path, bad=bad) for a in args]
    proc = _run(args + ["--output_dir", str(tmp_path / "out")], cwd=tmp_path)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
