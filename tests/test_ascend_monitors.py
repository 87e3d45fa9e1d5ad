"""Data dump, overflow detection, the static-shape guard and profiling on CPU.

Models here are a few hundred weights on 8x8 inputs, so each fit takes well
under a second on two cores.
"""

import glob
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from knowledge_distillation import compat
from knowledge_distillation.ascend import device
from knowledge_distillation.ascend.device import setup_device
from knowledge_distillation.ascend.dump import NonFiniteError, describe, non_finite_tensors
from knowledge_distillation.ascend.probe import StepTensors
from knowledge_distillation.compat import keras
from knowledge_distillation.config import DeviceConfig
from knowledge_distillation.kd.distiller import Distiller

from ascend_helpers import (  # noqa: F401  (fixtures are used by name)
    REPO_ROOT,
    compiled,
    dataset,
    quadrant_data,
    tensorflow_defaults,
    tiny_model,
)
from conftest import keras2_gap

layers = keras.layers


# -- data dump ---------------------------------------------------------------


def _index(root):
    with open(os.path.join(root, "index.json"), encoding="utf-8") as f:
        return json.load(f)


def test_data_dump_writes_every_layer_output_and_gradient_of_the_steps(tmp_path):
    session = setup_device(
        DeviceConfig(
            precision_mode="must_keep_origin_dtype", data_dump_flag=True, data_dump_step="0|5"
        ),
        str(tmp_path),
    )
    model = compiled(session.prepare_model(tiny_model()), session)
    initial = [v.numpy() for v in model.variables]
    x, y = quadrant_data(64)
    model.fit(dataset(x, y), epochs=2, callbacks=session.callbacks(), verbose=0)

    root = tmp_path / "data_dump" / "tiny"
    index = _index(root)
    assert [s["step"] for s in index["steps"]] == [0, 5]
    for step in (0, 5):
        entries = [e for e in index["tensors"] if e["step"] == step]
        outputs = {e["layer"] for e in entries if e["kind"] == "output"}
        grads = {f"{e['layer']}/{e['tensor']}" for e in entries if e["kind"] == "gradient"}
        assert outputs == {"conv", "bn", "relu", "flatten", "dense", "softmax"}
        assert grads == {"conv/kernel", "conv/bias", "bn/gamma", "bn/beta",
                         "dense/kernel", "dense/bias"}
        for e in entries:
            array = np.load(root / e["file"])
            assert list(array.shape) == e["shape"] and str(array.dtype) == e["dtype"]

    # Step 0 is exactly the first real step: same weights, same batch.
    model2 = tiny_model()
    for v, value in zip(model2.variables, initial):
        v.assign(value)
    with tf.GradientTape() as tape:
        pred = model2(x[:16], training=True)
        loss = keras.losses.SparseCategoricalCrossentropy()(y[:16], pred)
    grads = tape.gradient(loss, model2.trainable_weights)
    names = ["/".join(compat.variable_path(w).split("/")[-2:]) for w in model2.trainable_weights]
    expected = dict(zip(names, grads))
    dumped = {
        f"{e['layer']}/{e['tensor']}": np.load(root / e["file"])
        for e in index["tensors"] if e["step"] == 0 and e["kind"] == "gradient"
    }
    for name, grad in expected.items():
        np.testing.assert_allclose(dumped[name], grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.load(root / "step_0" / "softmax.npy"), pred.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.load(root / "step_0" / "input.npy"), x[:16])
    # The replay does not disturb training: weights kept their post-step values.
    assert all(np.all(np.isfinite(v.numpy())) for v in model.weights)


@keras2_gap("Dropout draws its mask from stateful random ops, which the replay cannot repeat")
@pytest.mark.parametrize("mode", ["must_keep_origin_dtype", "allow_mix_precision"])
def test_data_dump_gradients_are_the_ones_the_step_applied(tmp_path, mode):
    # With plain SGD the real update is -lr * gradient; the dumped gradient of
    # the replayed step must match it, dropout masks included.
    session = setup_device(
        DeviceConfig(precision_mode=mode, data_dump_flag=True, data_dump_step="2"),
        str(tmp_path),
    )
    compat.set_random_seed(3)
    inputs = keras.Input((8, 8, 1))
    x = layers.Flatten(name="flatten")(inputs)
    x = layers.Dense(16, activation="relu", name="hidden")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    outputs = layers.Dense(3, name="logits")(x)
    model = compiled(session.prepare_model(keras.Model(inputs, outputs, name="mlp")), session,
                     optimizer=keras.optimizers.SGD(0.1), from_logits=True)
    data_x, data_y = quadrant_data(48)

    class Weights(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                self.before = [w.numpy() for w in model.trainable_weights]

        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                self.after = [w.numpy() for w in model.trainable_weights]

    weights = Weights()
    model.fit(dataset(data_x, data_y), callbacks=[weights, *session.callbacks()], verbose=0)
    root = tmp_path / "data_dump" / "mlp"
    index = _index(root)
    grads = [e for e in index["tensors"] if e["kind"] == "gradient"]
    assert [f"{e['layer']}/{e['tensor']}" for e in grads] == [
        "hidden/kernel", "hidden/bias", "logits/kernel", "logits/bias"]
    dropout = np.load(root / "step_2" / "dropout.npy")
    assert (dropout == 0).mean() > 0.3  # the replay ran dropout in training mode
    assert index["masks_not_replayed"] == []
    # float32 replays bit for bit (up to the division below); bfloat16 within
    # a rounding step, as the compiled step fuses kernels the eager replay runs
    # one by one. A different dropout mask would miss by whole gradients.
    tolerance = {"rtol": 1e-3, "atol": 1e-5} if mode.startswith("must") else {
        "rtol": 1e-2, "atol": 2e-3}
    for e, before, after in zip(grads, weights.before, weights.after):
        applied = (before - after) / 0.1
        np.testing.assert_allclose(np.load(root / e["file"]), applied, **tolerance)


@pytest.mark.skipif(compat.KERAS3, reason="Keras 3 replays dropout masks exactly (test above)")
def test_keras2_data_dump_names_the_layers_whose_masks_it_cannot_replay(tmp_path, caplog):
    session = setup_device(DeviceConfig(data_dump_flag=True, data_dump_step="0",
                                        precision_mode="must_keep_origin_dtype"), str(tmp_path))
    inputs = keras.Input((8, 8, 1))
    x = layers.Dropout(0.5, name="drop")(layers.Flatten()(inputs))
    model = compiled(session.prepare_model(keras.Model(inputs, layers.Dense(3)(x), name="mlp")),
                     session, from_logits=True)
    x, y = quadrant_data(16)
    with caplog.at_level(logging.WARNING):
        model.fit(dataset(x, y), callbacks=session.callbacks(), verbose=0)
    assert "uses new masks for drop" in caplog.text
    assert _index(tmp_path / "data_dump" / "mlp")["masks_not_replayed"] == ["drop"]


@pytest.mark.parametrize("cached_teacher", [False, True])
def test_data_dump_of_a_distiller_dumps_the_student(tmp_path, monkeypatch, cached_teacher):
    # bfloat16 as on a CPU with its instructions (else float32 computes and dumps)
    monkeypatch.setattr(device.cpu_info, "has_bf16", lambda flags=None: True)
    session = setup_device(
        DeviceConfig(data_dump_flag=True, data_dump_step="1"), str(tmp_path)
    )
    teacher = session.prepare_model(tiny_model("teacher", softmax=False, seed=1))
    student = session.prepare_model(tiny_model("student", softmax=False, seed=2))
    distiller = Distiller(teacher=teacher, student=student,
                          teacher_outputs_in_data=cached_teacher)
    distiller.compile(optimizer=session.wrap_optimizer(keras.optimizers.SGD(0.05)),
                      alpha=0.1, temperature=4.0, **session.compile_kwargs())
    x, y = quadrant_data(48)
    inputs = (x, teacher.predict(x, verbose=0)) if cached_teacher else x
    data = tf.data.Dataset.from_tensor_slices((inputs, y)).batch(16)
    distiller.fit(data, epochs=1, callbacks=session.callbacks(), verbose=0)
    index = _index(tmp_path / "data_dump" / "distiller")
    assert index["inspected_model"] == "student"
    grads = [e for e in index["tensors"] if e["kind"] == "gradient"]
    assert len(grads) == len(student.trainable_weights) == 6
    outputs = {e["layer"]: e["dtype"] for e in index["tensors"] if e["kind"] == "output"}
    # dumped as computed (float32 where the CPU or TensorFlow 2.6 has no bfloat16)
    assert outputs["conv"] == ("bfloat16" if session.low_policy == "mixed_bfloat16"
                               else "float32")
    assert all(np.isfinite(np.load(tmp_path / "data_dump" / "distiller" / e["file"])).all()
               for e in grads)


def test_data_dump_rejects_a_subclassed_model_before_training(tmp_path):
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.dense = layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    session = setup_device(DeviceConfig(data_dump_flag=True), str(tmp_path))
    model = compiled(Subclassed(), session, from_logits=True)
    x = np.ones((16, 4), np.float32)
    with pytest.raises(ValueError, match="needs a Functional or Sequential model"):
        model.fit(x, np.zeros(16), callbacks=session.callbacks(), verbose=0)


# -- overflow ------------------------------------------------------------------


def _exploding_batches(batch_at=2, n_batches=5):
    x, y = quadrant_data(16 * n_batches)
    # Finite, but a 3x3 conv of ones sums nine of them: inf.
    x[16 * batch_at : 16 * (batch_at + 1)] = 3e38
    return x, y


def _report(tmp_path, model="tiny"):
    with open(tmp_path / "over_dump" / model / "overflow_report.json", encoding="utf-8") as f:
        return json.load(f)


def test_overflow_from_an_exploding_input_stops_and_names_the_first_layer(tmp_path):
    session = setup_device(
        DeviceConfig(precision_mode="must_keep_origin_dtype", over_dump=True), str(tmp_path)
    )
    model = compiled(session.prepare_model(tiny_model(conv_init="ones")), session)
    x, y = _exploding_batches(batch_at=2)
    with pytest.raises(NonFiniteError, match="overflow at step 2 of tiny: first non-finite "
                       "tensor: output of layer 'conv'") as e:
        model.fit(dataset(x, y), epochs=1, callbacks=session.callbacks(), verbose=0)
    report = _report(tmp_path)
    assert e.value.step == 2 and e.value.report_path.endswith("overflow_report.json")
    assert report["step"] == 2 and report["first_layer"] == "conv"
    assert report["first_non_finite"]["kind"] == "output"
    assert report["action"] == "training stopped"
    index = _index(tmp_path / "over_dump" / "tiny")
    assert [s["step"] for s in index["steps"]] == [2]
    assert np.isinf(np.load(tmp_path / "over_dump" / "tiny" / "step_2" / "conv.npy")).any()

def test_overflow_from_an_exploding_learning_rate_stops_training(tmp_path):
    session = setup_device(
        DeviceConfig(precision_mode="must_keep_origin_dtype", over_dump=True), str(tmp_path)
    )
    model = compiled(session.prepare_model(tiny_model(softmax=False)), session,
                     optimizer=keras.optimizers.SGD(1e36), from_logits=True)
    x, y = quadrant_data(96)
    callbacks = session.callbacks()
    with pytest.raises(NonFiniteError) as e:
        model.fit(dataset(x, y), epochs=1, callbacks=callbacks, verbose=0)
    report = _report(tmp_path)
    # Step 0's update blows the weights up to ~1e35. On Keras 3 step 1's Dense
    # output is the first inf (BatchNorm renormalises the conv's); TensorFlow
    # 2.6's fused BatchNorm overflows on the conv's ~1e35 outputs itself.
    assert e.value.step == report["step"] == 1
    assert report["first_layer"] == ("dense" if compat.KERAS3 else "bn")
    kinds = [t["kind"] for t in report["non_finite_tensors"]]
    assert kinds[:2] == ["output", "loss"] if compat.KERAS3 else (kinds[0] == "output" and "loss" in kinds)
    assert callbacks[0].overflow_steps == [1]


def test_overflow_made_by_the_update_alone_blames_the_learning_rate():
    tensors = StepTensors(
        inputs=[("input", np.ones(2))], outputs=[("dense", "output", np.ones(2))],
        loss=np.float32(1.0), loss_scale=None,
        gradients=[("dense", "kernel", np.ones(2))], scaled_gradients_finite=[True],
        non_finite_after_update=[("dense", "kernel")], dtypes={},
    )
    [entry] = non_finite_tensors(tensors)
    assert entry["kind"] == "update" and entry["layer"] == "dense"
    assert "learning rate too large" in describe(entry)

def test_overflow_under_dynamic_loss_scaling_skips_the_step_and_goes_on(tmp_path, caplog):
    session = setup_device(
        DeviceConfig(precision_mode="must_keep_origin_dtype", over_dump=True), str(tmp_path)
    )
    optimizer = compat.LossScaleOptimizer(keras.optimizers.SGD(0.05))
    model = compiled(
        session.prepare_model(tiny_model(conv_init="ones")), session, optimizer=optimizer
    )
    x, y = _exploding_batches(batch_at=2, n_batches=5)
    callbacks = session.callbacks()
    with caplog.at_level(logging.WARNING):
        model.fit(dataset(x, y), epochs=1, callbacks=callbacks, verbose=0)
    assert callbacks[0].overflow_steps == [2]
    assert "overflow at step 2 of tiny: dynamic loss scaling skipped the update" in caplog.text
    assert float(compat.loss_scale_value(optimizer)) == 2.0**14
    report = _report(tmp_path)
    assert report["first_layer"] == "conv" and report["loss_scale"] == 2.0**15
    assert report["action"].startswith("step skipped")
    assert all(np.all(np.isfinite(v.numpy())) for v in model.trainable_weights)

def test_overflow_that_loss_scaling_cannot_absorb_stops(tmp_path):
    session = setup_device(
        DeviceConfig(precision_mode="must_keep_origin_dtype", over_dump=True), str(tmp_path)
    )
    optimizer = compat.LossScaleOptimizer(keras.optimizers.SGD(0.05), initial_scale=4.0)
    model = compiled(session.prepare_model(tiny_model()), session, optimizer=optimizer)
    x, y = quadrant_data(16 * 6)
    x[:] = 3e38
    # Keras 3 halves the scale below 1; Keras 2.6 keeps it at 1, its floor.
    expected = "fell to 0.5" if compat.KERAS3 else "stays at 1"
    with pytest.raises(NonFiniteError, match=f"{expected} after 3 skipped steps"):
        model.fit(dataset(x, y), epochs=1, callbacks=session.callbacks(), verbose=0)


# -- static shapes -------------------------------------------------------------


def test_static_traces_the_train_step_once_for_the_whole_run(tmp_path):
    session = setup_device(DeviceConfig(static=True, over_dump=True), str(tmp_path))
    model = compiled(session.prepare_model(tiny_model()), session)
    x, y = quadrant_data(80)
    callbacks = session.callbacks()
    model.fit(dataset(x, y, drop_remainder=True), epochs=3, callbacks=callbacks, verbose=0)
    guard = callbacks[0]
    assert guard.traces == 1
    assert guard.probe.trace_shapes == [[(16, 8, 8, 1), (16,)]]


def test_static_rejects_a_partial_last_batch(tmp_path):
    session = setup_device(DeviceConfig(static=True), str(tmp_path))
    model = compiled(session.prepare_model(tiny_model()), session)
    x, y = quadrant_data(40)
    with pytest.raises(ValueError, match="--static: .*drop_remainder=True"):
        model.fit(dataset(x, y, drop_remainder=False), callbacks=session.callbacks(), verbose=0)


def test_static_second_trace_is_an_error(tmp_path):
    session = setup_device(DeviceConfig(static=True), str(tmp_path))
    model = compiled(session.prepare_model(tiny_model()), session)
    x, y = quadrant_data(64)
    callbacks = session.callbacks()
    model.fit(dataset(x, y, batch=16), callbacks=callbacks, verbose=0)
    # Same fit's guard, new batch size: a second trace the static run forbids.
    with pytest.raises(RuntimeError, match="traced again"):
        model.fit(dataset(x, y, batch=8), callbacks=callbacks, verbose=0)


DISTRIBUTED_SCRIPT = """
import json, sys
import numpy as np, keras, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from knowledge_distillation.config import DeviceConfig
from knowledge_distillation.ascend.device import setup_device
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x = np.random.default_rng(0).random((64, 4), dtype=np.float32)
y = np.zeros(64, np.int32)
data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)
one_device = tf.distribute.MirroredStrategy(["/cpu:0"])
result = {}
for name, flag, strategy in (("static", "static", strategy),
                             ("dump", "data_dump_flag", strategy),
                             ("dump_one_replica", "data_dump_flag", one_device)):
    session = setup_device(DeviceConfig(**{flag: True, "data_dump_step": "1"}), sys.argv[1])
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callbacks = session.callbacks()
    try:
        model.fit(data, epochs=2, callbacks=callbacks, verbose=0)
        result[name] = {"traces": callbacks[0].probe.traces,
                        "shapes": callbacks[0].probe.trace_shapes,
                        "dumped": getattr(callbacks[0], "dumped", None)}
    except ValueError as e:
        result[name] = {"error": str(e)}
print(json.dumps(result))
"""


def test_under_tf_distribute_static_counts_per_run_and_dumps_need_one_replica(tmp_path):
    script = tmp_path / "distributed.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    # Logical devices must be set before TensorFlow starts: a fresh process.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO_ROOT}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["static"]["traces"] == 1
    assert result["static"]["shapes"] == [[[8, 4], [8]]]  # the batch of 16 split over 2
    assert "do not run with --distributed (2 replicas)" in result["dump"]["error"]
    assert result["dump_one_replica"]["dumped"] == [1]


# -- profiling ------------------------------------------------------------------


def test_profiling_writes_a_tensorboard_profile_trace(tmp_path):
    session = setup_device(DeviceConfig(profiling=True), str(tmp_path))
    model = compiled(session.prepare_model(tiny_model()), session)
    x, y = quadrant_data(96)
    callbacks = session.callbacks()
    model.fit(dataset(x, y), epochs=1, callbacks=callbacks, verbose=0)
    run = tmp_path / "profiling" / "tiny" / "plugins" / "profile"
    traces = glob.glob(str(run / "*" / "*.xplane.pb"))
    assert traces and all(os.path.getsize(t) > 0 for t in traces)
    assert callbacks[0].profiled == [3, 4, 5]
