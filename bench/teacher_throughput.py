"""Benchmark 2: teacher training throughput as a fraction of the matmul peak.

The peak is this machine's float32 matmul (NumPy, 2048^3, best of 3),
measured in the same run before, between and after the training variants;
the highest reading is the peak. The FLOPs of one training step are counted
analytically from the layer shapes: for each Conv2D / DepthwiseConv2D /
Dense, the forward product (2 * MACs), the weight gradient (same count) and
the input gradient (same count, except for the first layer, whose input needs
no gradient). Elementwise work (BatchNorm, activations, pooling, the
optimizer) is not counted, so the fraction is a slight underestimate.

Variants (batch size x dtype policy x XLA) run interleaved, round after
round; each figure is the median over rounds. Thread settings apply to the
whole process (TensorFlow fixes them at start-up): run the script once per
setting with --intra_op/--inter_op.

Full run (the issue's seed teacher):

    python bench/teacher_throughput.py
Reduced run:

    python bench/teacher_throughput.py --steps=20 --rounds=2 --batch_sizes=32,256

Prints one JSON line.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

common.quiet_tf()

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_path", "/usr/share/datasets/fashion-mnist", "MNIST-format data folder.")
flags.DEFINE_string("teacher", "seed_teacher", "Zoo teacher.")
flags.DEFINE_list("batch_sizes", ["32", "128", "256"], "Batch sizes to try.")
flags.DEFINE_list("policies", ["float32", "mixed_bfloat16"], "Keras dtype policies to try.")
flags.DEFINE_list("jit_compile", ["false", "true"], "XLA settings to try.")
flags.DEFINE_integer("steps", 50, "Timed training steps per variant and round.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
flags.DEFINE_integer("intra_op", 0, "TensorFlow intra-op threads (0: TF default).")
flags.DEFINE_integer("inter_op", 0, "TensorFlow inter-op threads (0: TF default).")


def conv_dense_train_flops(model):
    """(forward FLOPs per example, training-step FLOPs per example)."""
    import keras

    forward = train = 0
    first = True
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            out = layer.output.shape  # (None, H, W, C)
            kh, kw = layer.kernel_size
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                macs = out[1] * out[2] * out[3] * kh * kw
            else:
                cin = layer.input.shape[-1] // layer.groups
                macs = out[1] * out[2] * out[3] * kh * kw * cin
        elif isinstance(layer, keras.layers.Dense):
            lead = 1
            for d in layer.input.shape[1:-1]:
                lead *= d
            macs = lead * layer.input.shape[-1] * layer.units
        else:
            continue
        f = 2 * macs
        forward += f
        train += f * (2 if first else 3)
        first = False
    return forward, train


def main(argv):
    import tensorflow as tf

    if FLAGS.intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op)
    if FLAGS.inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op)
    import keras
    import numpy as np

    from knowledge_distillation import data as data_lib
    from knowledge_distillation import models

    peaks = [common.matmul_gflops()]
    data = data_lib.load_data(FLAGS.data_path, train_size=8192, test_size=16)

    variants = []
    for bs in (int(b) for b in FLAGS.batch_sizes):
        for policy in FLAGS.policies:
            for jit in FLAGS.jit_compile:
                keras.mixed_precision.set_global_policy(policy)
                model = models.build_model(FLAGS.teacher, data.input_shape, data.num_classes, seed=0)
                keras.mixed_precision.set_global_policy("float32")
                model.compile(optimizer=keras.optimizers.Adam(1e-3),
                              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                              jit_compile=jit == "true")
                ds = data_lib.make_dataset(data.x_train, data.y_train, bs, shuffle=True, seed=0,
                                           drop_remainder=True).repeat()
                model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace, warm up
                variants.append({"batch_size": bs, "policy": policy, "jit_compile": jit == "true",
                                 "model": model, "ds": ds, "seconds": []})
    forward_flops, train_flops = conv_dense_train_flops(variants[0]["model"])

    for r in range(FLAGS.rounds):
        for v in variants:
            start = time.perf_counter()
            v["model"].fit(v["ds"], steps_per_epoch=FLAGS.steps, epochs=1, verbose=0)
            v["seconds"].append(time.perf_counter() - start)
        peaks.append(common.matmul_gflops())
    peak = max(peaks)

    rows = []
    for v in variants:
        seconds = statistics.median(v["seconds"])
        examples_per_sec = FLAGS.steps * v["batch_size"] / seconds
        gflops = examples_per_sec * train_flops / 1e9
        rows.append({"batch_size": v["batch_size"], "policy": v["policy"],
                     "jit_compile": v["jit_compile"], "examples_per_sec": examples_per_sec,
                     "gflops": gflops, "fraction_of_peak": gflops / peak})
    best = max(rows, key=lambda row: row["fraction_of_peak"])
    reference = next((row for row in rows if row["batch_size"] == 32
                      and row["policy"] == "float32" and not row["jit_compile"]), rows[0])
    common.emit({
        "bench": "teacher_throughput",
        "config": {"teacher": FLAGS.teacher, "steps": FLAGS.steps, "rounds": FLAGS.rounds,
                   "intra_op": FLAGS.intra_op, "inter_op": FLAGS.inter_op},
        "machine": common.machine(),
        "forward_mflops_per_example": forward_flops / 1e6,
        "train_mflops_per_example": train_flops / 1e6,
        "matmul_peak_gflops": peak,
        "matmul_peak_readings": peaks,
        "variants": rows,
        "keras_io_setting": reference,
        "best": best,
        "best_over_keras_io_setting": best["examples_per_sec"] / reference["examples_per_sec"],
    })


if __name__ == "__main__":
    app.run(main)
