import numpy as np
import pytest
import tensorflow as tf

from knowledge_distillation import compat
from knowledge_distillation import data as data_lib
from knowledge_distillation.compat import keras
from knowledge_distillation.kd.distiller import Distiller
from knowledge_distillation.kd.losses import KDLoss
from knowledge_distillation.models import build_model

from conftest import keras3_only


def _models(data, seed=0):
    teacher = build_model("seed_student", data.input_shape, data.num_classes, seed=seed + 1)
    student = build_model("seed_student", data.input_shape, data.num_classes, seed=seed)
    return teacher, student


def _batch(data, n=64):
    x = data_lib.preprocess(data.x_train[:n]).numpy()
    return x, data.y_train[:n]


def _compiled(teacher, student, **kw):
    d = Distiller(teacher=teacher, student=student)
    d.compile(optimizer=keras.optimizers.Adam(1e-3),
              metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], **kw)
    return d


def test_loss_is_alpha_weighted_student_and_t2_kl(small_data):
    teacher, student = _models(small_data)
    x, y = _batch(small_data)
    d = _compiled(teacher, student, alpha=0.3, temperature=4.0)
    t_logits, s_logits = teacher(x).numpy(), student(x).numpy()
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, s_logits)
    kd = KDLoss(4.0).compute_loss(t_logits, s_logits)
    expected = 0.3 * float(ce) + 0.7 * float(kd)
    assert float(d.compute_loss(x=x, y=y, y_pred=student(x))) == pytest.approx(expected, rel=1e-5)


def test_alpha_one_is_plain_student_loss(small_data):
    teacher, student = _models(small_data)
    x, y = _batch(small_data)
    d = _compiled(teacher, student, alpha=1.0)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, student(x))
    assert float(d.compute_loss(x=x, y=y, y_pred=student(x))) == pytest.approx(float(ce), rel=1e-6)


def test_temperature_squared_scales_the_distillation_term(small_data):
    teacher, student = _models(small_data)
    x, y = _batch(small_data)
    losses = {}
    for t in (1.0, 8.0):
        d = _compiled(teacher, student, alpha=0.0, temperature=t)
        losses[t] = float(d.compute_loss(x=x, y=y, y_pred=student(x)))
    # Softened 8x the KL shrinks by roughly 64x; T^2 restores the scale.
    assert 0.2 < losses[8.0] / losses[1.0] < 5.0


def test_fit_trains_only_the_student_and_reports_both_losses(small_data):
    teacher, student = _models(small_data)
    before_teacher = [w.copy() for w in teacher.get_weights()]
    before_student = [w.copy() for w in student.get_weights()]
    d = _compiled(teacher, student)
    ds = data_lib.make_dataset(small_data.x_train, small_data.y_train, 32, shuffle=True, seed=1)
    history = d.fit(ds, epochs=1, verbose=0)
    for key in ("loss", "student_loss", "distillation_loss", "accuracy"):
        assert key in history.history
    for a, b in zip(before_teacher, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(before_student, student.get_weights()))
    result = d.evaluate(data_lib.make_dataset(small_data.x_test, small_data.y_test, 64),
                        verbose=0, return_dict=True)
    # evaluate() scores the student: the same accuracy as its own predictions.
    x_test = data_lib.preprocess(small_data.x_test).numpy()
    by_hand = np.mean(np.argmax(student.predict(x_test, verbose=0), -1) == small_data.y_test)
    assert result["accuracy"] == pytest.approx(by_hand, abs=1e-6)


def _dropout_batchnorm_teacher(data, seed=11):
    compat.set_random_seed(seed)
    inputs = keras.Input(data.input_shape)
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(64)(h)
    h = keras.layers.BatchNormalization(momentum=0.5)(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Dropout(0.5)(h)
    return keras.Model(inputs, keras.layers.Dense(data.num_classes)(h))


def test_teacher_runs_in_inference_mode_during_training(small_data):
    # A teacher with Dropout and BatchNorm: in training mode its outputs would
    # be random and its moving statistics would move. In inference mode the
    # per-step teacher trains the student exactly like logits predicted once.
    teacher = _dropout_batchnorm_teacher(small_data)
    before = [w.copy() for w in teacher.get_weights()]
    logits = teacher.predict(data_lib.preprocess(small_data.x_train), verbose=0)
    students = []
    for cached in (False, True):
        _, student = _models(small_data, seed=5)
        d = Distiller(teacher=teacher, student=student, teacher_outputs_in_data=cached)
        d.compile(optimizer=keras.optimizers.SGD(0.05), alpha=0.0, temperature=4.0)
        ds = data_lib.make_dataset(small_data.x_train, small_data.y_train, 32, shuffle=True,
                                   seed=3, extra=logits if cached else None)
        if cached:
            ds = ds.map(lambda x, y, t: ((x, t), y))
        d.fit(ds, epochs=1, verbose=0)
        students.append(student.get_weights())
    for a, b in zip(before, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(*students):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_cached_teacher_outputs_train_like_the_per_step_teacher(small_data):
    ds_args = dict(shuffle=True, seed=3)
    results = []
    for cached in (False, True):
        teacher, student = _models(small_data, seed=5)
        d = Distiller(teacher=teacher, student=student, teacher_outputs_in_data=cached)
        d.compile(optimizer=keras.optimizers.SGD(0.05), alpha=0.1, temperature=10.0)
        if cached:
            logits = teacher.predict(data_lib.preprocess(small_data.x_train), verbose=0)
            ds = data_lib.make_dataset(small_data.x_train, small_data.y_train, 32,
                                       extra=logits, **ds_args)
            ds = ds.map(lambda x, y, t: ((x, t), y))
        else:
            ds = data_lib.make_dataset(small_data.x_train, small_data.y_train, 32, **ds_args)
        d.fit(ds, epochs=1, verbose=0)
        results.append(student.get_weights())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_several_steps_per_compiled_call_train_like_one(small_data):
    results = []
    for steps in (1, 8):
        teacher, student = _models(small_data, seed=7)
        d = _compiled(teacher, student, alpha=0.1, temperature=10.0, steps_per_execution=steps)
        ds = data_lib.make_dataset(small_data.x_train, small_data.y_train, 32, shuffle=True, seed=3)
        history = d.fit(ds, epochs=2, verbose=0)
        assert int(d.optimizer.iterations.numpy()) == 2 * len(ds)
        results.append((student.get_weights(), history.history["loss"]))
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4)


@keras3_only
def test_accepts_keras_distillation_loss_objects(small_data):
    teacher, student = _models(small_data)
    x, y = _batch(small_data)
    d = _compiled(teacher, student, alpha=0.0,
                  distillation_loss_fn=keras.distillation.FeatureDistillation(loss="mse"))
    expected = float(np.mean((teacher(x).numpy() - student(x).numpy()) ** 2))
    assert float(d.compute_loss(x=x, y=None, y_pred=student(x))) == pytest.approx(expected, rel=1e-5)


def test_losses_are_float32_under_mixed_precision(small_data):
    # TensorFlow 2.6 has no bfloat16 CPU convolution: float16 there.
    low = "bfloat16" if compat.cpu_runs_bfloat16() else "float16"
    keras.mixed_precision.set_global_policy(f"mixed_{low}")
    teacher, student = _models(small_data)
    x, y = _batch(small_data)
    d = _compiled(teacher, student)
    assert tf.as_dtype(student(x).dtype).name == low
    loss = d.compute_loss(x=x, y=y, y_pred=student(x))
    assert tf.as_dtype(loss.dtype).name == "float32"
    assert np.isfinite(float(loss))


def test_student_saves_alone_and_reloads(small_data, tmp_path):
    teacher, student = _models(small_data)
    d = _compiled(teacher, student)
    d.fit(data_lib.make_dataset(small_data.x_train[:64], small_data.y_train[:64], 32),
          epochs=1, verbose=0)
    path = tmp_path / f"student{compat.MODEL_EXT}"
    d.student.save(path)
    reloaded = compat.load_model_file(str(path))
    x, _ = _batch(small_data, 8)
    np.testing.assert_allclose(reloaded(x), student(x), rtol=1e-5, atol=1e-6)
    assert reloaded.count_params() == student.count_params()


@keras3_only
def test_distiller_round_trips_through_a_file_with_its_compile_settings(small_data, tmp_path):
    teacher = _dropout_batchnorm_teacher(small_data)
    _, student = _models(small_data)
    d = _compiled(teacher, student, alpha=0.3, temperature=4.0)
    d.fit(data_lib.make_dataset(small_data.x_train[:64], small_data.y_train[:64], 32),
          epochs=1, verbose=0)
    d.save(tmp_path / "distiller.keras")
    loaded = keras.saving.load_model(tmp_path / "distiller.keras")  # with its compile settings
    assert isinstance(loaded, Distiller)
    assert (loaded.alpha, loaded.temperature) == (0.3, 4.0)
    assert isinstance(loaded.distillation_loss, KDLoss)
    x, y = _batch(small_data, 32)
    assert float(loaded.compute_loss(x=x, y=y, y_pred=loaded.student(x))) == pytest.approx(
        float(d.compute_loss(x=x, y=y, y_pred=student(x))), rel=1e-6)


def test_temperature_given_twice_must_agree(small_data):
    teacher, student = _models(small_data)
    loss = (keras.distillation.LogitsDistillation(temperature=3.0) if compat.KERAS3
            else KDLoss(temperature=3.0))
    with pytest.raises(ValueError, match="temperature=10 disagrees with the temperature 3.0"):
        _compiled(teacher, student, distillation_loss_fn=loss, temperature=10)
    d = _compiled(teacher, student, distillation_loss_fn=loss)
    assert d.temperature == 3.0
    assert _compiled(teacher, student, distillation_loss_fn=loss, temperature=3.0).temperature == 3.0


@pytest.mark.parametrize("weights", ["sample_weight", "class_weight"])
def test_sample_and_class_weights_are_rejected(small_data, weights):
    teacher, student = _models(small_data)
    d = _compiled(teacher, student)
    x, y = _batch(small_data, 32)
    kwargs = ({"sample_weight": np.ones(len(y), "float32")} if weights == "sample_weight"
              else {"class_weight": {c: 1.0 for c in range(small_data.num_classes)}})
    with pytest.raises(ValueError, match="does not support sample_weight or class_weight"):
        d.fit(x, y, epochs=1, verbose=0, **kwargs)


def test_bad_arguments_are_clear_errors(small_data):
    teacher, student = _models(small_data)
    with pytest.raises(ValueError, match="alpha must be between"):
        _compiled(teacher, student, alpha=1.5)
    with pytest.raises(ValueError, match="teacher is None"):
        Distiller(teacher=None, student=student)
    with pytest.raises(ValueError, match="student must be a keras.Model"):
        Distiller(teacher=teacher, student="nope")
