"""The two AMCT configuration formats.

The *simple config* (`--config_defination`) is protobuf text format, parsed
with protobuf's own `text_format` against `DistillSimpleConfig`, a message
defined here in code (AMCT's field names):

```
batch_num: 2
group_size: 1
distill_group { start_layer_name: "conv1" end_layer_name: "conv2_relu" }
distill_data_quant_config {
  ulq_quantize { clip_max_min { clip_max: 6.0 clip_min: 0.0 } fixed_min: true dst_type: INT8 }
}
distill_weight_quant_config { arq_distill { channel_wise: true dst_type: INT4 } }
quant_skip_layers: "logits"
quant_skip_layer_types: "DepthwiseConv2D"
distill_override_layers {
  layer_name: "conv1"
  distill_weight_quant_config { arq_distill { dst_type: INT8 } }
}
```

The *distill config* (`tmp/distill_config.json`) is what the quantizer
actually does, layer by layer and block by block, in AMCT's JSON shape.
`create_distill_config` makes it from a model and an optional simple config;
it can be edited, saved and read back.
"""

import dataclasses
import json
import os
from typing import Optional

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from knowledge_distillation.quant import quantize_graph
from knowledge_distillation.util.files import atomic_write
from knowledge_distillation.quant.quantize_math import check_dst_type

CONFIG_VERSION = 1
DATA_ALGOS = ("ulq_quantize",)
WEIGHT_ALGOS = ("arq_distill", "ulq_distill")

# --- the simple config message ---------------------------------------------

_PACKAGE = "knowledge_distillation.quant"
_F = descriptor_pb2.FieldDescriptorProto


def _message(file_proto, name, fields):
    msg = file_proto.message_type.add(name=name)
    for number, (field_name, kind, type_name, repeated) in enumerate(fields, start=1):
        field = msg.field.add(
            name=field_name, number=number,
            label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL, type=kind)
        if type_name:
            field.type_name = f".{_PACKAGE}.{type_name}"


def _build_simple_config_class():
    fp = descriptor_pb2.FileDescriptorProto(
        name="knowledge_distillation/quant/distill_simple_config.proto",
        package=_PACKAGE, syntax="proto2")
    enum = fp.enum_type.add(name="DataType")
    enum.value.add(name="INT8", number=0)
    enum.value.add(name="INT4", number=1)
    msg, sub, s, b, f, u, e = (_F.TYPE_MESSAGE, None, _F.TYPE_STRING, _F.TYPE_BOOL,
                               _F.TYPE_FLOAT, _F.TYPE_UINT32, _F.TYPE_ENUM)
    _message(fp, "ClipMaxMin", [("clip_max", f, sub, False), ("clip_min", f, sub, False)])
    _message(fp, "UlqQuantize", [
        ("clip_max_min", msg, "ClipMaxMin", False), ("fixed_min", b, sub, False),
        ("dst_type", e, "DataType", False)])
    _message(fp, "DistillDataQuantConfig", [("ulq_quantize", msg, "UlqQuantize", False)])
    for name in ("ArqDistill", "UlqDistill"):
        _message(fp, name, [("channel_wise", b, sub, False), ("dst_type", e, "DataType", False)])
    _message(fp, "DistillWeightQuantConfig", [
        ("arq_distill", msg, "ArqDistill", False), ("ulq_distill", msg, "UlqDistill", False)])
    _message(fp, "DistillGroup", [
        ("start_layer_name", s, sub, False), ("end_layer_name", s, sub, False)])
    for name, key in (("DistillOverrideLayer", "layer_name"),
                      ("DistillOverrideLayerType", "layer_type")):
        _message(fp, name, [
            (key, s, sub, False),
            ("distill_data_quant_config", msg, "DistillDataQuantConfig", False),
            ("distill_weight_quant_config", msg, "DistillWeightQuantConfig", False)])
    _message(fp, "DistillSimpleConfig", [
        ("batch_num", u, sub, False),
        ("group_size", u, sub, False),
        ("data_dump", b, sub, False),
        ("distill_group", msg, "DistillGroup", True),
        ("distill_data_quant_config", msg, "DistillDataQuantConfig", False),
        ("distill_weight_quant_config", msg, "DistillWeightQuantConfig", False),
        ("distill_override_layers", msg, "DistillOverrideLayer", True),
        ("distill_override_layer_types", msg, "DistillOverrideLayerType", True),
        ("quant_skip_layers", s, sub, True),
        ("quant_skip_layer_types", s, sub, True)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{_PACKAGE}.DistillSimpleConfig"))


DistillSimpleConfig = _build_simple_config_class()


def _line_of(text, needle):
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    return None


def _config_error(source, text, needle, message):
    line = _line_of(text, needle) if needle else None
    where = f"{source}:{line}" if line else source
    return ValueError(f"{where}: {message}")


def parse_simple_config(text, source="<config>"):
    """Parses AMCT simple-config text into a `DistillSimpleConfig`.

    Args:
        text: protobuf text format.
        source: name used in error messages (the file path).

    Returns:
        A `DistillSimpleConfig` message.

    Raises:
        ValueError: `"<source>:<line>:<column> : <what>"` for a syntax error or
            an unknown field, `"<source>:<line>: <what>"` for a bad value.
    """
    message = DistillSimpleConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ValueError(f"{source}:{e}") from e
    if message.HasField("group_size") and message.group_size < 1:
        raise _config_error(source, text, "group_size", f"group_size must be >= 1, got {message.group_size}")
    if message.HasField("batch_num") and message.batch_num < 1:
        raise _config_error(source, text, "batch_num", f"batch_num must be >= 1, got {message.batch_num}")
    data_configs = [("distill_data_quant_config", message.distill_data_quant_config)]
    weight_configs = [("distill_weight_quant_config", message.distill_weight_quant_config)]
    for override in list(message.distill_override_layers) + list(message.distill_override_layer_types):
        data_configs.append(("distill_data_quant_config", override.distill_data_quant_config))
        weight_configs.append(("distill_weight_quant_config", override.distill_weight_quant_config))
    for field, data in data_configs:
        ulq = data.ulq_quantize
        if ulq.HasField("dst_type") and ulq.dst_type != 0:
            raise _config_error(source, text, "INT4",
                                f"{field}.ulq_quantize.dst_type: activations are INT8 only, got INT4")
        if ulq.HasField("clip_max_min"):
            clip = ulq.clip_max_min
            if not (clip.HasField("clip_max") and clip.HasField("clip_min")):
                raise _config_error(source, text, "clip_max_min",
                                    "clip_max_min needs both clip_max and clip_min")
            if not clip.clip_min <= 0.0 < clip.clip_max:
                raise _config_error(
                    source, text, "clip_max",
                    f"clip_max_min must satisfy clip_min <= 0 < clip_max, got "
                    f"clip_min {clip.clip_min} clip_max {clip.clip_max}")
    for field, weights in weight_configs:
        if weights.HasField("arq_distill") and weights.HasField("ulq_distill"):
            raise _config_error(source, text, "ulq_distill",
                                f"{field} sets both arq_distill and ulq_distill; choose one")
    for override in message.distill_override_layers:
        if not override.layer_name:
            raise _config_error(source, text, "distill_override_layers",
                                "distill_override_layers needs layer_name")
    for override in message.distill_override_layer_types:
        if not override.layer_type:
            raise _config_error(source, text, "distill_override_layer_types",
                                "distill_override_layer_types needs layer_type")
    for group in message.distill_group:
        if not (group.start_layer_name and group.end_layer_name):
            raise _config_error(source, text, "distill_group",
                                "distill_group needs start_layer_name and end_layer_name")
    return message


def load_simple_config(path):
    """Reads and parses a simple-config file (see `parse_simple_config`)."""
    if not os.path.isfile(path):
        raise ValueError(f"--config_defination: {path} does not exist")
    with open(path) as f:
        text = f.read()
    return parse_simple_config(text, source=path), text


# --- the distill config (JSON) ---------------------------------------------


@dataclasses.dataclass
class LayerConfig:
    """How one Conv2D / DepthwiseConv2D / Dense layer is quantized.

    Attributes:
        quant_enable: False keeps the layer in float.
        data_dst_type: input activation type ("INT8").
        clip_max: optional initial activation clip maximum (else calibrated).
        clip_min: optional initial activation clip minimum.
        fixed_min: optional; True keeps the clip minimum at 0.
        weight_algo: "arq_distill" (learned scale and rounding) or
            "ulq_distill" (learned scale, round to nearest).
        weight_dst_type: "INT8" or "INT4".
        channel_wise: one weight scale per output channel.
    """

    quant_enable: bool = True
    data_dst_type: str = "INT8"
    clip_max: Optional[float] = None
    clip_min: Optional[float] = None
    fixed_min: Optional[bool] = None
    weight_algo: str = "arq_distill"
    weight_dst_type: str = "INT8"
    channel_wise: bool = True

    def to_json(self):
        if not self.quant_enable:
            return {"quant_enable": False}
        data = {"algo": "ulq_quantize", "dst_type": self.data_dst_type}
        for key in ("clip_max", "clip_min", "fixed_min"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return {
            "quant_enable": True,
            "distill_data_config": data,
            "distill_weight_config": {
                "algo": self.weight_algo,
                "channel_wise": self.channel_wise,
                "dst_type": self.weight_dst_type,
            },
        }

    @classmethod
    def from_json(cls, name, entry):
        where = f"distill config layer {name!r}"
        if not isinstance(entry, dict) or "quant_enable" not in entry:
            raise ValueError(f"{where}: expected an object with quant_enable, got {entry!r}")
        if not entry["quant_enable"]:
            return cls(quant_enable=False)
        data = entry.get("distill_data_config", {})
        weights = entry.get("distill_weight_config", {})
        if data.get("algo", "ulq_quantize") not in DATA_ALGOS:
            raise ValueError(f"{where}: distill_data_config.algo must be ulq_quantize, got {data.get('algo')!r}")
        if weights.get("algo", "arq_distill") not in WEIGHT_ALGOS:
            raise ValueError(
                f"{where}: distill_weight_config.algo must be one of "
                f"{', '.join(WEIGHT_ALGOS)}, got {weights.get('algo')!r}")
        config = cls(
            quant_enable=True,
            data_dst_type=data.get("dst_type", "INT8"),
            clip_max=data.get("clip_max"),
            clip_min=data.get("clip_min"),
            fixed_min=data.get("fixed_min"),
            weight_algo=weights.get("algo", "arq_distill"),
            weight_dst_type=weights.get("dst_type", "INT8"),
            channel_wise=bool(weights.get("channel_wise", True)),
        )
        config.validate(where)
        return config

    def validate(self, where):
        try:
            check_dst_type(self.weight_dst_type)
        except ValueError as e:
            raise ValueError(f"{where}: weight {e}") from e
        if self.data_dst_type != "INT8":
            raise ValueError(f"{where}: activations are INT8 only, got {self.data_dst_type!r}")
        if (self.clip_max is None) != (self.clip_min is None):
            raise ValueError(f"{where}: set both clip_max and clip_min, or neither")
        if self.clip_max is not None and not self.clip_min <= 0.0 < self.clip_max:
            raise ValueError(
                f"{where}: need clip_min <= 0 < clip_max, got {self.clip_min}, {self.clip_max}")


@dataclasses.dataclass
class DistillConfig:
    """The per-layer, per-block plan of a block-distillation quantization.

    Attributes:
        layers: `{layer name: LayerConfig}` of every Conv2D, DepthwiseConv2D
            and Dense layer (skipped ones with `quant_enable=False`).
        distill_group: the blocks, each the list of its layer names in order.
        group_size: most units per automatic block.
        batch_num: batches used to calibrate activation ranges.
        data_dump: keep each block's distillation data on disk (memory-mapped)
            instead of in memory.
        version: format version.
    """

    layers: dict
    distill_group: list
    group_size: int = 1
    batch_num: int = 1
    data_dump: bool = False
    version: int = CONFIG_VERSION

    def to_json(self):
        payload = {
            "version": self.version,
            "batch_num": self.batch_num,
            "group_size": self.group_size,
            "data_dump": self.data_dump,
            "distill_group": [list(group) for group in self.distill_group],
        }
        for name, layer in self.layers.items():
            payload[name] = layer.to_json()
        return payload

    @classmethod
    def from_json(cls, payload):
        if not isinstance(payload, dict):
            raise ValueError(f"distill config must be a JSON object, got {type(payload).__name__}")
        missing = [k for k in ("version", "distill_group") if k not in payload]
        if missing:
            raise ValueError(f"distill config lacks {', '.join(missing)}")
        if payload["version"] != CONFIG_VERSION:
            raise ValueError(f"distill config version {payload['version']} is not {CONFIG_VERSION}")
        groups = payload["distill_group"]
        if not isinstance(groups, list) or not all(
                isinstance(g, list) and g and all(isinstance(n, str) for n in g) for g in groups):
            raise ValueError("distill_group must be a list of non-empty lists of layer names")
        fixed = {"version", "batch_num", "group_size", "data_dump", "distill_group"}
        layers = {name: LayerConfig.from_json(name, entry)
                  for name, entry in payload.items() if name not in fixed}
        return cls(
            layers=layers,
            distill_group=[list(g) for g in groups],
            group_size=int(payload.get("group_size", 1)),
            batch_num=int(payload.get("batch_num", 1)),
            data_dump=bool(payload.get("data_dump", False)),
        )

    def save(self, path):
        """Writes the JSON file atomically."""
        atomic_write(path, json.dumps(self.to_json(), indent=4) + "\n")

    @classmethod
    def load(cls, path):
        """Reads a distill_config.json written by `save` (or edited by hand)."""
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read distill config {path}: {e}") from e
        try:
            return cls.from_json(payload)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    @property
    def quantized_layers(self):
        return [name for name, layer in self.layers.items() if layer.quant_enable]


def _apply_data(layer, data):
    if data.HasField("ulq_quantize"):
        ulq = data.ulq_quantize
        if ulq.HasField("clip_max_min"):
            layer.clip_max = float(ulq.clip_max_min.clip_max)
            layer.clip_min = float(ulq.clip_max_min.clip_min)
        if ulq.HasField("fixed_min"):
            layer.fixed_min = bool(ulq.fixed_min)


def _apply_weights(layer, weights):
    for algo in WEIGHT_ALGOS:
        if weights.HasField(algo):
            sub = getattr(weights, algo)
            layer.weight_algo = algo
            if sub.HasField("dst_type"):
                layer.weight_dst_type = "INT4" if sub.dst_type == 1 else "INT8"
            if sub.HasField("channel_wise"):
                layer.channel_wise = bool(sub.channel_wise)


def create_distill_config(model, simple_config=None, source="<config>"):
    """Plans the quantization of `model`: which layers, how, in which blocks.

    Args:
        model: a functional or sequential `keras.Model`.
        simple_config: `None` (defaults: INT8 everywhere, group_size 1), a
            `DistillSimpleConfig`, or its text.
        source: name of the simple config in error messages.

    Returns:
        A `DistillConfig`.

    Raises:
        ValueError: for a subclassed model or a config that does not fit the
            model (unknown layer or type names, bad groups).
    """
    text = ""
    if isinstance(simple_config, str):
        text = simple_config
        simple_config = parse_simple_config(simple_config, source)
    if simple_config is None:
        simple_config = DistillSimpleConfig()
    graph = quantize_graph.Graph(model)

    def check_type(type_name, field):
        if type_name not in quantize_graph.QUANTIZABLE_TYPE_NAMES:
            raise _config_error(
                source, text, type_name,
                f"{field}: {type_name!r} is not a layer type the quantizer handles "
                f"({', '.join(quantize_graph.QUANTIZABLE_TYPE_NAMES)})")

    def check_layer(name, field):
        if name not in graph.by_name:
            raise _config_error(source, text, name,
                                f"{field}: model {model.name!r} has no layer {name!r}")

    for name in simple_config.quant_skip_layers:
        check_layer(name, "quant_skip_layers")
    for type_name in simple_config.quant_skip_layer_types:
        check_type(type_name, "quant_skip_layer_types")
    for override in simple_config.distill_override_layers:
        check_layer(override.layer_name, "distill_override_layers")
    for override in simple_config.distill_override_layer_types:
        check_type(override.layer_type, "distill_override_layer_types")

    units, skipped, _ = quantize_graph.find_units(
        graph, set(simple_config.quant_skip_layers), set(simple_config.quant_skip_layer_types))
    unit_heads = {unit.head for unit in units}
    layers = {}
    for node in graph.nodes:
        if node.name in skipped:
            layers[node.name] = LayerConfig(quant_enable=False)
        if node.name not in unit_heads:
            continue
        layer = LayerConfig()
        _apply_data(layer, simple_config.distill_data_quant_config)
        _apply_weights(layer, simple_config.distill_weight_quant_config)
        for override in simple_config.distill_override_layer_types:
            if override.layer_type == node.type_name:
                _apply_data(layer, override.distill_data_quant_config)
                _apply_weights(layer, override.distill_weight_quant_config)
        for override in simple_config.distill_override_layers:
            if override.layer_name == node.name:
                _apply_data(layer, override.distill_data_quant_config)
                _apply_weights(layer, override.distill_weight_quant_config)
        layers[node.name] = layer
    for override in simple_config.distill_override_layers:
        if override.layer_name not in unit_heads:
            raise _config_error(
                source, text, override.layer_name,
                f"distill_override_layers: {override.layer_name!r} is not a quantized "
                "Conv2D/DepthwiseConv2D/Dense layer (skipped or another type)")
    group_size = simple_config.group_size if simple_config.HasField("group_size") else 1
    groups = [(g.start_layer_name, g.end_layer_name) for g in simple_config.distill_group]
    try:
        blocks = quantize_graph.partition(graph, units, group_size, groups)
    except ValueError as e:
        needle = next((n for g in groups for n in g if n in str(e)), None)
        raise _config_error(source, text, needle, str(e)) from e
    return DistillConfig(
        layers=layers,
        distill_group=blocks,
        group_size=group_size,
        batch_num=simple_config.batch_num if simple_config.HasField("batch_num") else 1,
        data_dump=bool(simple_config.data_dump),
    )
