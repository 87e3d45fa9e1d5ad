"""Ascend fusion switches (`fusion_switch.cfg`) as TensorFlow optimizer options.

Ascend fuses ops at two levels: graph fusion (rewrites such as Conv + BiasAdd
into one op) and UB fusion (a matrix op and its element-wise epilogue share
on-chip buffers). TensorFlow's nearest equivalents are Grappler passes:
`remapping` fuses Conv/MatMul with BiasAdd, BatchNorm and activations (and
the oneDNN kernels on CPU), `arithmetic_optimization` rewrites and merges
arithmetic, `layout_optimizer` moves data layouts; and XLA fuses whatever it
clusters. Grappler cannot switch single patterns, so a named Ascend pass
switches off the Grappler pass doing that kind of rewrite, and any fusion
switched off also switches XLA off (it would fuse the same ops again).
"""

import dataclasses
import logging

import tensorflow as tf

from knowledge_distillation.util.files import read_json_file

logger = logging.getLogger(__name__)

# Grappler passes a fusion_switch.cfg may also name directly.
GRAPPLER_PASSES = (
    "remapping",
    "arithmetic_optimization",
    "layout_optimizer",
    "constant_folding",
    "shape_optimization",
    "loop_optimization",
    "dependency_optimization",
    "function_optimization",
    "debug_stripper",
    "scoped_allocator_optimization",
    "pin_to_host_optimization",
    "implementation_selector",
)
_ALL_OFF = {
    "GraphFusion": ("remapping", "arithmetic_optimization", "layout_optimizer"),
    "UBFusion": ("remapping",),
}
# Ascend pass names are matched by what they fuse, first rule first.
_KEYWORD_RULES = (
    (("transpose", "transdata", "format", "layout", "nchw", "nhwc"), "layout_optimizer"),
    (
        (
            "conv", "matmul", "fullyconnection", "batchnorm", "bn", "bias",
            "relu", "eltwise", "softmax", "gelu", "swish", "layernorm",
            "sigmoid", "elu", "dequant", "requant", "quant",
        ),
        "remapping",
    ),
    (
        ("mul", "add", "sub", "div", "reduce", "square", "sqrt", "pow", "concat",
         "split", "pad", "cast", "slice"),
        "arithmetic_optimization",
    ),
)


@dataclasses.dataclass(frozen=True)
class FusionPlan:
    """What a fusion switch file turns off on GPU/CPU.

    Attributes:
        passes_off: Grappler passes switched off, sorted.
        xla_off: whether XLA (auto-clustering and `jit_compile`) is off.
        mapping: `(section, name, grappler_pass)` for each switch that was off.
        unmapped: `(section, name)` switched off with no TensorFlow equivalent.
    """

    passes_off: tuple = ()
    xla_off: bool = False
    mapping: tuple = ()
    unmapped: tuple = ()


def _grappler_pass_for(name):
    if name in GRAPPLER_PASSES:
        return name
    lowered = name.lower()
    for keywords, grappler_pass in _KEYWORD_RULES:
        if any(k in lowered for k in keywords):
            return grappler_pass
    return None


def parse_fusion_switch(data, path, map_passes=True):
    """Validates a `fusion_switch.cfg` document and maps it to Grappler.

    Args:
        data: the parsed JSON, `{"Switch": {"GraphFusion": {...},
            "UBFusion": {...}}}` with `"on"`/`"off"` values.
        path: the file, for error messages.
        map_passes: if False, only validate (on Ascend, CANN reads the file).

    Returns:
        A `FusionPlan`.
    """
    where = f"--fusion_off_file={path}"
    switch = data.get("Switch") if isinstance(data, dict) else None
    if not isinstance(switch, dict) or set(data) != {"Switch"}:
        raise ValueError(
            f'{where}: expected {{"Switch": {{"GraphFusion": {{...}}, '
            f'"UBFusion": {{...}}}}}}, got {data!r}'
        )
    unknown = sorted(set(switch) - set(_ALL_OFF))
    if unknown:
        raise ValueError(
            f"{where}: unknown section(s) {unknown}; expected GraphFusion, UBFusion"
        )
    passes, mapping, unmapped = set(), [], []
    for section, body in switch.items():
        if not isinstance(body, dict):
            raise ValueError(
                f'{where}: "{section}" must map pass names to "on"/"off", got {body!r}'
            )
        for name, value in body.items():
            if not isinstance(value, str) or value.lower() not in ("on", "off"):
                raise ValueError(
                    f'{where}: "{section}"."{name}" must be "on" or "off", got {value!r}'
                )
            if value.lower() == "on" or not map_passes:
                continue  # fusions are on by default
            if name == "ALL":
                targets = _ALL_OFF[section]
            else:
                target = _grappler_pass_for(name)
                if target is None:
                    unmapped.append((section, name))
                    continue
                targets = (target,)
            passes.update(targets)
            mapping.extend((section, name, t) for t in targets)
    return FusionPlan(
        passes_off=tuple(sorted(passes)),
        xla_off=bool(passes or unmapped),
        mapping=tuple(mapping),
        unmapped=tuple(unmapped),
    )


def load_fusion_switch(path, map_passes=True):
    """Reads and parses `path`; see `parse_fusion_switch`."""
    return parse_fusion_switch(
        read_json_file(path, "fusion_off_file"), path, map_passes=map_passes
    )


class FusionSwitcher:
    """Applies a `FusionPlan` to TensorFlow and can undo it.

    TensorFlow's optimizer options are process-global; keeping what was
    changed lets a second `setup_device` in the same process (tests, a
    notebook) start from the defaults again.
    """

    def __init__(self):
        self._restore_passes = ()
        self._restore_jit = None

    def reset(self):
        if self._restore_passes:
            tf.config.optimizer.set_experimental_options(
                {name: True for name in self._restore_passes}
            )
        if self._restore_jit is not None:
            tf.config.optimizer.set_jit(self._restore_jit)
        self._restore_passes, self._restore_jit = (), None

    def apply(self, plan, path):
        self.reset()
        for section, name in plan.unmapped:
            logger.warning(
                "--fusion_off_file=%s: %s pass %s has no TensorFlow equivalent; "
                "only XLA is switched off for it",
                path,
                section,
                name,
            )
        for section, name, grappler_pass in plan.mapping:
            logger.info(
                "fusion switch: %s %s off -> Grappler %s off", section, name, grappler_pass
            )
        if plan.passes_off:
            tf.config.optimizer.set_experimental_options(
                {name: False for name in plan.passes_off}
            )
            self._restore_passes = plan.passes_off
        if plan.xla_off:
            self._restore_jit = tf.config.optimizer.get_jit() or False
            tf.config.optimizer.set_jit(False)
        logger.info(
            "--fusion_off_flag: Grappler passes off: %s; XLA %s",
            ", ".join(plan.passes_off) or "none",
            "off (auto-clustering and jit_compile)" if plan.xla_off else "unchanged",
        )
