"""Quantization arithmetic: hand-computed values, ONNX QuantizeLinear, TF twin."""

import numpy as np
import onnxruntime as ort
import pytest
import tensorflow as tf
from onnx import TensorProto, helper, numpy_helper

from knowledge_distillation.quant import quantize_math as qm


def _ort_qdq(x, scale, zero_point, int4=False, axis=None):
    """Runs QuantizeLinear -> DequantizeLinear in ONNX Runtime (opset 21)."""
    scale = np.asarray(scale, np.float32)
    if int4:
        zp = helper.make_tensor("zp", TensorProto.INT4, list(np.shape(zero_point)),
                                np.asarray(zero_point).reshape(-1).tolist())
    else:
        zp = numpy_helper.from_array(np.asarray(zero_point, np.int8), "zp")
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))]
    if not int4:
        nodes.append(helper.make_node("Identity", ["q"], ["q_out"]))
        outputs.append(helper.make_tensor_value_info("q_out", TensorProto.INT8, list(x.shape)))
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        outputs, [numpy_helper.from_array(scale, "s"), zp])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})


def test_int_ranges():
    assert qm.int_range("INT8") == (-128, 127)
    assert qm.int_range("INT4") == (-8, 7)
    assert qm.weight_range("INT8") == (-127, 127)
    assert qm.weight_range("INT4") == (-7, 7)
    with pytest.raises(ValueError, match="INT8, INT4"):
        qm.int_range("INT2")


def test_quantize_hand_values_round_half_to_even_and_saturate():
    x = np.array([0.25, 0.75, 1.25, -0.25, -0.75, 0.1, 100.0, -100.0], np.float32)
    # x / 0.5 = 0.5, 1.5, 2.5, -0.5, -1.5, 0.2, 200, -200 -> even ties, then + 3.
    expected = np.array([3, 5, 5, 3, 1, 3, 127, -128])
    np.testing.assert_array_equal(qm.quantize(x, 0.5, 3, -128, 127), expected)
    np.testing.assert_array_equal(
        qm.dequantize(expected, 0.5, 3), [0.0, 1.0, 1.0, 0.0, -1.0, 0.0, 62.0, -65.5])
    # INT4 narrow weight range: 7.4 -> 7, -9 -> -7.
    np.testing.assert_array_equal(qm.quantize([7.4, -9.0, 2.5], 1.0, 0, -7, 7), [7, -7, 2])


def test_quantize_matches_onnx_quantize_linear_int8():
    rng = np.random.default_rng(0)
    scale, zero_point = np.float32(0.0371), -17
    ties = (np.arange(-140, 140) + 0.5).astype(np.float32) * np.float32(0.25)
    x = np.concatenate([rng.normal(0, 3, 5000).astype(np.float32), ties / np.float32(0.25) * scale,
                        np.array([1e6, -1e6], np.float32)])
    y, q = _ort_qdq(x, scale, zero_point)
    np.testing.assert_array_equal(q, qm.quantize(x, scale, zero_point, -128, 127))
    np.testing.assert_array_equal(y, qm.fake_quantize(x, scale, zero_point, -128, 127))
    # exact ties with a power-of-two scale round half to even in both
    y, q = _ort_qdq(ties, np.float32(0.25), 0)
    np.testing.assert_array_equal(q, qm.quantize(ties, 0.25, 0, -128, 127))
    assert q[ties == np.float32(0.125)][0] == 0 and q[ties == np.float32(0.375)][0] == 2


def test_quantize_matches_onnx_int4_per_channel():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (4, 6)).astype(np.float32)
    scales = np.array([0.1, 0.25, 0.5, 1.0], np.float32)
    (y,) = _ort_qdq(w, scales, np.zeros(4, int), int4=True, axis=0)
    lo, hi = qm.int_range("INT4")
    expected = qm.fake_quantize(w, scales[:, None], 0, lo, hi)
    np.testing.assert_array_equal(y, expected)
    assert np.abs(y / scales[:, None]).max() <= 8


def test_tf_fake_quantize_is_bitwise_equal_to_numpy():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 2, 10000), (np.arange(-50, 50) + 0.5) * 0.125]).astype(np.float32)
    for scale, zero_point in ((np.float32(0.125), 0), (np.float32(0.0234), 11)):
        got = qm.tf_fake_quantize(tf.constant(x), tf.constant(scale), float(zero_point), -128, 127)
        np.testing.assert_array_equal(got.numpy(), qm.fake_quantize(x, scale, zero_point, -128, 127))


def test_straight_through_gradients():
    x = tf.Variable([0.3, 1.7, -2.2])
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(qm.round_ste(x) * 2.0)
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), [2.0, 2.0, 2.0])
    scale = tf.Variable(0.5)
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(qm.tf_fake_quantize(tf.constant([0.3, 100.0]), scale, 0.0, -128, 127))
    # LSQ: d/ds of round(x/s)*s is round(x/s) - x/s inside the range, the clip level outside.
    np.testing.assert_allclose(tape.gradient(y, scale).numpy(), (1 - 0.6) + 127, rtol=1e-5)


def test_activation_params_cover_range_and_zero():
    scale, zero_point = qm.activation_params(0.0, 6.0)
    assert scale == np.float32(6.0 / 255) and zero_point == -128
    assert qm.fake_quantize(np.float32(0.0), scale, zero_point, -128, 127) == 0.0
    assert abs(qm.fake_quantize(np.float32(6.0), scale, zero_point, -128, 127) - 6.0) < scale / 2
    scale, zero_point = qm.activation_params(-1.0, 3.0)
    assert zero_point == -128 + round(1.0 / float(scale))
    # ranges are widened to hold 0
    scale, zero_point = qm.activation_params(2.0, 4.0)
    assert zero_point == -128 and scale == np.float32(4.0 / 255)


def test_weight_scales_per_channel_and_mse_search():
    rng = np.random.default_rng(3)
    kernel = rng.normal(0, 1, (3, 3, 8, 4)).astype(np.float32) * np.array([1, 2, 4, 8], np.float32)
    plain = qm.weight_scales(kernel, -1, "INT8", search=False)
    np.testing.assert_allclose(plain, np.abs(kernel).max(axis=(0, 1, 2)) / 127, rtol=1e-6)
    tensor = qm.weight_scales(kernel, -1, "INT8", channel_wise=False, search=False)
    assert np.all(tensor == np.float32(np.abs(kernel).max() / 127))
    searched = qm.weight_scales(kernel, -1, "INT4")
    assert np.all(searched <= np.abs(kernel).max(axis=(0, 1, 2)) / 7 + 1e-7)

    def error(scales):
        q = qm.quantize_weights(kernel, scales, -1, "INT4")
        return np.mean((q * scales - kernel) ** 2)

    assert error(searched) < error(qm.weight_scales(kernel, -1, "INT4", search=False))


def test_adaround_init_starts_at_float_weights_and_rounds_to_nearest():
    rng = np.random.default_rng(4)
    kernel = rng.normal(0, 1, (16, 5)).astype(np.float32)
    scales = qm.weight_scales(kernel, -1, "INT8")
    v = qm.adaround_init(kernel, scales, -1)
    soft = (np.floor(kernel / scales) + qm.adaround_h(tf.constant(v)).numpy()) * scales
    np.testing.assert_allclose(soft, kernel, atol=2e-4 * scales.max())
    hard = qm.quantize_weights(kernel, scales, -1, "INT8", round_up=v >= 0)
    np.testing.assert_array_equal(hard, qm.quantize_weights(kernel, scales, -1, "INT8"))
    # the regulariser is 0 only when every h(V) is exactly 0 or 1
    assert qm.adaround_regularizer(tf.constant([-50.0, 50.0]), 2.0).numpy() == 0.0
    assert qm.adaround_regularizer(tf.constant([0.0]), 2.0).numpy() == pytest.approx(1.0)
