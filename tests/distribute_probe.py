"""Trains tiny models under `distribute.setup` and prints the outcome as JSON.

Run by tests/test_distribute.py in a fresh process: logical CPU devices must
be configured before TensorFlow starts, so each device count needs its own
process. Usage:

    python tests/distribute_probe.py NUM_CPU_DEVICES   # 0: not distributed
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from knowledge_distillation import distribute  # noqa: E402
from knowledge_distillation.config import DistributeConfig  # noqa: E402
from knowledge_distillation import compat

GLOBAL_BATCH = 32


def main(num_cpu_devices):
    config = DistributeConfig(
        distributed=num_cpu_devices > 0, num_cpu_devices=num_cpu_devices or None
    )
    context = distribute.setup(config, batch_size=GLOBAL_BATCH)

    from knowledge_distillation.compat import keras
    import numpy as np
    import tensorflow as tf

    from knowledge_distillation.kd.distiller import Distiller
    from knowledge_distillation.kd.losses import OutputLoss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 12)).astype("float32")
    y = rng.integers(0, 5, 128)

    def mlp(seed, name, l2=None):
        compat.set_random_seed(seed)
        reg = keras.regularizers.L2(l2) if l2 else None
        return keras.Sequential(
            [keras.Input((12,)), keras.layers.Dense(16, activation="relu", kernel_regularizer=reg),
             keras.layers.Dense(5)], name=name)

    def data(*columns):
        return context.shard(tf.data.Dataset.from_tensor_slices(columns).batch(GLOBAL_BATCH))

    results = {"replicas": context.strategy.num_replicas_in_sync}
    with context.scope():
        teacher = mlp(1, "teacher")
        teacher_logits = teacher.predict(data(x), verbose=0)
        # Both loss terms weigh in (alpha=0.5), so a wrong scale on either shows;
        # Keras Loss objects, plain functions and keras.distillation losses
        # each reach the Distiller differently.
        variants = {
            "live_teacher": (False, {}),
            "cached_teacher": (True, {}),
            "keras_io_losses": (True, {
                "student_loss_fn": lambda t, p: keras.losses.sparse_categorical_crossentropy(
                    t, p, from_logits=True),
                "distillation_loss_fn": keras.losses.KLDivergence()}),
        }
        if compat.KERAS3:
            variants.update({
                "feature_mse": (True, {
                    "alpha": 0.0,
                    "distillation_loss_fn": keras.distillation.FeatureDistillation(loss="mse")}),
                "feature_mse_object": (True, {
                    "alpha": 0.0,
                    "distillation_loss_fn": keras.distillation.FeatureDistillation(
                        loss=keras.losses.MeanSquaredError())}),
                "logits_kl_object": (True, {
                    "temperature": None,
                    "distillation_loss_fn": keras.distillation.LogitsDistillation(
                        temperature=2.0, loss=keras.losses.KLDivergence())}),
                "logits_kl_string": (True, {
                    "temperature": None,
                    "distillation_loss_fn": keras.distillation.LogitsDistillation(temperature=2.0)}),
                "logits_mse_object": (True, {
                    "temperature": None,
                    "distillation_loss_fn": keras.distillation.LogitsDistillation(
                        temperature=2.0, loss=keras.losses.MeanSquaredError())}),
            })
        else:  # Keras 2.6 has no keras.distillation: the project's loss with a Loss-object leaf
            variants["output_mse_object"] = (True, {
                "alpha": 0.0, "temperature": None,
                "distillation_loss_fn": OutputLoss(keras.losses.MeanSquaredError())})
        for name, (cached, losses) in variants.items():
            student = mlp(2, "student", l2=1e-2)
            distiller = Distiller(teacher=teacher, student=student, teacher_outputs_in_data=cached)
            distiller.compile(optimizer=keras.optimizers.SGD(0.2),
                              metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                              **{"alpha": 0.5, "temperature": 2.0, **losses})
            train = data((x, teacher_logits), y) if cached else data(x, y)
            history = distiller.fit(train, epochs=2, verbose=0)
            results[name] = {
                "history": history.history,
                "evaluate": distiller.evaluate(data(x, y), verbose=0, return_dict=True),
                "weights": [w.tolist() for w in student.get_weights()],
            }
        classifier = mlp(3, "classifier", l2=1e-2)
        classifier.compile(optimizer=keras.optimizers.SGD(0.2),
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = classifier.fit(data(x, y), epochs=2, verbose=0)
        results["classifier"] = {
            "history": history.history,
            "weights": [w.tolist() for w in classifier.get_weights()],
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main(int(sys.argv[1]))
