"""Benchmark 7: the AMCT block-distillation sample, reproduced on this machine.

AMCT's sample quantizes MobileNetV2 (224x224 RGB) by block distillation on a
folder of 160 images and prints the float and fake-quant top-1/top-5. With
no pretrained weights offline, the model here is keras.applications
MobileNetV2 (alpha 1.0, weights=None) trained on Fashion-MNIST: first at
64x64 (`bench/quant_vs_ort.py`'s model, from `--model_cache` or trained now),
then its weights moved to a 224x224 input (the network is fully
convolutional) and fine-tuned there on `--finetune_size` training images
(BatchNorm statistics recalibrated after each training, see
`common.recalibrate_batchnorm`).
The folder holds 160 Fashion-MNIST *test* images as RGB JPEGs at mixed sizes
(160 to 300 pixels) with a `val.txt` label list (`<file> <class>`), as in
ImageNet tooling. Then it runs exactly the README's command,

    python -m knowledge_distillation.quant --model OUT/mobilenet_v2_224.keras \
        --data_path OUT/images --labels_file val.txt --output_dir OUT/quant

and reports the two `[INFO]` lines, the four AMCT files, the seconds per
block and in total (from `quantize_summary.json`), the wall time, the
quantizer's peak memory, and the deploy model's latency in ONNX Runtime at
batch 1 and 32 against the float ONNX export.

    python bench/amct_sample.py --output_dir=output/amct_sample

Prints one JSON line.
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

common.quiet_tf()

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_path", "/usr/share/datasets/fashion-mnist", "MNIST-format data folder.")
flags.DEFINE_string("output_dir", os.path.join("output", "amct_sample"), "Where everything goes.")
flags.DEFINE_string("model_cache", os.path.join("output", "bench_models"),
                    "Folder of the 64x64 model (bench/quant_vs_ort.py's --model_cache).")
flags.DEFINE_integer("train_size", 10000, "Training images of the 64x64 model.")
flags.DEFINE_integer("train_epochs", 2, "Epochs of the 64x64 model.")
flags.DEFINE_integer("finetune_size", 1000, "Training images of the fine-tuning at 224x224.")
flags.DEFINE_integer("image_size", 224, "Input size of the quantized model.")
flags.DEFINE_integer("num_images", 160, "Images in the folder (AMCT's sample: 160).")
flags.DEFINE_list("quant_args", [], "Extra quantizer flags, e.g. --epochs=0.")
flags.DEFINE_boolean("prepare_only", False,
                     "Only make the model and the folder (run in a child process, so the "
                     "quantizer's memory is measured alone).")


def _model_224(data_lib, models, keras):
    from knowledge_distillation.util.files import save_model_atomic

    path = os.path.join(FLAGS.output_dir, f"mobilenet_v2_{FLAGS.image_size}.keras")
    if os.path.exists(path):
        return path, None
    small, data, _ = common.float_model_and_data(
        None, FLAGS.data_path, "mobilenet_v2", FLAGS.train_size, 2000, FLAGS.train_epochs,
        model_cache=FLAGS.model_cache)
    size = FLAGS.image_size
    model = models.build_model("mobilenet_v2", (size, size, 3), data.num_classes, seed=0)
    model.set_weights(small.get_weights())
    view = data_lib.ImageView((size, size), 3, "bilinear", "symmetric")
    # the fine-tuning images follow the 64x64 model's training images
    full = data_lib.load_data(FLAGS.data_path)
    begin = len(data.x_train)
    x, y = full.x_train[begin:begin + FLAGS.finetune_size], full.y_train[begin:begin + FLAGS.finetune_size]
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = time.perf_counter()
    model.fit(data_lib.make_dataset(x, y, 32, shuffle=True, seed=0, view=view), verbose=0)
    common.recalibrate_batchnorm(model, data_lib.make_dataset(x, y, 32, shuffle=True, seed=1,
                                                              view=view), batches=30)
    seconds = time.perf_counter() - start
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    save_model_atomic(model, path, {"preprocessing": "symmetric", "interpolation": "bilinear"})
    return path, seconds


def _image_folder(data_lib, tf):
    """160 test images as RGB JPEGs at mixed sizes, and val.txt."""
    folder = os.path.join(FLAGS.output_dir, "images")
    labels = os.path.join(folder, "val.txt")
    if os.path.exists(labels):
        return folder
    os.makedirs(folder, exist_ok=True)
    data = data_lib.load_data(FLAGS.data_path, test_size=FLAGS.num_images)
    sizes = (160, 224, 256, 300)
    lines = []
    for i, (image, label) in enumerate(zip(data.x_test, data.y_test)):
        size = sizes[i % len(sizes)]
        rgb = tf.image.grayscale_to_rgb(tf.convert_to_tensor(image))
        big = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(rgb, (size, size))), 0, 255),
                      tf.uint8)
        name = f"fmnist_test_{i:03d}.jpg"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(tf.io.encode_jpeg(big, quality=95).numpy())
        lines.append(f"{name} {int(label)}\n")
    with open(labels + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(labels + ".tmp", labels)
    return folder


def _peak_rss_kb(proc):
    """The child's peak resident memory (VmHWM, kB), read while it runs."""
    import threading

    peak = [0]

    def poll():
        path = f"/proc/{proc.pid}/status"
        while proc.poll() is None:
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peak[0] = max(peak[0], int(line.split()[1]))
            except OSError:
                return
            time.sleep(1.0)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return peak


def main(argv):
    import keras
    import numpy as np
    import tensorflow as tf

    from knowledge_distillation import data as data_lib
    from knowledge_distillation import models

    if FLAGS.prepare_only:
        model_path, finetune_seconds = _model_224(data_lib, models, keras)
        _image_folder(data_lib, tf)
        common.emit({"model": model_path, "finetune_seconds": finetune_seconds})
        return
    prepare = subprocess.run([sys.executable, os.path.abspath(__file__), "--prepare_only",
                              *[f"--{name}={FLAGS[name].value}" for name in
                                ("data_path", "output_dir", "model_cache", "train_size",
                                 "train_epochs", "finetune_size", "image_size", "num_images")]],
                             capture_output=True, text=True)
    if prepare.returncode != 0:
        raise SystemExit(f"preparing failed: {prepare.stderr[-2000:]}")
    prepared = json.loads(prepare.stdout.strip().splitlines()[-1])
    model_path, finetune_seconds = prepared["model"], prepared["finetune_seconds"]
    folder = os.path.join(FLAGS.output_dir, "images")
    quant_dir = os.path.join(FLAGS.output_dir, "quant")
    command = [sys.executable, "-m", "knowledge_distillation.quant", "--model", model_path,
               "--data_path", folder, "--labels_file", "val.txt", "--output_dir", quant_dir,
               *FLAGS.quant_args]
    print(" ".join(command), file=sys.stderr)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_kb = _peak_rss_kb(proc)
    stdout, stderr = proc.communicate()
    proc = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    wall = time.perf_counter() - start
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        raise SystemExit(f"the quantizer failed ({proc.returncode}): {proc.stderr[-2000:]}")
    info = [line for line in proc.stdout.splitlines() if line.startswith("[INFO]")]
    summary = json.load(open(os.path.join(quant_dir, "quantize_summary.json")))
    block_seconds = [b["seconds"] for b in summary["blocks"]]
    from knowledge_distillation import quant

    float_path = os.path.join(FLAGS.output_dir, "float.onnx")
    model = models.load_model(model_path)
    size = FLAGS.image_size
    images = np.random.default_rng(0).uniform(-1, 1, (32, size, size, 3)).astype(np.float32)
    model(images[:1])
    quant.save_onnx(quant.build_onnx(model, "float"), float_path)
    latency = common.onnx_latency({"float": float_path, "deploy": summary["paths"]["deploy_model"]},
                                  images, seconds=2.0, rounds=3)
    files = {key: os.path.getsize(summary["paths"][key]) for key in
             ("config", "record", "fake_quant_model", "deploy_model")}
    common.emit({
        "bench": "amct_sample",
        "machine": common.machine(),
        "model": model_path,
        "finetune_seconds": finetune_seconds,
        "command": " ".join(command[1:]),
        "info_lines": info,
        "files_bytes": files,
        "before": summary["before"], "after": summary["after"], "deploy": summary["deploy"],
        "deploy_format": summary["deploy_format"],
        "blocks": len(block_seconds),
        "block_seconds_mean": sum(block_seconds) / len(block_seconds),
        "block_seconds_max": max(block_seconds),
        "distill_seconds": summary["distill_seconds"],
        "quantize_seconds": summary["seconds"],
        "wall_seconds": wall,
        "peak_rss_mb": peak_kb[0] / 1024.0,
        "latency": latency,
    })


if __name__ == "__main__":
    app.run(main)
