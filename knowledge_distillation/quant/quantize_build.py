"""`create_quant_model`: the quantized (student) copy of a float model.

The float model's graph is replayed layer by layer: every unit's
Conv2D/DepthwiseConv2D/Dense becomes a `QuantizedLayer` with its BatchNorm
folded in, training-only layers (Dropout, noise) are dropped, and every other
layer is a frozen copy of the float one. A second, plain float copy serves as
the teacher, so the user's model is never modified.
"""

import contextlib
import logging

import keras
import numpy as np

from knowledge_distillation.quant import quantize_graph
from knowledge_distillation.quant.quantize_layers import QuantizedLayer, fold_batchnorm

logger = logging.getLogger(__name__)


def _clone_layer(layer):
    if not isinstance(layer, keras.layers.Layer):
        return layer  # a stateless keras.ops operation: reuse it
    config = layer.get_config()
    if "dtype" in config:
        # Quantization factors are learned and checked against float32, even
        # for a model trained under a mixed-precision policy.
        config["dtype"] = "float32"
    return layer.__class__.from_config(config)


@contextlib.contextmanager
def float32_policy():
    """Runs the block with Keras' global dtype policy set to float32."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


class QuantizedModel:
    """A quantized copy of a float model, with what block distillation needs.

    Attributes:
        float_model: the user's model (never modified).
        config: the `DistillConfig`.
        graph: the float model's `Graph`.
        units: `{head name: Unit}`.
        blocks: the blocks, lists of float layer names in order.
        keras_model: the quantized Keras model (TF fake-quant simulation).
        teacher_model: a frozen float32 copy of the model (whatever the
            user model's dtype policy).
        quant_layers: `{layer name: QuantizedLayer}` in topological order (a
            SeparableConv2D `sep` gives `sep_depthwise` and `sep`).
        parts: `{unit head: [QuantizedLayer, ...]}`.
        unsupported: `{layer name: reason}` of weighted layers the
            quantizer cannot quantize (left in float).
        skipped: quantizable layers the config keeps in float.
    """

    def __init__(self, model, config):
        with float32_policy():
            self._build(model, config)

    def _build(self, model, config):
        self.float_model = model
        self.config = config
        self.graph = quantize_graph.Graph(model)
        skip = [name for name, layer in config.layers.items() if not layer.quant_enable]
        for name in config.layers:
            self.graph.node(name, "distill config layer")
        units, self.skipped, self.unsupported = quantize_graph.find_units(
            self.graph, skip_layers=skip)
        heads = {unit.head for unit in units}
        missing = heads - set(config.quantized_layers)
        if missing:
            raise ValueError(
                f"the distill config does not cover layers {sorted(missing)} of model "
                f"{model.name!r}: create the config from this model")
        self.units = {unit.head: unit for unit in units}
        self.blocks = quantize_graph.validate_blocks(self.graph, units, config.distill_group)
        self.quant_layers = {}
        self.parts = {}  # unit head -> its QuantizedLayers
        self.teacher_model, self.teacher_tensors, self.teacher_layers = self._replay(quantize=False)
        self.keras_model, self.quant_tensors, self.student_layers = self._replay(quantize=True)
        for row in self.float_layers():
            logger.info("layer %s (%s) stays float: %s", row["layer"], row["type"], row["reason"])

    def _replay(self, quantize):
        graph = self.graph
        tensors = {}
        layers = {}
        source = graph.input_tensor
        new_input = keras.Input(
            shape=source.shape[1:], dtype=source.dtype, name=source._keras_history[0].name)
        tensors[graph.input_id] = new_input
        folded = {unit.bn: unit.head for unit in self.units.values() if unit.bn}
        for node in graph.nodes:
            layer = node.layer
            if quantize and node.name in self.units:
                unit = self.units[node.name]
                bn = graph.by_name[unit.bn].layer if unit.bn else None
                parts = self._quantized_layers(unit, layer, bn)
                out = tensors[node.inputs[0]]
                for qlayer in parts:
                    out = qlayer(out)
                    self.quant_layers[qlayer.name] = qlayer
                tensors[node.outputs[0]] = out
                self.parts[node.name] = parts
                layers[node.name] = parts[0] if len(parts) == 1 else _Chain(parts)
                continue
            if quantize and node.name in folded:
                tensors[node.outputs[0]] = tensors[node.inputs[0]]
                continue
            if quantize and isinstance(layer, quantize_graph.TRAINING_ONLY_TYPES):
                tensors[node.outputs[0]] = tensors[node.inputs[0]]
                continue
            clone = _clone_layer(layer)
            args, kwargs = node.fill_in(tensors)
            outputs = clone(*args, **kwargs)
            for tensor_id, out in zip(node.outputs, keras.tree.flatten(outputs)):
                tensors[tensor_id] = out
            if isinstance(clone, keras.layers.Layer):
                clone.set_weights(layer.get_weights())
                clone.trainable = False
            layers[node.name] = clone
        suffix = "_quant" if quantize else "_float"
        model = keras.Model(new_input, tensors[graph.output_id],
                            name=f"{self.float_model.name}{suffix}")
        return model, tensors, layers

    def _quantized_layers(self, unit, layer, bn):
        """The `QuantizedLayer`s computing `unit`: one, or a SeparableConv2D's two
        (`<name>_depthwise`, then the pointwise part named like the layer)."""
        kernel, bias = fold_batchnorm(layer, bn, unit.kind)
        cfg = self.config.layers[unit.head]
        clip = (cfg.clip_min, cfg.clip_max) if cfg.clip_max is not None else None
        common = dict(weight_dst_type=cfg.weight_dst_type, weight_algo=cfg.weight_algo,
                      channel_wise=cfg.channel_wise, fixed_min=cfg.fixed_min)
        conv_args = {}
        if unit.kind != "dense":
            conv_args = dict(strides=layer.strides, padding=layer.padding,
                             dilation_rate=layer.dilation_rate)
        if unit.kind == "conv_transpose":
            conv_args["output_padding"] = layer.output_padding
        if unit.kind == "separable":
            part = f"{unit.head}_depthwise"
            if part in self.graph.by_name:
                raise ValueError(
                    f"layer {part!r} of model {self.float_model.name!r} has the name the "
                    f"quantizer gives the depthwise part of SeparableConv2D {unit.head!r}: "
                    "rename one of them")
            depthwise = np.asarray(keras.ops.convert_to_numpy(layer.depthwise_kernel), np.float32)
            first = QuantizedLayer(
                "depthwise", depthwise, np.zeros(int(np.prod(depthwise.shape[2:])), np.float32),
                clip_init=clip, name=part, **conv_args, **common)
            second = QuantizedLayer("conv2d", kernel, bias, activation=layer.activation,
                                    name=unit.head, **common)
            return [first, second]
        return [QuantizedLayer(unit.kind, kernel, bias, activation=layer.activation, clip_init=clip,
                               name=unit.head, **conv_args, **common)]

    def float_layers(self):
        """Every layer with weights that stays float: `[{layer, type, reason}]` in graph order.

        That is a Conv/Dense-like layer the quantizer cannot handle, one the config
        skips, and a layer with weights of another kind (LayerNormalization,
        Normalization, a BatchNormalization that is not folded, ConvNeXt's LayerScale):
        these run in float between the quantized layers.
        """
        in_units = {name for unit in self.units.values() for name in unit.names}
        rows = []
        for node in self.graph.nodes:
            layer = node.layer
            if node.name in self.unsupported:
                reason = self.unsupported[node.name]
            elif node.name in self.skipped:
                reason = ("quant_enable is false in the distill config "
                          "(quant_skip_layers / quant_skip_layer_types)")
            elif (node.name not in in_units and isinstance(layer, keras.layers.Layer)
                  and layer.weights
                  and not isinstance(layer, quantize_graph.TRAINING_ONLY_TYPES)):
                reason = "no quantized form: it runs in float between the quantized layers"
            else:
                continue
            rows.append({"layer": node.name, "type": node.type_name, "reason": reason})
        return rows

    # -- blocks -------------------------------------------------------------

    def block_input_id(self, block):
        """Id of the float graph tensor feeding `block`."""
        return self.graph.by_name[block[0]].inputs[0]

    def block_output_id(self, block):
        return self.graph.by_name[block[-1]].outputs[0]

    def block_quant_layers(self, block):
        return [part for name in block for part in self.parts.get(name, ())]

    def block_models(self, block):
        """`(teacher, student)` Keras models of one block, on a fresh input.

        The teacher chains the float copy's layers, the student the quantized
        model's layers (folded BatchNorms and training-only layers absent).
        """
        shape = self.quant_tensors[self.block_input_id(block)].shape[1:]
        models = []
        for layers in (self.teacher_layers, self.student_layers):
            x = inputs = keras.Input(shape=shape)
            for name in block:
                if name in layers:
                    for layer in getattr(layers[name], "parts", [layers[name]]):
                        x = layer(x)
            models.append(keras.Model(inputs, x))
        teacher, student = models
        return teacher, student

    def segment_sources(self, tensor_id, known):
        """The tensors a segment computing `tensor_id` starts from.

        Walks back through the graph from `tensor_id` and stops at the
        tensors in `known` (ids whose values are at hand) and at the model
        input: every path to `tensor_id` crosses the returned ids, in the
        order first met.
        """
        sources, seen, stack = [], set(), [tensor_id]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if current in known or current == self.graph.input_id:
                sources.append(current)
                continue
            stack.extend(reversed(self.graph.by_name[self.graph.producer[current]].inputs))
        return sources

    def segment_models(self, sources, tensor_id):
        """Float and quantized models from the `sources` tensors to `tensor_id`.

        Returns `((float_model, float_ids), (quant_model, quant_ids))`: each
        model takes one input per id of its list, in order. The lists are
        `sources` less any id whose tensor is the same Keras tensor as an
        earlier one's (a folded BatchNorm or a Dropout passes its input
        through in the quantized model). Where `tensor_id`'s Keras tensor is
        one of the sources' (passed through), the model is None and the list
        holds that source alone: its value is the answer.
        """
        result = []
        for tensors in (self.teacher_tensors, self.quant_tensors):
            target = tensors[tensor_id]
            same = [s for s in sources if tensors[s] is target]
            if same:
                result.append((None, same[:1]))
                continue
            ids, inputs = [], []
            for source in sources:
                if all(tensors[source] is not x for x in inputs):
                    ids.append(source)
                    inputs.append(tensors[source])
            result.append((keras.Model(inputs, target), ids))
        return tuple(result)

    # -- state --------------------------------------------------------------

    @property
    def frozen(self):
        return all(layer.state is not None for layer in self.quant_layers.values())

    def states(self):
        """`{layer name: QuantState}` of the frozen layers, in graph order."""
        return {name: layer.state for name, layer in self.quant_layers.items()
                if layer.state is not None}

    def apply_record(self, states):
        """Freezes every quantized layer to the factors of a record."""
        missing = [name for name in self.quant_layers if name not in states]
        extra = [name for name in states if name not in self.quant_layers]
        if missing or extra:
            raise ValueError(
                f"record does not match the quantized layers: missing {missing}, "
                f"unknown {extra}")
        for name, layer in self.quant_layers.items():
            layer.freeze(states[name])


class _Chain:
    """The quantized layers standing for one float layer (a SeparableConv2D's two parts)."""

    def __init__(self, parts):
        self.parts = parts


def create_quant_model(model, config):
    """Builds the quantized copy of `model` planned by `config`.

    Args:
        model: the float functional or sequential `keras.Model`.
        config: a `DistillConfig` made from this model.

    Returns:
        A `QuantizedModel`; its layers start unfrozen (calibrate and distil
        them with `distill`, or freeze them from a record with
        `apply_record`).
    """
    return QuantizedModel(model, config)
