"""Keras graph -> ONNX: the float, fake-quant and deploy models.

The exporter walks the model's layer graph and writes each layer as ONNX
nodes itself, so the quantization nodes carry exactly the factors of the
record (no converter re-derives a scale from a min/max). Image tensors are
kept in NCHW between convolutions (one Transpose after the NHWC input, and
back to NHWC only where Keras' layout matters: Flatten, Reshape, Dense on
images, layers exported through tf2onnx). A layer with no handler here is
converted on its own with `tf2onnx.convert.from_function` and spliced in (it
stays float), and the log names it.

Modes, for each quantized layer (`QuantizedLayer`, frozen):

- "fake_quant": `QuantizeLinear -> DequantizeLinear` on the input (int8,
  scale_d, offset_d) and on the weights (float initializer holding
  `w_int * scale_w`, int8/int4 per-channel QuantizeLinear), dequantized to
  the integer levels (scale 1), a float Conv / MatMul, then
  `Mul(scale_d * scale_w) -> Add(bias)`: the fake-quant product with the
  scales applied after the sums, so every partial sum is an exact integer
  and ONNX Runtime computes bitwise what the TF simulation and the deploy
  model compute.
- "deploy": int8 (or int4, cast to int8) weight initializers with BatchNorm
  folded; the input is quantized to 8 bits and the layer runs as
  `ConvInteger` / `MatMulInteger` (8-bit x int8 -> int32, an integer kernel
  in ONNX Runtime), then `Cast -> Mul(scale_d * scale_w) -> Add(bias)`: the
  AMCT quant / integer conv / dequant sequence.
- "float": the float model, for reference (size, ONNX-vs-Keras checks).

The deploy model's activations are int8 or uint8 (`activation_dtype`); the
two give bit-identical logits. The uint8 model quantizes with the zero point
`offset_d + 128`, so its `QuantizeLinear` yields `x_q + 128` and the integer
op subtracts `offset_d + 128`: `x_u - z_u == x_q - z_d` exactly. They differ
only in which ONNX Runtime kernel runs:

- "int8" (int8 x int8, S8S8): both operands signed and the weights within
  -127..127, so no pair of products can saturate the 16-bit sums of AVX2's
  `vpmaddubsw`, the failure of uint8 x int8 kernels on x86 CPUs without
  VNNI. Correct everywhere, but ONNX Runtime has no fast S8S8 kernel on x86:
  on an AVX-512 VNNI CPU it ran 2.8-3.8x slower than the float model at
  batch 32.
- "uint8" (uint8 x int8, U8S8): ONNX Runtime's VNNI kernel (`vpdpbusd`
  sums four u8 x s8 products into int32, nothing saturates): a fraction of
  the float model's time (0.27x at batch 32 there). On x86 without VNNI
  (plain AVX2) the same model runs through `vpmaddubsw` and loses accuracy.

`deploy_activation_dtype("auto")` picks uint8 on x86-64 CPUs with VNNI
(`avx512_vnni` or `avx_vnni` among the CPU flags, see `util/cpu.py`) and int8 elsewhere, also where
the CPU flags cannot be read. The choice follows the CPU that builds the
model: pass "int8" or "uint8" explicitly to target another deployment CPU.
"""

import logging
import platform

import onnx
from onnx import TensorProto, helper

from knowledge_distillation.quant import quantize_graph
from knowledge_distillation.quant.quantize_layers import QuantizedLayer
from knowledge_distillation.quant.quantize_onnx_builder import (
    IR_VERSION,
    KERAS,
    Builder,
    Unsupported,
    fallback,
)
from knowledge_distillation.quant.quantize_onnx_layers import HANDLERS
from knowledge_distillation.util import cpu as cpu_info
from knowledge_distillation.util.files import atomic_write

logger = logging.getLogger(__name__)

MODES = ("float", "fake_quant", "deploy")
ACTIVATION_DTYPES = ("int8", "uint8")  # of the deploy model's integer ops
DEPLOY_FORMATS = ("qdq", "integer")


# --- export -----------------------------------------------------------------


def _value_info(name, shape, elem_type=TensorProto.FLOAT):
    dims = ["N"] + [d if d is not None else f"d{i}" for i, d in enumerate(shape[1:], start=1)]
    return helper.make_tensor_value_info(name, elem_type, dims)


def _check_choice(value, allowed, what):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


def build_onnx(keras_model, mode, name=None, activation_dtype="int8", deploy_format="integer"):
    """Converts a (frozen quantized, or float) Keras model to an ONNX model.

    Args:
        keras_model: a functional/sequential Keras model with one input and
            one output; in "fake_quant" and "deploy" mode, usually
            `QuantizedModel.keras_model` after distillation.
        mode: "float", "fake_quant" or "deploy".
        name: the ONNX graph name. Defaults to the model's name.
        activation_dtype: "int8" or "uint8", the deploy model's quantized
            activations (see the module docstring and
            `deploy_activation_dtype`); the logits are the same. Other
            modes take only the default, "int8".
        deploy_format: the deploy model's form, "integer" (ConvInteger /
            MatMulInteger with a float epilogue) or "qdq" (DequantizeLinear
            on int8/int4 weights, int32 bias and quantized inputs, then the
            float op, which ONNX Runtime fuses into QLinearConv / QGemm).
            Other modes take only the default, "integer".

    Returns:
        A checked `onnx.ModelProto` (opset 21, IR 10): input NHWC float32
        images named like the Keras input, output the model's output.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    _check_choice(activation_dtype, ACTIVATION_DTYPES, "activation_dtype")
    if mode != "deploy" and activation_dtype != "int8":
        raise ValueError(f"activation_dtype {activation_dtype!r} applies to the deploy model "
                         f"only, not to the {mode} model")
    _check_choice(deploy_format, DEPLOY_FORMATS, "deploy_format")
    if mode != "deploy" and deploy_format != "integer":
        raise ValueError(f"deploy_format {deploy_format!r} applies to the deploy model "
                         f"only, not to the {mode} model")
    graph = quantize_graph.Graph(keras_model)
    b = Builder(activation_dtype, deploy_format)
    input_name = b.unique(graph.input_tensor._keras_history[0].name)
    output_name = b.unique("output")
    b.set(graph.input_id, input_name, KERAS, len(graph.input_tensor.shape))
    for node in graph.nodes:
        handler = next((h for cls, h in HANDLERS.items() if type(node.layer) is cls), None)
        if handler is None:
            fallback(b, node, mode, "no native handler")
            continue
        try:
            handler(b, node, mode)
        except Unsupported as e:
            if isinstance(node.layer, QuantizedLayer):
                raise ValueError(f"quantized layer {node.name}: {e}") from e
            fallback(b, node, mode, str(e))
    if mode != "float":
        quantized = [n for n in graph.nodes if isinstance(n.layer, QuantizedLayer)]
        if not quantized:
            raise ValueError(f"model {keras_model.name!r} has no quantized layer to export")
    for layer in b.fallbacks:
        logger.info("ONNX %s model: %s exported through tf2onnx, in float", mode, layer)
    if b.unfused_bias:
        logger.info("ONNX QDQ deploy model: the bias of %s does not fit int32 at scale "
                    "scale_d * scale_w (a channel with almost no weight); kept in float, so "
                    "ONNX Runtime runs these layers unfused", ", ".join(b.unfused_bias))
    b.nodes.append(helper.make_node("Identity", [b.get(graph.output_id, KERAS)], [output_name],
                                    name=output_name))
    onnx_graph = helper.make_graph(
        b.nodes, name or keras_model.name,
        [_value_info(input_name, graph.input_tensor.shape)],
        [_value_info(output_name, graph.output_tensor.shape)],
        b.initializers)
    model = helper.make_model(
        onnx_graph,
        opset_imports=[helper.make_opsetid(domain, version) for domain, version in b.domains.items()],
        ir_version=IR_VERSION,
        producer_name="knowledge_distillation.quant",
        doc_string=f"{mode} model of {keras_model.name}"
                   + (f" ({deploy_format}, {activation_dtype} activations)"
                      if mode == "deploy" else ""))
    onnx.checker.check_model(model, full_check=True)
    return model


def save_onnx(model, path):
    """Writes an ONNX model atomically; returns its size in bytes."""
    data = model.SerializeToString()
    atomic_write(path, data)
    return len(data)


# --- deploy activation signedness ---------------------------------------------


def check_requested_activation_dtype(requested):
    """Raises ValueError unless `requested` is "auto", "int8" or "uint8"."""
    _check_choice(requested, ("auto",) + ACTIVATION_DTYPES, "deploy activation dtype")


def _describe_cpu(cpu_flags, machine):
    """`(x86, flags, vnni, words)` of the CPU: flags None where they cannot be read."""
    machine = platform.machine() if machine is None else machine
    x86 = cpu_info.is_x86_64(machine)
    flags = cpu_info.read_cpu_flags() if cpu_flags is None else frozenset(cpu_flags)
    vnni = cpu_info.vnni_flags(flags)
    if not x86:
        words = f"{machine or 'unknown'} CPU, not x86-64"
    elif flags is None:
        words = "x86-64 CPU whose flags cannot be read"
    elif vnni:
        words = f"x86-64 CPU with {'/'.join(vnni)}"
    else:
        words = "x86-64 CPU without VNNI"
    return x86, flags, vnni, words


def check_requested_deploy_format(requested):
    """Raises ValueError unless `requested` is "auto", "qdq" or "integer"."""
    _check_choice(requested, ("auto",) + DEPLOY_FORMATS, "deploy format")


def resolve_deploy_format(requested="auto", cpu_flags=None, machine=None):
    """The deploy model's form, "qdq" or "integer", for this CPU; logs the choice.

    "auto" is "qdq" on an x86-64 CPU with VNNI and on other architectures:
    ONNX Runtime fuses it into QLinearConv / QGemm, several times faster
    than the integer form (whose ConvInteger runs on a slow portable kernel)
    and than float. On x86-64 without VNNI (or with unreadable flags) it is
    "integer" with int8 activations: the fused kernels take uint8 x int8 there
    and can saturate 16-bit sums (onnxruntime issue #16105, wrong
    QLinearConv output on an AVX2 AMD CPU), while int8 x int8 ConvInteger is
    exact. An explicit "qdq" on such a CPU is honoured with a warning.
    """
    check_requested_deploy_format(requested)
    x86, flags, vnni, cpu = _describe_cpu(cpu_flags, machine)
    risky = x86 and not vnni
    if requested == "auto":
        if risky:
            chosen, reason = "integer", ("ONNX Runtime's fused QDQ kernels can saturate 16-bit "
                                         "sums without VNNI; ConvInteger int8 x int8 is exact")
        else:
            chosen, reason = "qdq", "ONNX Runtime fuses it into QLinearConv / QGemm, exact here"
        logger.info("deploy model: %s format (auto: %s; %s)", chosen, cpu, reason)
        return chosen
    if requested == "qdq" and risky:
        logger.warning(
            "deploy model: qdq format as requested, but this is an %s: ONNX Runtime's fused "
            "QLinearConv can saturate its 16-bit sums here and lose accuracy (fine on a VNNI "
            "CPU and on TensorRT/OpenVINO); --deploy_format=integer is exact on any CPU", cpu)
    else:
        logger.info("deploy model: %s format (requested; %s)", requested, cpu)
    return requested


def deploy_activation_dtype(requested="auto", cpu_flags=None, machine=None, deploy_format="integer"):
    """The deploy model's activation dtype, "int8" or "uint8", for this CPU.

    "auto" is "uint8" on an x86-64 CPU with VNNI (ONNX Runtime's fast U8S8
    kernel; its S8S8 kernel is several times slower than float there) and
    "int8" elsewhere: without VNNI, x86 U8S8 kernels saturate 16-bit sums
    and lose accuracy. Logs the choice and its reason (one line).

    Args:
        requested: "auto", "int8" or "uint8". An explicit value is honoured;
            "uint8" on an x86 CPU known to lack VNNI logs a warning (the
            model may be meant for another CPU).
        cpu_flags: the CPU's flags (an iterable of names such as
            "avx512_vnni"), or None to read them from the running CPU (None
            there too, e.g. off Linux: unknown, and "auto" is "int8").
        machine: `platform.machine()` to assume; defaults to this one's.
        deploy_format: the deploy model's form; with "qdq", "auto" is
            "int8" (ORT's recommended S8S8 QDQ; in one probe here, an
            untrained MobileNetV2 at 32x32, batch 32: 15 ms against 19 ms
            with uint8).
    """
    check_requested_activation_dtype(requested)
    x86, flags, vnni, cpu = _describe_cpu(cpu_flags, machine)
    if requested == "auto" and deploy_format == "qdq":
        logger.info("deploy model: int8 activations (auto, QDQ format: ONNX Runtime's "
                    "recommended S8S8; it picks its own kernel)")
        return "int8"
    if requested == "auto":
        if x86 and vnni:
            chosen, reason = "uint8", "ONNX Runtime's VNNI uint8 x int8 kernel, exact and fast"
        elif x86 and flags is not None:
            chosen, reason = "int8", "uint8 x int8 kernels saturate 16-bit sums without VNNI"
        else:
            chosen, reason = "int8", "signed int8 x int8 is exact on any kernel"
        logger.info("deploy model: %s activations (auto: %s; %s)", chosen, cpu, reason)
        return chosen
    if requested == "uint8" and x86 and flags is not None and not vnni:
        logger.warning(
            "deploy model: uint8 activations as requested, but this is an %s: ONNX Runtime's "
            "uint8 x int8 kernels can saturate their 16-bit sums here and lose accuracy (fine "
            "on a VNNI CPU); int8 activations are exact on any CPU", cpu)
    else:
        logger.info("deploy model: %s activations (requested; %s)", requested, cpu)
    return requested
