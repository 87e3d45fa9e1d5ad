"""`scale_offset_record.txt`: the quantization factors, in protobuf text format.

AMCT's layout, one entry per quantized layer:

```
record {
  key: "conv1"
  value {
    scale_d: 0.0235294
    offset_d: -128
    scale_w: 0.00123
    scale_w: 0.00098
    offset_w: 0
    offset_w: 0
    dst_type: "INT8"
    round_up: "\\377\\001..."
  }
}
```

`scale_d`/`offset_d` quantize the layer's input (per tensor), `scale_w` and
`offset_w` its weights (one per output channel, offsets 0: symmetric),
`dst_type` is the weights' type. `round_up`, our addition to AMCT's fields,
holds the learned rounding as packed bits (numpy `packbits`, big-endian bit
order, over the kernel flattened in Keras layout): weight `i` is
`floor(w_i / scale_w) + bit_i`. Without it weights round half to even. With
the float model and this file the integer weights are reproduced exactly.
"""

import os

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from knowledge_distillation.util.files import atomic_write
from knowledge_distillation.quant.quantize_layers import QuantState

_PACKAGE = "knowledge_distillation.quant.record"


def _build_record_class():
    F = descriptor_pb2.FieldDescriptorProto
    fp = descriptor_pb2.FileDescriptorProto(
        name="knowledge_distillation/quant/scale_offset_record.proto",
        package=_PACKAGE, syntax="proto2")
    value = fp.message_type.add(name="SingleLayerRecord")
    for number, (name, kind, label) in enumerate([
            ("scale_d", F.TYPE_FLOAT, F.LABEL_OPTIONAL),
            ("offset_d", F.TYPE_INT32, F.LABEL_OPTIONAL),
            ("scale_w", F.TYPE_FLOAT, F.LABEL_REPEATED),
            ("offset_w", F.TYPE_INT32, F.LABEL_REPEATED),
            ("dst_type", F.TYPE_STRING, F.LABEL_OPTIONAL),
            ("round_up", F.TYPE_BYTES, F.LABEL_OPTIONAL)], start=1):
        value.field.add(name=name, number=number, type=kind, label=label)
    entry = fp.message_type.add(name="MapFiledEntry")
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=f".{_PACKAGE}.SingleLayerRecord")
    record = fp.message_type.add(name="ScaleOffsetRecord")
    record.field.add(name="record", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                     type_name=f".{_PACKAGE}.MapFiledEntry")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ScaleOffsetRecord"))


ScaleOffsetRecord = _build_record_class()


def record_to_text(states):
    """The record text of `{layer name: QuantState}` (in the given order)."""
    message = ScaleOffsetRecord()
    for name, state in states.items():
        entry = message.record.add(key=name)
        value = entry.value
        value.scale_d = float(state.scale_d)
        value.offset_d = int(state.offset_d)
        value.scale_w.extend(float(s) for s in state.scale_w)
        value.offset_w.extend([0] * len(state.scale_w))
        value.dst_type = state.dst_type_w
        if state.round_up is not None:
            value.round_up = np.packbits(np.asarray(state.round_up, bool).reshape(-1)).tobytes()
    return text_format.MessageToString(message)


def save_record(path, states):
    """Writes `{layer name: QuantState}` to `path` atomically."""
    atomic_write(path, record_to_text(states))


def parse_record(text, source="<record>"):
    """Parses record text into `{layer name: QuantState}`.

    `round_up` comes back flat (padded to a multiple of 8 bits); the layer
    trims and reshapes it to its kernel when the state is applied.

    Raises:
        ValueError: naming the line for a syntax error, the layer for a bad
            value.
    """
    message = ScaleOffsetRecord()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ValueError(f"{source}:{e}") from e
    states = {}
    for entry in message.record:
        where = f"{source}: record {entry.key!r}"
        value = entry.value
        if entry.key in states:
            raise ValueError(f"{where} appears twice")
        if not value.HasField("scale_d") or not value.scale_w:
            raise ValueError(f"{where} needs scale_d and scale_w")
        if value.scale_d <= 0 or min(value.scale_w) <= 0:
            raise ValueError(f"{where}: scales must be positive")
        if not -128 <= value.offset_d <= 127:
            raise ValueError(f"{where}: offset_d {value.offset_d} is outside int8")
        if any(value.offset_w) or len(value.offset_w) not in (0, len(value.scale_w)):
            raise ValueError(
                f"{where}: offset_w must be one 0 per scale_w (weights are symmetric)")
        round_up = None
        if value.HasField("round_up"):
            round_up = np.unpackbits(np.frombuffer(value.round_up, np.uint8)).astype(bool)
        try:
            states[entry.key] = QuantState(
                value.scale_d, value.offset_d, np.asarray(value.scale_w, np.float32),
                value.dst_type or "INT8", round_up)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
    return states


def load_record(path):
    """Reads a `scale_offset_record.txt` (see `parse_record`)."""
    if not os.path.isfile(path):
        raise ValueError(f"record file {path} does not exist")
    with open(path) as f:
        return parse_record(f.read(), source=path)
