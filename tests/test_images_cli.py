"""The trainer and the quantizer on image folders, end to end, through their command lines."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from knowledge_distillation import compat, models
from knowledge_distillation.util.files import read_model_metadata

from conftest import REPO_ROOT, keras3_only
from image_helpers import encode, resized, write_class_folders

FAST = ["--precision_mode=must_keep_origin_dtype", "--batch_size=32", "--log_steps=4",
        "--teacher=seed_teacher", "--student=seed_student"]


def _run(args, module="knowledge_distillation", timeout=600):
    return subprocess.run([sys.executable, "-m", module] + args, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result.log = result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def folder(tmp_path_factory, small_data):
    root = tmp_path_factory.mktemp("folder")
    written = write_class_folders(
        str(root), [("train", small_data.x_train[:256], small_data.y_train[:256]),
                    ("val", small_data.x_test[:96], small_data.y_test[:96])],
        sizes=(28, 40, 56), formats=("png", "bmp", "png", "gif"))
    return root, written


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    root, _ = folder
    out = tmp_path_factory.mktemp("run")
    result = _ok(_run(FAST + [f"--data_path={root}", "--image_size=32,32", "--epoch=2",
                              "--preprocessing=symmetric", f"--output_dir={out}"]))
    return out, result


def test_class_folders_train_end_to_end_at_the_given_size(trained):
    out, result = trained
    summary = json.loads((out / "summary.json").read_text())
    data = summary["data"]
    assert data["input_shape"] == [32, 32, 3] and data["source"] == "image files"
    assert data["preprocessing"] == "symmetric" and data["num_classes"] == 10
    assert data["class_names"] == [f"class_{i}" for i in range(10)]
    assert data["train_examples"] == 256 and data["test_examples"] == 96
    assert summary["teacher"]["accuracy"] > 0.3  # chance is 0.1
    assert "streamed from image files" in result.log
    meta = read_model_metadata(str(out / f"distilled{compat.MODEL_EXT}"))
    assert meta["preprocessing"] == "symmetric" and meta["input_shape"] == [32, 32, 3]
    assert meta["class_names"][3] == "class_3"


@keras3_only
def test_a_flat_folder_with_a_label_list_quantizes_with_the_models_own_preprocessing(
        trained, folder, tmp_path):
    out, _ = trained
    _, written = folder
    flat = tmp_path / "images"
    flat.mkdir()
    lines = []
    for i, (path, label, _, _) in enumerate(written["val"]):
        name = f"{i:04d}{os.path.splitext(path)[1]}"
        os.link(path, flat / name)
        lines.append(f"{name} {label}")
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    model = str(out / f"distilled{compat.MODEL_EXT}")
    result = _ok(_run([f"--model={model}", f"--data_path={flat}",
                       f"--labels_file={tmp_path / 'val.txt'}", "--calibration_size=64",
                       f"--output_dir={tmp_path / 'q'}"], "knowledge_distillation.quant"))
    info = [line for line in result.stdout.splitlines() if line.startswith("[INFO]")]
    assert len(info) == 2 and "before quantize top1:" in info[0] and "top5:" in info[1]
    assert "preprocessing: symmetric (from the model file)" in result.log
    assert "not held-out" in result.log
    summary = json.loads((tmp_path / "q" / "quantize_summary.json").read_text())
    trainer = json.loads((out / "summary.json").read_text())
    # The same 96 images through the same view: the float model scores what the trainer measured.
    assert summary["before"]["top1"] == pytest.approx(trainer["distilled"]["accuracy"], abs=1e-6)
    assert summary["view"]["image_size"] == [32, 32]
    for name in ("tmp/distill_config.json", "tmp/scale_offset_record.txt"):
        assert (tmp_path / "q" / name).is_file()
    assert len(list((tmp_path / "q" / "result").glob("*.onnx"))) == 2


@keras3_only
def test_unlabelled_images_calibrate_and_no_accuracy_is_claimed(trained, folder, tmp_path):
    out, written = trained[0], folder[1]
    flat = tmp_path / "unlabelled"
    flat.mkdir()
    for i, (path, _, _, _) in enumerate(written["val"][:40]):
        os.link(path, flat / f"{i}{os.path.splitext(path)[1]}")
    result = _ok(_run([f"--model={out / f'distilled{compat.MODEL_EXT}'}", f"--data_path={flat}",
                       "--calibration_size=32", "--epochs=0", f"--output_dir={tmp_path / 'q'}"],
                      "knowledge_distillation.quant"))
    assert "top1: n/a top5: n/a (the images have no labels)" in result.stdout
    summary = json.loads((tmp_path / "q" / "quantize_summary.json").read_text())
    assert summary["labelled"] is False and summary["before"]["top1"] is None
    assert summary["vs_float"]["argmax_agreement"] > 0.9


def test_a_corrupt_image_stops_training_with_one_line_naming_it(folder, tmp_path, small_data):
    root = tmp_path / "bad"
    write_class_folders(str(root), [("train", small_data.x_train[:40], small_data.y_train[:40]),
                                    ("test", small_data.x_test[:8], small_data.y_test[:8])])
    victim = sorted((root / "train").rglob("*.png"))[5]
    good = encode(resized(small_data.x_train[0], (28, 28)), "png")
    victim.write_bytes(good[:50] + b"\0" * 30)
    result = _run(FAST + [f"--data_path={root}", "--image_size=28,28", "--epoch=1",
                          f"--output_dir={tmp_path / 'out'}"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(victim) in errors[0] and "cannot be decoded" in errors[0]


def test_a_teacher_at_its_own_resolution_per_step_and_cached(folder, tmp_path):
    """A keras.applications teacher at 48x48 teaches a 32x32 student: per step and cached."""
    root, _ = folder
    teacher_path = str(tmp_path / f"mobilenet{compat.MODEL_EXT}")
    models.build_model("mobilenet_v2", (48, 48, 3), 10, seed=0, alpha_width=0.35).save(
        teacher_path)
    common = ["--precision_mode=must_keep_origin_dtype", "--batch_size=32", "--student=seed_student",
              f"--teacher_model={teacher_path}", f"--data_path={root}", "--image_size=32,32",
              "--epoch=1", "--max_steps=3", "--train_size=96", "--test_size=32"]
    wrong = _run(common + [f"--output_dir={tmp_path / 'w'}"])
    assert wrong.returncode != 0
    assert "model input shape (48, 48, 3) does not match the data's (32, 32, 3); resize the " \
           "images to the model's with --teacher_image_size 48,48" in wrong.stderr
    common.append("--teacher_image_size=48,48")
    per_step = _ok(_run(common + ["--nocache_teacher", f"--output_dir={tmp_path / 'a'}"]))
    assert "own copy of each batch at (48, 48, 3)" in per_step.log
    cached = _ok(_run(common + [f"--output_dir={tmp_path / 'b'}", "--cache_images=memory"]))
    assert "teacher logits are computed once" in cached.log
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["data"]["teacher_input_shape"] == [48, 48, 3]
    assert summary["data"]["input_shape"] == [32, 32, 3]
    # Same teacher signal both ways: logits cached from the files at 48x48 line up with
    # the per-step teacher's 48x48 copy of each batch, so the distilled students agree.
    first = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["teacher"]["accuracy"] == first["teacher"]["accuracy"]
    assert summary["distilled"]["loss"] == pytest.approx(first["distilled"]["loss"], abs=1e-4)
    assert summary["distilled"]["accuracy"] == first["distilled"]["accuracy"]
    key = json.loads((tmp_path / "b" / "teacher_cache" / "teacher_logits.key.json").read_text())
    assert "files" in key["images"] and '"image_size": [48, 48]' in key["preprocessing"]


@pytest.mark.parametrize("name", sorted(models.APPLICATIONS))
def test_keras_applications_build_untrained_with_logits(name):
    if name == "convnext_tiny" and not hasattr(models.keras.applications, "ConvNeXtTiny"):
        with pytest.raises(ValueError, match="ConvNeXtTiny is not in"):
            models.build_model(name, (32, 32, 3), 7)
        return
    model = models.build_model(name, (32, 32, 3), 7, seed=1, alpha_width=0.5)
    assert model.output_shape == (None, 7)
    assert getattr(model.layers[-1], "activation", None) in (None, models.keras.activations.linear)
    out = model(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32))
    assert not np.allclose(np.sum(out, -1), 1.0)  # logits, not probabilities
    with pytest.raises(ValueError, match="too small.*--image_size"):
        models.build_model(name, (28, 28, 1), 7)
