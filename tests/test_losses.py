import keras
import numpy as np
import pytest

from knowledge_distillation.losses import (
    KDLoss,
    as_distillation_loss,
    soft_kl_divergence,
)


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


def test_kd_loss_carries_explicit_temperature_squared():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(8, 10)).astype("float32")
    student = rng.normal(size=(8, 10)).astype("float32")
    for t in (1.0, 4.0, 10.0):
        kl = float(soft_kl_divergence(teacher, student, t))
        assert float(KDLoss(t).compute_loss(teacher, student)) == pytest.approx(
            t * t * kl, rel=1e-6
        )


def test_kd_loss_is_zero_when_student_matches_teacher():
    logits = np.random.default_rng(1).normal(size=(4, 10)).astype("float32")
    assert float(KDLoss(3.0).compute_loss(logits, logits)) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_is_float32_and_finite_for_float16_logits():
    teacher = (np.arange(20, dtype=np.float32).reshape(2, 10) * 30).astype("float16")
    student = np.zeros((2, 10), dtype="float16")
    value = KDLoss(1.0).compute_loss(teacher, student)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
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


def test_bad_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(0.0)
    with pytest.raises(ValueError, match="distillation_loss_fn"):
        as_distillation_loss(42, 1.0)
