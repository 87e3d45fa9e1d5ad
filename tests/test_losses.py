import numpy as np
import pytest
import tensorflow as tf

from knowledge_distillation.compat import keras
from knowledge_distillation.kd.losses import (
    KDLoss,
    as_distillation_loss,
)

from conftest import keras3_only


def _hand_kd(teacher, student, temperature):
    def softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    p = softmax(teacher / temperature)
    q = softmax(student / temperature)
    return temperature**2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1))


def test_kd_loss_matches_hand_computation():
    teacher = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]], dtype=np.float32)
    student = np.array([[1.0, 1.5, 0.3], [0.0, 0.2, 0.4]], dtype=np.float32)
    # By hand, T=2, row 1: p = softmax([1, .5, .05]) = [.4722, .2864, .2414],
    # q = softmax([.5, .75, .15]) = [.3236, .4155, .2609].
    expected = _hand_kd(teacher, student, 2.0)
    got = float(KDLoss(temperature=2.0).compute_loss(teacher, student))
    assert got == pytest.approx(expected, rel=1e-5)
    assert expected > 0


def test_kd_gradient_reaches_hintons_high_temperature_limit():
    # Hinton et al. 2015, sec. 2.1: at high T the gradient of T^2 * KL with
    # respect to a student logit tends to ((s_i - mean s) - (t_i - mean t)) / K,
    # whatever T is: the T^2 factor keeps the soft term's scale T-independent.
    import tensorflow as tf

    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(4, 10)).astype("float32")
    student = rng.normal(size=(4, 10)).astype("float32")
    k, batch = teacher.shape[1], teacher.shape[0]
    limit = ((student - student.mean(-1, keepdims=True))
             - (teacher - teacher.mean(-1, keepdims=True))) / (k * batch)
    for t in (50.0, 200.0):
        s = tf.Variable(student)
        with tf.GradientTape() as tape:
            loss = KDLoss(t).compute_loss(teacher, s)
        grad = tape.gradient(loss, s).numpy()
        np.testing.assert_allclose(grad, limit, atol=0.03 * np.abs(limit).max())


def test_kd_loss_is_zero_when_student_matches_teacher():
    logits = np.random.default_rng(1).normal(size=(4, 10)).astype("float32")
    assert float(KDLoss(3.0).compute_loss(logits, logits)) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_is_float32_and_finite_for_float16_logits():
    teacher = (np.arange(20, dtype=np.float32).reshape(2, 10) * 30).astype("float16")
    student = np.zeros((2, 10), dtype="float16")
    value = KDLoss(1.0).compute_loss(teacher, student)
    assert tf.as_dtype(value.dtype) == tf.float32
    assert np.isfinite(float(value))
    assert float(value) == pytest.approx(
        _hand_kd(teacher.astype("float64"), student.astype("float64"), 1.0), rel=1e-3
    )


def test_keras_kl_divergence_adapter_matches_kd_loss():
    rng = np.random.default_rng(2)
    teacher = rng.normal(size=(16, 10)).astype("float32")
    student = rng.normal(size=(16, 10)).astype("float32")
    adapted = as_distillation_loss(keras.losses.KLDivergence(), 10.0)
    assert float(adapted.compute_loss(teacher, student)) == pytest.approx(
        float(KDLoss(10.0).compute_loss(teacher, student)), rel=1e-4
    )


def _logits(seed=3):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(16, 10)) * 3).astype("float32"), rng.normal(size=(16, 10)).astype("float32")


@keras3_only
def test_keras_logits_distillation_default_becomes_hinton_kd():
    # Keras resolves its default "kl_divergence" to a function that reads
    # logits as probabilities; ours must always be Hinton's KD.
    teacher, student = _logits()
    keras_default = keras.distillation.LogitsDistillation(temperature=3.0)
    converted = as_distillation_loss(keras_default, 10.0)
    expected = _hand_kd(teacher, student, 3.0)
    assert float(converted.compute_loss(teacher, student)) == pytest.approx(expected, rel=1e-5)
    assert abs(float(keras_default.compute_loss(teacher, student)) - expected) > 1.0
    with_object = keras.distillation.LogitsDistillation(
        temperature=3.0, loss=keras.losses.KLDivergence())
    assert float(as_distillation_loss(with_object, 10.0).compute_loss(teacher, student)) == \
        pytest.approx(expected, rel=1e-5)


@keras3_only
def test_keras_logits_distillation_with_another_loss_keeps_its_meaning():
    teacher, student = _logits()
    loss = keras.distillation.LogitsDistillation(temperature=2.0, loss="mse")
    expected = np.mean((teacher / 2.0 - student / 2.0) ** 2)
    assert float(as_distillation_loss(loss, 10.0).compute_loss(teacher, student)) == \
        pytest.approx(expected, rel=1e-5)


@keras3_only
def test_keras_feature_distillation_with_a_loss_object_is_the_plain_mean():
    teacher, student = _logits()
    loss = keras.distillation.FeatureDistillation(loss=keras.losses.MeanSquaredError())
    expected = np.mean((teacher - student) ** 2)
    assert float(as_distillation_loss(loss, 10.0).compute_loss(teacher, student)) == \
        pytest.approx(expected, rel=1e-5)


@keras3_only
def test_keras_distillation_with_several_losses_is_rejected():
    with pytest.raises(ValueError, match="distils one output"):
        as_distillation_loss(keras.distillation.LogitsDistillation(
            loss=["kl_divergence", "mse"]), 10.0)


def test_bad_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(0.0)
    with pytest.raises(ValueError, match="distillation_loss_fn"):
        as_distillation_loss(42, 1.0)
