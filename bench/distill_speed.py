"""Benchmark 1: distillation with the cached teacher vs the per-step teacher.

The baseline is the keras-io recipe: the Distiller calls the teacher on every
training step. Ours computes the teacher's logits once (`teacher_cache`) and
trains the student from them. Both students start from the same seeded
weights, see the same data order and epochs, and their epochs are interleaved
(baseline epoch 1, ours epoch 1, baseline epoch 2, ...) so load on this
shared machine hits both alike. The teacher is trained once, first (or loaded
with --teacher_model).

Default: the issue's full configuration (seed convnets, Fashion-MNIST, batch
32, Adam 1e-3, alpha 0.1, T 10, teacher 5 epochs, distillation 5 epochs).
Reduced run (a few minutes):

    python bench/distill_speed.py --train_size=4096 --test_size=2000 \
        --teacher_epochs=1 --epochs=2

Prints one JSON line: wall times, `speedup` (baseline / ours, ours including
the one-off teacher pass and cache key hashing), both accuracies.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

common.quiet_tf()

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_path", "/usr/share/datasets/fashion-mnist", "MNIST-format data folder.")
flags.DEFINE_integer("train_size", None, "First N training images (default: all).")
flags.DEFINE_integer("test_size", None, "First N test images (default: all).")
flags.DEFINE_string("teacher", "seed_teacher", "Zoo teacher.")
flags.DEFINE_string("student", "seed_student", "Zoo student.")
flags.DEFINE_string("teacher_model", None, "A trained .keras teacher (skips teacher training).")
flags.DEFINE_integer("teacher_epochs", 5, "Teacher training epochs.")
flags.DEFINE_integer("epochs", 5, "Distillation epochs (both runs).")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("seed", 42, "Seed of weights and shuffling.")
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"], "XLA for our student step.")
flags.DEFINE_string("cache_dir", None, "Teacher cache folder (default: a temporary one).")
flags.DEFINE_integer("steps_per_execution", None,
                     "Keras steps_per_execution of our student step (default: the trainer's "
                     "default on GPU/CPU).")
flags.DEFINE_string("ours_policy", None,
                    "Dtype policy of our teacher pass and student (default: the trainer's "
                    "allow_mix_precision on this CPU: mixed_bfloat16 with bfloat16 "
                    "instructions, else float32); the baseline is float32.")


def _ours_policy():
    from knowledge_distillation.util import cpu

    if FLAGS.ours_policy:
        return FLAGS.ours_policy
    return "float32" if cpu.has_bf16() is False else "mixed_bfloat16"


def _steps_per_execution():
    from knowledge_distillation.config import DEFAULT_STEPS_PER_EXECUTION

    return FLAGS.steps_per_execution or DEFAULT_STEPS_PER_EXECUTION


def _jit():
    return {"auto": "auto", "true": True, "false": False}[FLAGS.jit_compile]


def main(argv):
    import keras
    import numpy as np

    from knowledge_distillation import data as data_lib
    from knowledge_distillation import models
    from knowledge_distillation.kd import teacher_cache
    from knowledge_distillation.kd.distiller import Distiller

    data = data_lib.load_data(FLAGS.data_path, train_size=FLAGS.train_size,
                              test_size=FLAGS.test_size)
    shape, classes, bs = data.input_shape, data.num_classes, FLAGS.batch_size
    x_test = data_lib.preprocess(data.x_test).numpy()

    def train_ds(extra=None):
        return data_lib.make_dataset(data.x_train, data.y_train, bs, shuffle=True,
                                     seed=FLAGS.seed, extra=extra)

    teacher_seconds = None
    if FLAGS.teacher_model:
        teacher = models.load_model(FLAGS.teacher_model, "--teacher_model")
    else:
        teacher = models.build_model(FLAGS.teacher, shape, classes, seed=FLAGS.seed)
        teacher.compile(optimizer=keras.optimizers.Adam(1e-3),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        metrics=["accuracy"])
        start = time.perf_counter()
        teacher.fit(train_ds(), epochs=FLAGS.teacher_epochs, verbose=0)
        teacher_seconds = time.perf_counter() - start
    teacher.trainable = False
    t_logits = teacher.predict(x_test, batch_size=512, verbose=0)
    teacher_acc = float(np.mean(np.argmax(t_logits, -1) == data.y_test))

    def student():
        return models.build_model(FLAGS.student, shape, classes, seed=FLAGS.seed + 1)

    def compile_distiller(d, **kw):
        d.compile(optimizer=keras.optimizers.Adam(1e-3),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  alpha=0.1, temperature=10.0, **kw)
        return d

    base_student = student()
    # Ours runs under the trainer's default precision; the same weights.
    keras.mixed_precision.set_global_policy(_ours_policy())
    our_student = student()
    our_teacher = keras.models.clone_model(teacher)
    our_teacher.set_weights(teacher.get_weights())
    keras.mixed_precision.set_global_policy("float32")
    baseline = compile_distiller(Distiller(teacher=teacher, student=base_student))

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cached = teacher_cache.teacher_outputs(
            our_teacher, data.x_train,
            lambda x: our_teacher.predict(data_lib.preprocess(x), batch_size=512, verbose=0),
            cache_dir=FLAGS.cache_dir or tmp)
        cache_seconds = time.perf_counter() - start
        ours = compile_distiller(
            Distiller(teacher=our_teacher, student=our_student, teacher_outputs_in_data=True),
            jit_compile=_jit(), steps_per_execution=_steps_per_execution())
        our_ds = train_ds(cached.column()).map(cached.lookup)
        base_ds = train_ds()
        # The input pipeline alone (gather, preprocess, teacher rows,
        # prefetch): if it is much faster than a training epoch, the step
        # is the bottleneck, not the data.
        for _ in our_ds:  # first pass warms up the pipeline
            pass
        start = time.perf_counter()
        for _ in our_ds:
            pass
        pipeline_seconds = time.perf_counter() - start
        base_epochs, our_epochs = [], []
        for _ in range(FLAGS.epochs):
            start = time.perf_counter()
            baseline.fit(base_ds, epochs=1, verbose=0)
            base_epochs.append(time.perf_counter() - start)
            start = time.perf_counter()
            ours.fit(our_ds, epochs=1, verbose=0)
            our_epochs.append(time.perf_counter() - start)

    def accuracy(model):
        return float(np.mean(np.argmax(model.predict(x_test, batch_size=512, verbose=0), -1)
                             == data.y_test))

    base_total = sum(base_epochs)
    our_total = sum(our_epochs) + cache_seconds
    common.emit({
        "bench": "distill_speed",
        "config": {"teacher": FLAGS.teacher_model or FLAGS.teacher, "student": FLAGS.student,
                   "train_size": len(data.x_train), "test_size": len(data.x_test),
                   "teacher_epochs": 0 if FLAGS.teacher_model else FLAGS.teacher_epochs,
                   "epochs": FLAGS.epochs, "batch_size": bs, "seed": FLAGS.seed,
                   "jit_compile": FLAGS.jit_compile,
                   "steps_per_execution": _steps_per_execution(),
                   "baseline_policy": "float32", "ours_policy": _ours_policy()},
        "machine": common.machine(),
        "teacher_train_seconds": teacher_seconds,
        "teacher_accuracy": teacher_acc,
        "baseline_seconds": base_total,
        "ours_seconds": our_total,
        "ours_cache_seconds": cache_seconds,
        "ours_key_hash_seconds": cached.hash_seconds,
        "baseline_epoch_seconds": base_epochs,
        "ours_epoch_seconds": our_epochs,
        "speedup": base_total / our_total,
        "pipeline_epoch_seconds": pipeline_seconds,
        "pipeline_over_ours_epoch": pipeline_seconds / min(our_epochs),
        "baseline_accuracy": accuracy(base_student),
        "ours_accuracy": accuracy(our_student),
    })


if __name__ == "__main__":
    app.run(main)
