"""The model as a graph: quantizable units and the block partition (BatchNorm folding: quantize_layers).

A *unit* is the smallest thing the quantizer handles: a Conv2D,
DepthwiseConv2D or Dense layer, the BatchNormalization that is its only
consumer (folded into it), and the activation layer that is the only consumer
of the result. A *block* is a chain of layers distilled together: up to
`group_size` units in a row where each unit's output has exactly one consumer,
the next unit; or a user's `distill_group` (start, end), which must be a
single path. A merge (Add, Concatenate) has several inputs and so is never
inside a block: residual connections never straddle a block boundary.
"""

import collections

import keras

# Quantized by capability: these layers and their subclasses (unless the
# subclass computes something else, i.e. overrides `call`). Checked in
# order: the first base class that matches decides.
QUANTIZABLE_TYPES = (
    (keras.layers.DepthwiseConv2D, "depthwise"),
    (keras.layers.SeparableConv2D, "separable"),
    (keras.layers.Conv2DTranspose, "conv_transpose"),
    (keras.layers.Conv2D, "conv2d"),
    (keras.layers.Conv1D, "conv1d"),
    (keras.layers.Dense, "dense"),
    (keras.layers.EinsumDense, "einsum"),
)
QUANTIZABLE_TYPE_NAMES = tuple(cls.__name__ for cls, _ in QUANTIZABLE_TYPES)
CONV_KINDS = ("conv2d", "depthwise", "separable", "conv_transpose", "conv1d")
ACTIVATION_TYPES = (
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.Activation,
    keras.layers.ELU,
    keras.layers.PReLU,
    keras.layers.Softmax,
)
# Layers that only act in training; the quantized (inference) model drops them.
TRAINING_ONLY_TYPES = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization,
)


class GraphNode:
    """One call of a layer (or Keras operation) in the model graph.

    Attributes:
        name: the layer name (unique in the graph).
        layer: the Keras layer or operation.
        keras_node: the Keras `Node` (its `arguments` rebuild the call).
        inputs: ids of the input `KerasTensor`s, in call order.
        outputs: ids of the output `KerasTensor`s.
        input_shapes: shapes of the inputs.
        output_shapes: shapes of the outputs.
    """

    def __init__(self, name, layer, keras_node, id_map=None):
        id_map = id_map or {}
        self.name = name
        self.layer = layer
        self.keras_node = keras_node
        self._raw_inputs = [id(t) for t in keras_node.input_tensors]
        self.inputs = [id_map.get(i, i) for i in self._raw_inputs]
        self.outputs = [id_map.get(id(t), id(t)) for t in keras_node.output_tensors]
        self.input_shapes = [tuple(t.shape) for t in keras_node.input_tensors]
        self.output_shapes = [tuple(t.shape) for t in keras_node.output_tensors]

    def fill_in(self, values):
        """The call's `(args, kwargs)` with `values[tensor id]` for its tensors.

        The ids are the graph's (a layer of a nested model has its own
        Keras tensors, mapped to the graph's at the nested model's edges).
        """
        raw = {r: values[i] for r, i in zip(self._raw_inputs, self.inputs)}
        return self.keras_node.arguments.fill_in(raw)

    @property
    def type_name(self):
        return type(self.layer).__name__

    def __repr__(self):
        return f"GraphNode({self.name}, {self.type_name})"


class Graph:
    """The topologically ordered layer graph of a functional/sequential model.

    Args:
        model: a built functional or sequential `keras.Model` with one input
            and one output.

    Raises:
        ValueError: for a subclassed model (no graph), an unbuilt model,
            several inputs or outputs, or a layer called more than once.
    """

    def __init__(self, model):
        functional = _functional_of(model)
        self.model = model
        self.nodes = []
        self.by_name = {}
        self.producer = {}
        self.consumers = collections.defaultdict(list)
        if len(functional.inputs) != 1 or len(functional.outputs) != 1:
            raise ValueError(
                f"model {model.name!r} has {len(functional.inputs)} inputs and "
                f"{len(functional.outputs)} outputs; the quantizer takes one "
                "image input and one logits output")
        self.input_tensor = functional.inputs[0]
        self.output_tensor = functional.outputs[0]
        self.input_id = id(self.input_tensor)
        self.output_id = id(self.output_tensor)
        self._add_nodes(functional, {}, model.name)
        self.index = {node.name: i for i, node in enumerate(self.nodes)}

    def _add_nodes(self, functional, id_map, where):
        """Adds the layer calls of `functional`, inlining nested models.

        A nested functional or sequential model with one input and one
        output (ConvNeXt's stem, a user's backbone) is replaced by its own
        layers: `id_map` maps its input and output tensors to the ids of the
        tensors it is called on and returns.
        """
        for depth in sorted(functional._nodes_by_depth, reverse=True):
            for keras_node in functional._nodes_by_depth[depth]:
                if keras_node.is_input:
                    continue
                layer = keras_node.operation
                inner = _nested_functional(layer)
                if inner is not None and len(keras_node.input_tensors) == 1 \
                        and len(keras_node.output_tensors) == 1:
                    (outer_in,), (outer_out,) = keras_node.input_tensors, keras_node.output_tensors
                    inner_map = {
                        id(inner.inputs[0]): id_map.get(id(outer_in), id(outer_in)),
                        id(inner.outputs[0]): id_map.get(id(outer_out), id(outer_out)),
                    }
                    if inner.inputs[0] is inner.outputs[0]:
                        raise ValueError(
                            f"nested model {layer.name!r} returns its input unchanged; "
                            "remove it from the model before quantizing")
                    self._add_nodes(inner, inner_map, f"{where}/{layer.name}")
                    continue
                if layer.name in self.by_name:
                    raise ValueError(
                        f"layer name {layer.name!r} is called more than once or used twice "
                        f"in model {self.model.name!r} (seen again in {where}); the "
                        "quantizer needs each layer called once under a unique name")
                node = GraphNode(layer.name, layer, keras_node, id_map)
                self.nodes.append(node)
                self.by_name[node.name] = node
                for tensor_id in node.outputs:
                    self.producer[tensor_id] = node.name
                for tensor_id in node.inputs:
                    self.consumers[tensor_id].append(node.name)

    def node(self, name, what="layer"):
        if name not in self.by_name:
            raise ValueError(
                f"{what} {name!r} is not a layer of model {self.model.name!r}")
        return self.by_name[name]

    def out_degree(self, tensor_id):
        """Consumers of a tensor, counting the model output as one."""
        return len(self.consumers[tensor_id]) + (tensor_id == self.output_id)

    def sole_consumer(self, node):
        """The node consuming `node`'s single output alone, or None."""
        if len(node.outputs) != 1 or self.out_degree(node.outputs[0]) != 1:
            return None
        names = self.consumers[node.outputs[0]]
        return self.by_name[names[0]] if names else None

    def single_path(self, start, end, what):
        """The layer names from `start` to `end` along a single path.

        Raises:
            ValueError: naming the layer where the path branches or merges.
        """
        node = self.node(start, f"{what} start_layer_name")
        self.node(end, f"{what} end_layer_name")
        if len(node.inputs) != 1:
            raise ValueError(
                f"{what}: start layer {start!r} has {len(node.inputs)} inputs; a "
                "block must have exactly one path (one input)")
        path = [start]
        while node.name != end:
            nxt = self.sole_consumer(node)
            if nxt is None:
                degree = self.out_degree(node.outputs[0]) if len(node.outputs) == 1 else len(node.outputs)
                raise ValueError(
                    f"{what} ({start}, {end}) must have exactly one path, but the "
                    f"output of {node.name!r} has {degree} consumers (or is the "
                    "model output before reaching the end layer)")
            if len(nxt.inputs) != 1:
                raise ValueError(
                    f"{what} ({start}, {end}) must have exactly one path, but "
                    f"{nxt.name!r} merges {len(nxt.inputs)} inputs")
            node = nxt
            path.append(node.name)
        return path


def _nested_functional(layer):
    """The functional graph of a nested functional/sequential model, or None."""
    if not isinstance(layer, keras.Model):
        return None
    if isinstance(layer, keras.Sequential):
        functional = getattr(layer, "_functional", None)
    elif hasattr(layer, "_nodes_by_depth") and getattr(layer, "inputs", None):
        functional = layer
    else:
        return None
    if functional is None or len(functional.inputs) != 1 or len(functional.outputs) != 1:
        return None
    return functional


def _functional_of(model):
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise ValueError(
                f"sequential model {model.name!r} is not built with an input "
                "shape: add keras.Input(shape) as its first layer or call it on data")
        return functional
    if isinstance(model, keras.Model) and hasattr(model, "_nodes_by_depth") \
            and getattr(model, "inputs", None):
        return model
    raise ValueError(
        f"model {getattr(model, 'name', model)!r} ({type(model).__name__}) has no "
        "layer graph: the quantizer needs a functional or sequential model. "
        "Rebuild a subclassed model functionally, e.g. "
        "keras.Model(inputs, outputs) with keras.Input")


class Unit:
    """A quantizable layer with its folded BatchNorm and its activation."""

    def __init__(self, head, kind, bn=None, act=None):
        self.head = head
        self.kind = kind
        self.bn = bn
        self.act = act

    @property
    def names(self):
        return [n for n in (self.head, self.bn, self.act) if n is not None]

    @property
    def last(self):
        return self.names[-1]

    def __repr__(self):
        return f"Unit({self.names})"


def quantizable_kind(layer, input_shapes):
    """The QuantizedLayer kind of `layer`, or None with the reason."""
    base, kind = next(((cls, k) for cls, k in QUANTIZABLE_TYPES if isinstance(layer, cls)),
                      (None, None))
    if kind is None:
        return None, f"not a layer the quantizer handles ({', '.join(QUANTIZABLE_TYPE_NAMES)})"
    for method in ("call", "convolution_op"):
        if hasattr(base, method) and getattr(type(layer), method) is not getattr(base, method):
            return None, f"a subclass of {base.__name__} that overrides {method}()"
    if getattr(layer, "lora_enabled", False):
        return None, "LoRA is enabled"
    policy = getattr(layer, "dtype_policy", None)
    if getattr(policy, "quantization_mode", None):
        return None, f"already quantized by Keras (dtype policy {policy.name})"
    if kind in CONV_KINDS:
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return None, "data_format is not channels_last"
        rank = 3 if kind == "conv1d" else 4
        if len(input_shapes[0]) != rank:
            return None, f"input is not a {rank}-D channels-last tensor"
    if kind == "conv_transpose" and _pair(layer.dilation_rate) != (1, 1):
        return None, "a dilated Conv2DTranspose"
    if kind == "einsum":
        if einsum_projection(layer) is None:
            return None, (f"equation {layer.equation!r} is not a projection of the last axis "
                          "(such as 'abc,cd->abd')")
        kind = "dense"
    return kind, None


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def einsum_projection(layer):
    """True when an EinsumDense is a Dense on the last axis ('...ab,bc->...ac'), else None.

    That is: a 2-D kernel contracting the input's last axis only, the
    output the input's other axes plus the kernel's second, and a bias (if
    any) on that output axis.
    """
    try:
        inputs, output = layer.equation.replace(" ", "").split("->")
        lhs, rhs = inputs.split(",")
    except ValueError:
        return None
    if "." in layer.equation or len(rhs) != 2 or not lhs or lhs[-1] != rhs[0]:
        return None
    if rhs[0] in lhs[:-1] or rhs[1] in lhs or output != lhs[:-1] + rhs[1]:
        return None
    if getattr(layer, "bias_axes", None) not in (None, "", rhs[1]):
        return None
    return True


def _is_linear(layer):
    return keras.activations.serialize(layer.activation) == "linear"


def _has_compute_weights(layer):
    if isinstance(layer, keras.Model):
        return True
    return any(hasattr(layer, attr) for attr in
               ("kernel", "depthwise_kernel", "pointwise_kernel", "embeddings"))


def find_units(graph, skip_layers=(), skip_types=()):
    """Finds the units of `graph`.

    Args:
        graph: a `Graph`.
        skip_layers: names of layers to keep in float.
        skip_types: class names of layer types to keep in float.

    Returns:
        `(units, skipped, unsupported)`: the `Unit`s in topological order,
        the names of quantizable layers kept float by the skip lists, and
        `{name: reason}` of layers with weights that cannot be quantized.
    """
    for name in skip_layers:
        graph.node(name, "quant_skip_layers entry")
    units, skipped, unsupported = [], [], {}
    for node in graph.nodes:
        kind, reason = quantizable_kind(node.layer, node.input_shapes)
        if kind is None:
            if node.type_name in QUANTIZABLE_TYPE_NAMES or _has_compute_weights(node.layer):
                unsupported[node.name] = reason
            continue
        if node.name in skip_layers or node.type_name in skip_types:
            skipped.append(node.name)
            continue
        unit = Unit(node.name, kind)
        nxt = graph.sole_consumer(node)
        if (nxt is not None and type(nxt.layer) is keras.layers.BatchNormalization
                and _is_linear(node.layer) and _bn_on_last_axis(nxt)):
            unit.bn = nxt.name
            nxt = graph.sole_consumer(nxt)
        if nxt is not None and isinstance(nxt.layer, ACTIVATION_TYPES) and len(nxt.inputs) == 1:
            unit.act = nxt.name
        units.append(unit)
    return units, skipped, unsupported


def _bn_on_last_axis(node):
    axis = node.layer.axis
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    rank = len(node.input_shapes[0])
    return len(axes) == 1 and axes[0] % rank == rank - 1


def partition(graph, units, group_size=1, user_groups=()):
    """Cuts the model into blocks.

    Args:
        graph: a `Graph`.
        units: the `Unit`s of `find_units`.
        group_size: most units chained into one automatic block.
        user_groups: `(start_layer_name, end_layer_name)` pairs; each must be
            a single path holding whole units, and groups must not overlap.

    Returns:
        A list of blocks in topological order, each the list of layer names
        from its first to its last layer.

    Raises:
        ValueError: for a bad group (not one path, cutting a unit, holding no
            unit, overlapping another).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    unit_of = {name: unit for unit in units for name in unit.names}
    head_of = {unit.head: unit for unit in units}
    owner = {}
    blocks = []
    for start, end in user_groups:
        what = f"distill_group ({start}, {end})"
        path = graph.single_path(start, end, "distill_group")
        inside = [unit_of[name] for name in path if name in unit_of]
        if not inside:
            raise ValueError(f"{what} holds no quantized Conv2D/DepthwiseConv2D/Dense layer")
        for unit in inside:
            missing = [n for n in unit.names if n not in path]
            if missing:
                raise ValueError(
                    f"{what} cuts the unit {unit.names}: the group must hold "
                    f"all of it (it leaves out {missing})")
        for name in path:
            if name in owner:
                raise ValueError(f"{what} overlaps {owner[name]} at layer {name!r}")
            owner[name] = what
        blocks.append(path)
    for unit in units:
        if unit.head in owner:
            continue
        chain = [unit]
        while len(chain) < group_size:
            nxt = graph.sole_consumer(graph.by_name[chain[-1].last])
            if nxt is None or nxt.name not in head_of or nxt.name in owner:
                break
            chain.append(head_of[nxt.name])
        names = [name for u in chain for name in u.names]
        for name in names:
            owner[name] = f"block {names[0]}"
        blocks.append(names)
    blocks.sort(key=lambda names: graph.index[names[0]])
    return blocks


def validate_blocks(graph, units, blocks):
    """Checks blocks read from a distill config against the model.

    Each block must be a single path of existing layers holding whole units,
    blocks must not overlap, and every unit must be in a block.
    """
    groups = []
    for names in blocks:
        if not names:
            raise ValueError("distill_group holds an empty group")
        path = graph.single_path(names[0], names[-1], "distill_group")
        if path != list(names):
            raise ValueError(
                f"distill_group {list(names)} is not the path from {names[0]!r} "
                f"to {names[-1]!r} ({path})")
        groups.append((names[0], names[-1]))
    result = partition(graph, units, 1, groups)
    if len(result) != len(blocks):
        loose = [b[0] for b in result if (b[0], b[-1]) not in groups]
        raise ValueError(
            f"distill_group leaves quantized layers out of every group: {loose}")
    return result
