"""A model trained on the Ascend stack (TensorFlow 2.6.5 + Keras 2.6) is quantized on Keras 3.

Needs the Ascend stack's interpreter, which `bash setup.sh --stack tf265`
(or `--stack all`, as `.ci/run` does) puts in `.venv-tf265`.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from knowledge_distillation import compat, models
from knowledge_distillation.data import load_data, preprocess

from conftest import REPO_ROOT

TF265_PYTHON = os.path.join(REPO_ROOT, ".venv-tf265", "bin", "python")

pytestmark = pytest.mark.skipif(
    not os.access(TF265_PYTHON, os.X_OK),
    reason="no .venv-tf265: run bash setup.sh --stack tf265")


def _run(python, module, args, timeout=400):
    result = subprocess.run([python, "-m", module, *args], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_keras3_reads_and_quantizes_the_teacher_the_keras2_trainer_wrote(
        tmp_path, fashion_mnist_path):
    out = tmp_path / "ascend_run"
    _run(TF265_PYTHON, "knowledge_distillation",
         [f"--data_path={fashion_mnist_path}", "--train_size=512", "--test_size=256",
          "--epoch=1", "--teacher_epoch=2", "--teacher=mlp_teacher", f"--output_dir={out}"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stack"]["keras"].startswith("2.6")
    teacher_file = out / "teacher.h5"
    assert teacher_file.is_file() and not (out / "teacher.keras").exists()

    # The same function on Keras 3: the 2.6 trainer's test accuracy, recomputed.
    teacher = models.load_model(str(teacher_file), "--model")
    data = load_data(fashion_mnist_path, train_size=512, test_size=256)
    logits = compat.to_numpy(teacher(preprocess(data.x_test), training=False))
    accuracy = float(np.mean(logits.argmax(-1) == data.y_test))
    assert accuracy == pytest.approx(summary["teacher"]["accuracy"], abs=1e-6)
    assert accuracy > 0.5

    quant = tmp_path / "quant"
    result = _run(sys.executable, "knowledge_distillation.quant",
                  [f"--model={teacher_file}", f"--data_path={fashion_mnist_path}",
                   "--test_size=256", "--calibration_size=256", f"--output_dir={quant}"])
    assert "[INFO] mlp_teacher before quantize top1:" in result.stdout
    quantized = json.loads((quant / "quantize_summary.json").read_text())
    assert quantized["before"]["top1"] == pytest.approx(accuracy, abs=5e-5)  # kept to 4 digits
    assert abs(quantized["after"]["top1"] - accuracy) <= 0.02
    for path in ("tmp/distill_config.json", "tmp/scale_offset_record.txt",
                 "result/mlp_teacher_fake_quant_model.onnx", "result/mlp_teacher_deploy_model.onnx"):
        assert (quant / path).is_file(), path



MIXED_MODEL = """
import sys
import numpy as np
import tensorflow as tf
keras = tf.keras
keras.mixed_precision.set_global_policy("mixed_float16")
tf.random.set_seed(0)
model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                          keras.layers.BatchNormalization(), keras.layers.Dense(3, dtype="float32")])
model.save(sys.argv[1], include_optimizer=False)
x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)
np.save(sys.argv[2], model(x, training=False).numpy())
"""


def test_keras3_loads_a_mixed_precision_h5_from_keras2(tmp_path):
    # The file a Keras 2.6 GPU host writes: its layers' dtypes are "Policy" objects.
    path, outputs = tmp_path / "mixed.h5", tmp_path / "outputs.npy"
    result = subprocess.run([TF265_PYTHON, "-c", MIXED_MODEL, str(path), str(outputs)],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    model = models.load_model(str(path), "--teacher_model")
    assert [layer.dtype_policy.name for layer in model.layers] == [
        "mixed_float16", "mixed_float16", "float32"]
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)
    np.testing.assert_allclose(compat.to_numpy(model(x, training=False)), np.load(outputs),
                               rtol=1e-3, atol=1e-3)
