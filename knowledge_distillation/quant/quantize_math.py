"""The quantization arithmetic, in NumPy (reference) and TensorFlow (training).

One formula everywhere, ONNX `QuantizeLinear`'s:

    q = saturate(round_half_to_even(x / scale) + zero_point)
    x_hat = (q - zero_point) * scale

`x / scale` is a true float32 division (not a multiplication by `1 / scale`)
and the rounding is half-to-even, as in ONNX Runtime; the TF fake-quant
simulation, the record file and the exported ONNX models all use the
float32 `scale` and the integer `zero_point` computed here.

Weights are symmetric (`zero_point = 0`) and per output channel, on the
narrow range (-127..127 for INT8, -7..7 for INT4): with int8 activations no
pair of int8 x int8 products can reach the int16 limit of AVX2's
`vpmaddubsw`, and the range is symmetric around zero. Activations are per
tensor, asymmetric, on the full int8 range.
"""

import numpy as np
import tensorflow as tf

DST_TYPES = ("INT8", "INT4")
_BITS = {"INT8": 8, "INT4": 4}

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020).
ADAROUND_ZETA = 1.1
ADAROUND_GAMMA = -0.1


def check_dst_type(dst_type):
    """Returns `dst_type` if it is a supported integer type, else raises."""
    if dst_type not in DST_TYPES:
        raise ValueError(
            f"dst_type must be one of {', '.join(DST_TYPES)}, got {dst_type!r}"
        )
    return dst_type


def int_range(dst_type, narrow=False):
    """The integer range `(qmin, qmax)` of `dst_type`.

    Args:
        dst_type: "INT8" or "INT4".
        narrow: drop the most negative value (symmetric weights).
            Defaults to False.

    Returns:
        A pair of Python ints, e.g. `(-128, 127)` or `(-7, 7)` (narrow INT4).
    """
    bits = _BITS[check_dst_type(dst_type)]
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return (qmin + 1 if narrow else qmin), qmax


def weight_range(dst_type):
    """The narrow symmetric range used for weights."""
    return int_range(dst_type, narrow=True)


# --- NumPy reference ------------------------------------------------------


def quantize(x, scale, zero_point, qmin, qmax):
    """`saturate(round_half_to_even(x / scale) + zero_point)` as int32.

    Args:
        x: float array.
        scale: float32 scale, broadcastable to `x`.
        zero_point: integer zero point, broadcastable to `x`.
        qmin: smallest integer value.
        qmax: largest integer value.

    Returns:
        An int32 array shaped like `x`.
    """
    x = np.asarray(x, np.float32)
    scale = np.asarray(scale, np.float32)
    q = np.rint(x / scale).astype(np.int64) + np.asarray(zero_point, np.int64)
    return np.clip(q, qmin, qmax).astype(np.int32)


def dequantize(q, scale, zero_point):
    """`(q - zero_point) * scale` in float32."""
    diff = (np.asarray(q, np.int64) - np.asarray(zero_point, np.int64))
    return diff.astype(np.float32) * np.asarray(scale, np.float32)


def fake_quantize(x, scale, zero_point, qmin, qmax):
    """Quantize then dequantize (the value the fake-quant model computes)."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)


def activation_params(clip_min, clip_max, dst_type="INT8"):
    """Per-tensor scale and zero point covering `[clip_min, clip_max]`.

    The range is widened to include 0 so that zero (padding, ReLU outputs)
    is exactly representable, and a degenerate range gets a tiny positive
    width instead of a zero scale.

    Args:
        clip_min: lower clip value.
        clip_max: upper clip value.
        dst_type: "INT8" (activations are always INT8 in practice).

    Returns:
        `(scale, zero_point)`: a float32 scalar and a Python int in range.
    """
    qmin, qmax = int_range(dst_type)
    lo = min(float(clip_min), 0.0)
    hi = max(float(clip_max), 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(qmax - qmin))
    zero_point = int(np.clip(qmin - np.rint(np.float32(lo) / scale), qmin, qmax))
    return scale, zero_point


def channel_axes(kernel_ndim, channel_axis):
    """The axes a per-channel reduction runs over (all but `channel_axis`)."""
    channel_axis %= kernel_ndim
    return tuple(a for a in range(kernel_ndim) if a != channel_axis)


def weight_scales(kernel, channel_axis, dst_type, channel_wise=True, search=True):
    """Symmetric weight scales, one per output channel (or one per tensor).

    The clip value of each channel is `ratio * max|w|`, with `ratio` chosen
    on a grid from 0.5 to 1.0 to minimise the channel's rounding MSE when
    `search` is set (this matters for INT4, where clipping outliers beats
    covering them), else `ratio = 1`.

    Args:
        kernel: float weights.
        channel_axis: the output-channel axis of `kernel`.
        dst_type: "INT8" or "INT4".
        channel_wise: one scale per channel; else one for the whole tensor.
            Defaults to True.
        search: MSE search of the clip ratio. Defaults to True.

    Returns:
        float32 array of shape `(channels,)` (the same value repeated when
        not channel-wise).
    """
    kernel = np.asarray(kernel, np.float32)
    channel_axis %= kernel.ndim
    channels = kernel.shape[channel_axis]
    moved = np.moveaxis(kernel, channel_axis, 0).reshape(channels, -1)
    if not channel_wise:
        moved = moved.reshape(1, -1)
    _, qmax = weight_range(dst_type)
    max_abs = np.maximum(np.abs(moved).max(axis=1), 1e-8).astype(np.float32)
    best = (max_abs / np.float32(qmax)).astype(np.float32)
    if search:
        best_err = np.full(len(max_abs), np.inf)
        for ratio in np.linspace(0.5, 1.0, 26):
            scale = (max_abs * np.float32(ratio) / np.float32(qmax)).astype(np.float32)
            q = np.clip(np.rint(moved / scale[:, None]), -qmax, qmax)
            err = ((q * scale[:, None] - moved) ** 2).mean(axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = np.where(better, scale, best).astype(np.float32)
    if not channel_wise:
        best = np.full(channels, best[0], np.float32)
    return best


def broadcast_channel(values, ndim, channel_axis):
    """Reshapes a `(channels,)` vector to broadcast along `channel_axis`."""
    shape = [1] * ndim
    shape[channel_axis % ndim] = -1
    return np.reshape(values, shape)


def quantize_weights(kernel, scales, channel_axis, dst_type, round_up=None):
    """Integer weights of `kernel` with per-channel `scales`.

    Args:
        kernel: float weights.
        scales: `(channels,)` float32 scales.
        channel_axis: output-channel axis of `kernel`.
        dst_type: "INT8" or "INT4".
        round_up: optional bool array like `kernel`: the learned rounding
            (`floor(w / s) + round_up`). `None` rounds half to even.

    Returns:
        int8 array like `kernel`.
    """
    qmin, qmax = weight_range(dst_type)
    kernel = np.asarray(kernel, np.float32)
    scale = broadcast_channel(np.asarray(scales, np.float32), kernel.ndim, channel_axis)
    scaled = kernel / scale
    if round_up is None:
        q = np.rint(scaled)
    else:
        q = np.floor(scaled) + np.asarray(round_up, np.float32)
    return np.clip(q, qmin, qmax).astype(np.int8)


def adaround_init(kernel, scales, channel_axis):
    """AdaRound logits `V` whose soft rounding equals the float weights.

    `h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)` starts at the
    fractional part of `w / s`, so the soft-quantized weights start equal to
    the float ones and the hard rounding starts as round-to-nearest.
    """
    kernel = np.asarray(kernel, np.float32)
    scale = broadcast_channel(np.asarray(scales, np.float32), kernel.ndim, channel_axis)
    scaled = kernel / scale
    frac = scaled - np.floor(scaled)
    frac = np.clip(frac, 1e-4, 1 - 1e-4)
    ratio = (frac - ADAROUND_GAMMA) / (ADAROUND_ZETA - ADAROUND_GAMMA)
    return np.log(ratio / (1 - ratio)).astype(np.float32)


# --- TensorFlow (fake quantization with straight-through estimators) -------


def round_ste(x):
    """Round half to even forward, identity gradient backward."""
    return x + tf.stop_gradient(tf.round(x) - x)


def tf_quantize(x, scale, zero_point, qmin, qmax):
    """The TF twin of `quantize`: the integer levels q, held in float32."""
    return tf.clip_by_value(tf.round(x / scale) + zero_point, float(qmin), float(qmax))


def tf_fake_quantize(x, scale, zero_point, qmin, qmax):
    """The TF twin of `fake_quantize` (exact same float32 operations).

    Gradients flow straight through the rounding (LSQ-style), so `scale`
    and `zero_point` receive gradients when they are derived from trainable
    clip values.
    """
    q = tf.clip_by_value(round_ste(x / scale) + zero_point, float(qmin), float(qmax))
    return (q - zero_point) * scale


def tf_activation_params(clip_min, clip_max, qmin, qmax):
    """Differentiable `activation_params`: scale and (STE-rounded) zero point."""
    lo = tf.minimum(clip_min, 0.0)
    hi = tf.maximum(tf.maximum(clip_max, 0.0), lo + 1e-8)
    scale = (hi - lo) / float(qmax - qmin)
    zero_point = tf.clip_by_value(
        float(qmin) - round_ste(lo / scale), float(qmin), float(qmax)
    )
    return scale, zero_point


def adaround_h(v):
    """AdaRound's rectified sigmoid, in [0, 1]."""
    return tf.clip_by_value(
        tf.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0.0, 1.0
    )


def adaround_regularizer(v, beta):
    """`sum(1 - |2 h(V) - 1| ** beta)`: pushes every h(V) to 0 or 1."""
    return tf.reduce_sum(1.0 - tf.pow(tf.abs(2.0 * adaround_h(v) - 1.0), beta))
