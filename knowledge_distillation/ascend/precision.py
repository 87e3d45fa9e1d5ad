"""Ascend precision modes and mixlists as per-layer Keras dtype policies.

Ascend decides precision per *op*; Keras decides it per *layer* (one compute
dtype for everything a layer emits). So each Keras layer class is mapped to
the TensorFlow op types it emits, and the Ascend rules are applied to that set:

- `must_keep_origin_dtype`: nothing changes.
- `allow_fp32_to_fp16`: matrix ops (Conv, MatMul, Einsum) go low precision,
  vector ops keep float32.
- `allow_mix_precision`: white-list ops go low precision, black-list ops keep
  float32, gray ops follow their input ("the previous op"), as in Ascend's
  built-in lists; `--use_mixlist` edits the lists from an `ops_info.json`.
- `force_fp16`: every floating-point layer goes low precision, even one a
  user pinned to float32.
- `force_fp32`: every floating-point layer computes in float32, even one a
  user built in low precision.
- `allow_mix_precision_bf16`, `allow_fp32_to_bf16`: the rules of
  `allow_mix_precision` and `allow_fp32_to_fp16`, with bfloat16 as the low
  precision on every device (no loss scaling).

"Low precision" is the Keras mixed policy: float32 variables, float16 compute
on GPU (with dynamic loss scaling), bfloat16 on CPU (same range as float32,
no loss scaling needed).
"""

import dataclasses
import logging

from knowledge_distillation import compat
from knowledge_distillation.compat import keras


logger = logging.getLogger(__name__)

# Op types of the matrix ("cube") units: low precision under allow_fp32_to_fp16
# and the default white list of allow_mix_precision.
MATRIX_OPS = frozenset(
    {
        "Conv2D",
        "Conv3D",
        "DepthwiseConv2dNative",
        "Conv2DBackpropInput",
        "Conv3DBackpropInputV2",
        "MatMul",
        "BatchMatMulV2",
        "Einsum",
    }
)
# Numerically sensitive ops kept float32 by default (Keras' own mixed-precision
# guidance for the final softmax); a mixlist can move them.
DEFAULT_BLACK_OPS = frozenset({"Softmax", "LogSoftmax"})

_ACTIVATION_OPS = {
    "relu": ("Relu",),
    "relu6": ("Relu6",),
    "leaky_relu": ("LeakyRelu",),
    "elu": ("Elu",),
    "selu": ("Selu",),
    "gelu": ("Gelu",),
    "sigmoid": ("Sigmoid",),
    "hard_sigmoid": ("HardSigmoid",),
    "silu": ("Swish",),
    "swish": ("Swish",),
    "tanh": ("Tanh",),
    "softmax": ("Softmax",),
    "log_softmax": ("LogSoftmax",),
    "softplus": ("Softplus",),
    "softsign": ("Softsign",),
    "exponential": ("Exp",),
    "linear": (),
}

_layers = compat.layer_classes
# (layer classes, op types of the layer itself); the first match wins, so
# subclasses come before their bases. Bias and `activation=` ops are added by
# `layer_op_types`. A class this Keras lacks is left out.
_LAYER_OPS = (
    (_layers("SeparableConv1D", "SeparableConv2D"), ("DepthwiseConv2dNative", "Conv2D")),
    (_layers("DepthwiseConv1D", "DepthwiseConv2D"), ("DepthwiseConv2dNative",)),
    (_layers("Conv1DTranspose", "Conv2DTranspose"), ("Conv2DBackpropInput",)),
    (_layers("Conv3DTranspose"), ("Conv3DBackpropInputV2",)),
    (_layers("Conv3D"), ("Conv3D",)),
    # TensorFlow runs a 1-D convolution as Conv2D on an expanded input.
    (_layers("Conv1D", "Conv2D"), ("Conv2D",)),
    (_layers("Dense"), ("MatMul",)),
    (_layers("EinsumDense"), ("Einsum",)),
    (_layers("BatchNormalization"), ("FusedBatchNormV3",)),
    (_layers("LayerNormalization"), ("LayerNorm",)),
    (_layers("LeakyReLU"), ("LeakyRelu",)),
    (_layers("PReLU"), ("PRelu",)),
    (_layers("ELU"), ("Elu",)),
    (_layers("Softmax"), ("Softmax",)),
    (_layers("MaxPooling1D", "MaxPooling2D"), ("MaxPool",)),
    (_layers("MaxPooling3D"), ("MaxPool3D",)),
    (_layers("AveragePooling1D", "AveragePooling2D"), ("AvgPool",)),
    (_layers("AveragePooling3D"), ("AvgPool3D",)),
    (
        _layers("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D"),
        ("Mean",),
    ),
    (_layers("GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D"), ("Max",)),
    (_layers("Flatten", "Reshape"), ("Reshape",)),
    (_layers("Permute"), ("Transpose",)),
    (_layers("Add"), ("AddV2",)),
    (_layers("Subtract"), ("Sub",)),
    (_layers("Multiply"), ("Mul",)),
    (_layers("Concatenate"), ("ConcatV2",)),
    (_layers("Maximum"), ("Maximum",)),
    (_layers("Minimum"), ("Minimum",)),
    (_layers("ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D"), ("Pad",)),
    (_layers("Rescaling"), ("Mul", "AddV2")),
    (_layers("Embedding"), ("GatherV2",)),
)

# Ascend spellings of the same ops, so an ops_info.json written for Ascend
# works unchanged.
OP_ALIASES = {
    "MatMulV2": "MatMul",
    "BatchMatMul": "BatchMatMulV2",
    "SoftmaxV2": "Softmax",
    "FusedBatchNorm": "FusedBatchNormV3",
    "FusedBatchNormV2": "FusedBatchNormV3",
    "BNTrainingReduce": "FusedBatchNormV3",
    "BNTrainingUpdate": "FusedBatchNormV3",
    "BNInfer": "FusedBatchNormV3",
    "DepthwiseConv2D": "DepthwiseConv2dNative",
    "Add": "AddV2",
    "ConcatD": "ConcatV2",
    "ReduceMean": "Mean",
    "ReduceMeanD": "Mean",
    "ReduceMax": "Max",
    "ReduceMaxD": "Max",
    "PadD": "Pad",
    "GatherV2D": "GatherV2",
    "TransposeD": "Transpose",
    "LayerNormV3": "LayerNorm",
}

_MIXLIST_SECTIONS = ("black-list", "white-list", "gray-list")
_MIXLIST_ACTIONS = ("to-add", "to-remove")


def known_op_types():
    """Every op type a mixlist may name on GPU/CPU, sorted."""
    ops = set(MATRIX_OPS) | set(DEFAULT_BLACK_OPS) | set(OP_ALIASES)
    ops |= {"BiasAdd"}
    for _, layer_ops in _LAYER_OPS:
        ops.update(layer_ops)
    for activation_ops in _ACTIVATION_OPS.values():
        ops.update(activation_ops)
    return sorted(ops)


def layer_op_types(layer):
    """The TensorFlow op types `layer` emits, as a frozenset (may be empty)."""
    ops = set()
    for classes, layer_ops in _LAYER_OPS:
        if isinstance(layer, classes):
            ops.update(layer_ops)
            break
    if isinstance(layer, keras.layers.ReLU):
        ops.add("LeakyRelu" if compat.leaky_slope(layer) else "Relu")
    if getattr(layer, "use_bias", False) and ops & MATRIX_OPS:
        ops.add("BiasAdd")
    activation = getattr(layer, "activation", None)
    if activation is not None:
        name = getattr(activation, "__name__", str(activation))
        ops.update(_ACTIVATION_OPS.get(name, ()))
    return frozenset(ops)


@dataclasses.dataclass(frozen=True)
class MixList:
    """Ascend precision lists by op type: white = low, black = float32."""

    white: frozenset = MATRIX_OPS
    black: frozenset = DEFAULT_BLACK_OPS
    gray: frozenset = frozenset()


def parse_mixlist(data, path, check_op_types=True):
    """Validates an `ops_info.json` document and applies it to the defaults.

    Args:
        data: the parsed JSON.
        path: the file, for error messages.
        check_op_types: if True, op types unknown on GPU/CPU are an error
            (on Ascend, CANN knows its own ops).

    Returns:
        A `MixList`.
    """
    where = f"--mixlist_file={path}"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    unknown_sections = sorted(set(data) - set(_MIXLIST_SECTIONS))
    if unknown_sections:
        raise ValueError(
            f"{where}: unknown section(s) {unknown_sections}; expected "
            f"{', '.join(_MIXLIST_SECTIONS)}"
        )
    lists = {
        "black-list": set(DEFAULT_BLACK_OPS),
        "white-list": set(MATRIX_OPS),
        "gray-list": set(),
    }
    added = {}
    known = set(known_op_types())
    for section in _MIXLIST_SECTIONS:
        body = data.get(section, {})
        if not isinstance(body, dict) or set(body) - set(_MIXLIST_ACTIONS):
            raise ValueError(
                f'{where}: "{section}" must be an object with "to-add" and/or '
                f'"to-remove" lists, got {body!r}'
            )
        for action in _MIXLIST_ACTIONS:
            ops = body.get(action, [])
            if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
                raise ValueError(
                    f'{where}: "{section}"."{action}" must be a list of op type '
                    f"strings, got {ops!r}"
                )
            if check_op_types:
                unknown = sorted(set(ops) - known)
                if unknown:
                    raise ValueError(
                        f"{where}: unknown op type(s) {unknown} in "
                        f'"{section}"."{action}". Known op types: '
                        f"{', '.join(sorted(known))}"
                    )
            canonical = [OP_ALIASES.get(o, o) for o in ops]
            if action == "to-remove":
                lists[section].difference_update(canonical)
                continue
            for op in canonical:
                if op in added and added[op] != section:
                    raise ValueError(
                        f"{where}: op type {op} is added to both "
                        f'"{added[op]}" and "{section}"'
                    )
                added[op] = section
                for other in lists.values():
                    other.discard(op)
                lists[section].add(op)
    return MixList(
        white=frozenset(lists["white-list"]),
        black=frozenset(lists["black-list"]),
        gray=frozenset(lists["gray-list"]),
    )


def low_precision_policy(has_gpu):
    """The Keras mixed policy for this machine's low precision."""
    return "mixed_float16" if has_gpu else "mixed_bfloat16"


# Modes that name their low dtype: their base mode's rules, in bfloat16.
BF16_MODES = {
    "allow_mix_precision_bf16": "allow_mix_precision",
    "allow_fp32_to_bf16": "allow_fp32_to_fp16",
}
# Modes that keep every layer in float32 (or as built): no low precision.
FLOAT32_MODES = ("must_keep_origin_dtype", "force_fp32")


def base_mode(mode):
    """The mode whose layer rules `mode` follows (itself for all but the bf16 modes)."""
    return BF16_MODES.get(mode, mode)


def mode_low_policy(mode, low_policy):
    """The low-precision policy under `mode`: bfloat16 for the bf16 modes, else the machine's."""
    return "mixed_bfloat16" if mode in BF16_MODES else low_policy


def run_compute(session, mode):
    """What a run's layers train in under `mode` on this host, for `run.json`.

    The global policy, or for the modes that lower single layers under a
    float32 global policy (`allow_fp32_to_fp16`, `allow_fp32_to_bf16`), the
    policy of those layers too; `"npu_device"` on Ascend, where CANN applies
    the mode.
    """
    if session.on_npu:
        return "npu_device"
    policy = keras.mixed_precision.global_policy().name
    low = session.low_policy
    if mode in FLOAT32_MODES or policy != "float32" or low in (None, "float32"):
        return policy
    return f"float32 with {low} layers"


def global_policy_for(mode, low_policy):
    """Global policy models are built under, before per-layer overrides."""
    if base_mode(mode) in ("allow_mix_precision", "force_fp16"):
        return low_policy
    return "float32"


def _is_container(layer):
    return isinstance(layer, (keras.Model, keras.layers.InputLayer))


def _ordered_layers(model):
    """Every non-container layer, parents before the layers they feed."""
    out = []

    def visit(layer):
        if isinstance(layer, keras.layers.InputLayer):
            return
        if isinstance(layer, keras.Model):
            for child in layer.layers:
                visit(child)
            return
        out.append(layer)
        for child in layer._flatten_layers(include_self=False, recursive=False):
            visit(child)

    visit(model)
    seen = set()
    return [l for l in out if not (id(l) in seen or seen.add(id(l)))]


def _upstream_layers(layer):
    """Layers feeding `layer` in a functional graph; None when unknown."""
    return compat.inbound_layers(layer)


def plan_layer_policies(model, mode, low_policy, mixlist=None):
    """Decides every layer's dtype policy for an Ascend precision mode.

    Args:
        model: a Keras model (a Distiller's teacher and student included).
        mode: one of `config.PRECISION_MODES`.
        low_policy: `"mixed_float16"`, `"mixed_bfloat16"` or `"float32"`.
        mixlist: a `MixList` for allow_mix_precision; defaults to the
            built-in lists.

    Returns:
        A list of `(layer, policy_name, reason)`; empty for
        must_keep_origin_dtype.
    """
    if mode == "must_keep_origin_dtype":
        return []
    mode = base_mode(mode)
    mixlist = mixlist or MixList()
    plan = []
    decided = {}
    previous_low = False
    for layer in _ordered_layers(model):
        if not _is_floating(layer):
            continue
        ops = layer_op_types(layer)
        if mode == "force_fp16":
            low, reason = True, "force_fp16"
        elif mode == "force_fp32":
            low, reason = False, "force_fp32"
        elif mode == "allow_fp32_to_fp16":
            matrix = sorted(ops & MATRIX_OPS)
            low = bool(matrix)
            reason = f"matrix op {matrix[0]}" if low else "vector op keeps float32"
        elif ops & mixlist.black:
            low, reason = False, f"black-list {sorted(ops & mixlist.black)[0]}"
        elif ops & mixlist.white:
            low, reason = True, f"white-list {sorted(ops & mixlist.white)[0]}"
        else:
            upstream = _upstream_layers(layer)
            if upstream is None:
                low = previous_low
            else:
                low = bool(upstream) and all(decided.get(id(u), False) for u in upstream)
            reason = "gray: follows its input"
        decided[id(layer)] = low
        previous_low = low
        plan.append((layer, low_policy if low else "float32", reason))
    return plan


def _is_floating(layer):
    policy = layer.dtype_policy
    if getattr(policy, "quantization_mode", None) is not None:
        return False  # a quantized layer's policy carries its quantization
    return policy.compute_dtype is not None and "float" in policy.compute_dtype


def apply_layer_policies(plan):
    """Sets each planned layer's dtype policy in place; weights are kept.

    Every policy used (float32, mixed_float16, mixed_bfloat16) keeps float32
    variables, so changing it on a built layer leaves its weights untouched.
    """
    for layer, policy, _ in plan:
        if layer.dtype_policy.name != policy:
            compat.set_dtype_policy(layer, policy)


def summarize_plan(plan):
    """One log line: how many layers run low precision and which stay float32."""
    low = [layer.name for layer, policy, _ in plan if policy != "float32"]
    kept = [f"{layer.name} ({reason})" for layer, policy, reason in plan if policy == "float32"]
    return (
        f"{len(low)} layer(s) low precision, {len(kept)} float32"
        + (f": {', '.join(kept)}" if kept else "")
    )
