"""Benchmark 6: the image-folder pipeline: throughput against the training step, and memory.

1. Throughput. Writes `--num_images` JPEGs at `--source_size` (Fashion-MNIST
   pictures upscaled to RGB, ten class folders), then times, in the same
   process and interleaved round by round:
   - the streaming pipeline alone (`data.make_dataset` over the files:
     read, decode, resize to `--image_size` with bilinear, scale), images/s;
   - the training step it feeds (`--model` at `--image_size`, batch
     `--batch_size`, float32, on one batch already in memory), images/s.
   The ratio pipeline/step above 1 means the pipeline keeps up.
2. Peak memory. Writes `--memory_images` JPEGs at `--memory_size` and runs
   the trainer on them three times, each in a fresh process whose peak RSS
   (`VmHWM`) it reads at exit: on a folder of `--empty_images` images
   (the "empty" baseline: the same program with almost no data), on the full
   folder streamed, and on the full folder with `--cache_images=memory`.
   It prints each peak and the differences from the baseline.

Full run (the issue's figures):

    python bench/image_pipeline.py

Reduced run:

    python bench/image_pipeline.py --num_images=512 --memory_images=5000 --rounds=2

Prints one JSON line.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

common.quiet_tf()

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_path", "/usr/share/datasets/fashion-mnist", "MNIST-format data folder.")
flags.DEFINE_integer("num_images", 2048, "JPEGs written for the throughput test.")
flags.DEFINE_integer("source_size", 256, "Their height and width.")
flags.DEFINE_list("image_size", ["224", "224"], "H,W the pipeline resizes to.")
flags.DEFINE_string("model", "mobilenet_v2", "Zoo model whose training step the pipeline feeds.")
flags.DEFINE_float("alpha_width", 0.35, "Its width multiplier (MobileNets).")
flags.DEFINE_integer("batch_size", 32, "Examples per batch.")
flags.DEFINE_integer("steps", 8, "Timed batches per variant and round.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
flags.DEFINE_integer("memory_images", 50000, "JPEGs written for the memory test.")
flags.DEFINE_integer("memory_size", 64, "Their height and width.")
flags.DEFINE_integer("empty_images", 320, "Images of the baseline ('empty') run.")
flags.DEFINE_integer("memory_steps", 200, "Training steps of each memory run (--max_steps).")
flags.DEFINE_string("work_dir", None, "Where the folders go (default: a temporary folder).")
flags.DEFINE_boolean("keep", False, "Keep the generated folders.")


def write_folder(root, count, size, data):
    """`root/train/class_k/*.jpg` (count images) and a 10% `root/test/`, from Fashion-MNIST."""
    import numpy as np
    import tensorflow as tf

    for split, n in (("train", count), ("test", max(10, count // 10))):
        x = data.x_train if split == "train" else data.x_test
        y = data.y_train if split == "train" else data.y_test
        for start in range(0, n, 512):
            index = np.arange(start, min(n, start + 512)) % len(x)
            batch = tf.image.resize(tf.image.grayscale_to_rgb(tf.constant(x[index])), (size, size))
            batch = tf.cast(tf.clip_by_value(tf.round(batch), 0, 255), tf.uint8).numpy()
            for j, (i, image) in enumerate(zip(index, batch)):
                folder = os.path.join(root, split, f"class_{int(y[i])}")
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, f"{start + j:06d}.jpg"), "wb") as f:
                    f.write(tf.io.encode_jpeg(image, quality=90).numpy())


def throughput(root):
    import tensorflow as tf

    from knowledge_distillation import data as data_lib
    from knowledge_distillation import models
    from knowledge_distillation.compat import keras

    size = tuple(int(v) for v in FLAGS.image_size)
    data = data_lib.load_data(root)
    view = data_lib.ImageView(size, 3)
    pipeline = data_lib.make_dataset(data.x_train, data.y_train, FLAGS.batch_size, shuffle=True,
                                     seed=0, view=view, drop_remainder=True).repeat()
    batches = iter(pipeline)
    model = models.build_model(FLAGS.model, size + (3,), data.num_classes, seed=0,
                               alpha_width=FLAGS.alpha_width)
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = next(batches)
    step_data = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(step_data, steps_per_epoch=2, epochs=1, verbose=0)  # trace
    for _ in range(2):
        next(batches)  # warm the pipeline's threads
    pipe_rates, step_rates = [], []
    for _ in range(FLAGS.rounds):
        start = time.perf_counter()
        for _ in range(FLAGS.steps):
            images, _ = next(batches)
            images.numpy()
        pipe_rates.append(FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start))
        start = time.perf_counter()
        model.fit(step_data, steps_per_epoch=FLAGS.steps, epochs=1, verbose=0)
        step_rates.append(FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start))
    pipe, step = statistics.median(pipe_rates), statistics.median(step_rates)
    return {"pipeline_images_per_sec": pipe, "train_step_images_per_sec": step,
            "pipeline_over_step": pipe / step, "rounds_pipeline": pipe_rates,
            "rounds_step": step_rates, "image_size": list(size),
            "model": f"{FLAGS.model} (alpha {FLAGS.alpha_width})",
            "source_size": FLAGS.source_size, "num_images": FLAGS.num_images}


# Runs the trainer's command line and prints the process's peak resident set
# (VmHWM) at exit. Read inside the process: a forked child's ru_maxrss would
# count the parent's pages from before its exec.
_PEAK_WRAPPER = """
import atexit, sys
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("PEAK_RSS_KB " + line.split()[1] + "\\n")
atexit.register(report)
from knowledge_distillation.cli import main
sys.exit(main(["knowledge_distillation"] + sys.argv[1:]))
"""


def peak_rss_mb(args, out):
    """Runs the trainer in a fresh process; its peak resident memory in MB (VmHWM)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-c", _PEAK_WRAPPER, f"--output_dir={out}", "--epoch=1",
           "--precision_mode=must_keep_origin_dtype", "--teacher=mlp_teacher",
           "--student=mlp_student", f"--max_steps={FLAGS.memory_steps}", "--overwrite",
           f"--image_size={FLAGS.memory_size},{FLAGS.memory_size}"] + args
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed ({proc.returncode}): {proc.stderr[-2000:]}")
    peaks = [int(line.split()[1]) for line in proc.stderr.splitlines()
             if line.startswith("PEAK_RSS_KB ")]
    return peaks[-1] / 1024.0, time.perf_counter() - start


def main(_):
    from knowledge_distillation import data as data_lib

    work = FLAGS.work_dir or tempfile.mkdtemp(prefix="image_pipeline-")
    source = data_lib.load_data(FLAGS.data_path)
    result = {"machine": None}
    try:
        folder = os.path.join(work, f"jpeg{FLAGS.source_size}")
        if not os.path.isdir(folder):
            print(f"writing {FLAGS.num_images} JPEGs at {FLAGS.source_size}px", file=sys.stderr)
            write_folder(folder, FLAGS.num_images, FLAGS.source_size, source)
        result["throughput"] = throughput(folder)
        runs = {}
        for name, count in (("empty", FLAGS.empty_images), ("full", FLAGS.memory_images)):
            path = os.path.join(work, f"{name}{FLAGS.memory_size}")
            if not os.path.isdir(path):
                print(f"writing {count} JPEGs at {FLAGS.memory_size}px", file=sys.stderr)
                write_folder(path, count, FLAGS.memory_size, source)
            runs[name] = path
        memory = {}
        for label, path, extra in (("empty", runs["empty"], []),
                                   ("streamed", runs["full"], []),
                                   ("in_memory", runs["full"], ["--cache_images=memory"])):
            peak, seconds = peak_rss_mb([f"--data_path={path}"] + extra,
                                        os.path.join(work, f"out_{label}"))
            memory[f"{label}_peak_rss_mb"] = peak
            memory[f"{label}_seconds"] = seconds
            print(f"{label}: peak RSS {peak:.0f} MB in {seconds:.0f} s", file=sys.stderr)
        memory["streamed_minus_empty_mb"] = memory["streamed_peak_rss_mb"] - memory["empty_peak_rss_mb"]
        memory["in_memory_minus_empty_mb"] = (memory["in_memory_peak_rss_mb"]
                                              - memory["empty_peak_rss_mb"])
        memory.update({"images": FLAGS.memory_images, "size": FLAGS.memory_size,
                       "channels": 3, "steps": FLAGS.memory_steps,
                       "pixels_mb": FLAGS.memory_images * FLAGS.memory_size ** 2 * 3 / 1e6})
        result["memory"] = memory
    finally:
        if not FLAGS.keep and not FLAGS.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"] = common.machine()
    common.emit(result)


if __name__ == "__main__":
    app.run(main)
