"""The three AMCT formats: simple config (text proto), distill_config.json, record."""

import json

import keras
import numpy as np
import pytest
from keras import layers

from knowledge_distillation.quant import (
    DistillConfig,
    QuantState,
    create_distill_config,
    parse_record,
    parse_simple_config,
    record_to_text,
)

FULL_CONFIG = """\
batch_num: 2
group_size: 2
data_dump: false
distill_group {
  start_layer_name: "conv2"
  end_layer_name: "conv3_relu"
}
distill_data_quant_config {
  ulq_quantize {
    clip_max_min { clip_max: 6.0 clip_min: 0.0 }
    fixed_min: true
    dst_type: INT8
  }
}
distill_weight_quant_config {
  arq_distill { channel_wise: true dst_type: INT4 }
}
quant_skip_layers: "logits"
distill_override_layers {
  layer_name: "conv1"
  distill_weight_quant_config { ulq_distill { dst_type: INT8 channel_wise: false } }
}
distill_override_layer_types {
  layer_type: "DepthwiseConv2D"
  distill_weight_quant_config { arq_distill { dst_type: INT8 } }
}
"""


def _conv_bn_relu(x, filters, name):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


@pytest.fixture(scope="module")
def chain_model():
    inputs = keras.Input((12, 12, 1))
    x = _conv_bn_relu(inputs, 4, "conv1")
    x = _conv_bn_relu(x, 4, "conv2")
    x = layers.MaxPooling2D(name="pool")(x)
    x = _conv_bn_relu(x, 8, "conv3")
    x = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="chain")


def test_simple_config_parses_every_amct_field():
    message = parse_simple_config(FULL_CONFIG, "full.cfg")
    assert message.batch_num == 2 and message.group_size == 2
    assert message.distill_group[0].end_layer_name == "conv3_relu"
    ulq = message.distill_data_quant_config.ulq_quantize
    assert (ulq.clip_max_min.clip_max, ulq.clip_max_min.clip_min, ulq.fixed_min) == (6.0, 0.0, True)
    assert message.distill_weight_quant_config.arq_distill.dst_type == 1  # INT4
    assert list(message.quant_skip_layers) == ["logits"]
    assert message.distill_override_layers[0].distill_weight_quant_config.HasField("ulq_distill")


@pytest.mark.parametrize("text, expected", [
    ("batch_num: 1\ngroup_sise: 2\n", r"bad\.cfg:2:1 : .*no field named \"group_sise\""),
    ("distill_weight_quant_config { arq_distill { dst_type: INT2 } }",
     r"bad\.cfg:1:.*INT2"),
    ("group_size: 0\n", r"bad\.cfg:1: group_size must be >= 1"),
    ("batch_num: 1\ndistill_data_quant_config { ulq_quantize { dst_type: INT4 } }",
     r"bad\.cfg:2: .*activations are INT8 only"),
    ("distill_weight_quant_config {\n arq_distill {}\n ulq_distill {}\n}",
     r"bad\.cfg:3: .*both arq_distill and ulq_distill"),
    ("distill_data_quant_config { ulq_quantize { clip_max_min { clip_max: -1 clip_min: 0 } } }",
     r"clip_min <= 0 < clip_max"),
    ("distill_group { start_layer_name: \"conv1\" }", r"needs start_layer_name and end_layer_name"),
])
def test_simple_config_errors_name_line_and_field(text, expected):
    with pytest.raises(ValueError, match=expected):
        parse_simple_config(text, "bad.cfg")


def test_distill_config_applies_simple_config(chain_model):
    config = create_distill_config(chain_model, FULL_CONFIG, "full.cfg")
    assert config.batch_num == 2 and config.group_size == 2
    assert config.distill_group == [
        ["conv1", "conv1_bn", "conv1_relu"],
        ["conv2", "conv2_bn", "conv2_relu", "pool", "conv3", "conv3_bn", "conv3_relu"],
        ["dw"],
    ]
    conv1, conv2, dw = config.layers["conv1"], config.layers["conv2"], config.layers["dw"]
    assert (conv1.weight_algo, conv1.weight_dst_type, conv1.channel_wise) == ("ulq_distill", "INT8", False)
    assert (conv2.weight_algo, conv2.weight_dst_type) == ("arq_distill", "INT4")
    assert (conv2.clip_max, conv2.clip_min, conv2.fixed_min) == (6.0, 0.0, True)
    assert dw.weight_dst_type == "INT8"
    assert not config.layers["logits"].quant_enable


def test_distill_config_json_shape_and_round_trip(chain_model, tmp_path):
    config = create_distill_config(chain_model)
    path = tmp_path / "distill_config.json"
    config.save(str(path))
    payload = json.loads(path.read_text())
    assert {k: payload[k] for k in ("version", "batch_num", "group_size", "data_dump")} == {
        "version": 1, "batch_num": 1, "group_size": 1, "data_dump": False}
    assert payload["distill_group"][0] == ["conv1", "conv1_bn", "conv1_relu"]
    assert payload["conv1"] == {
        "quant_enable": True,
        "distill_data_config": {"algo": "ulq_quantize", "dst_type": "INT8"},
        "distill_weight_config": {"algo": "arq_distill", "channel_wise": True, "dst_type": "INT8"},
    }
    assert DistillConfig.load(str(path)) == config


@pytest.mark.parametrize("edit, expected", [
    (lambda p: p.pop("version"), "lacks version"),
    (lambda p: p["conv1"]["distill_weight_config"].update(algo="nuq"), "arq_distill, ulq_distill"),
    (lambda p: p["conv1"]["distill_weight_config"].update(dst_type="INT3"), "INT8, INT4"),
    (lambda p: p["conv1"]["distill_data_config"].update(dst_type="INT4"), "INT8 only"),
    (lambda p: p.update(distill_group=[["conv1", 3]]), "lists of layer names"),
])
def test_distill_config_json_errors(chain_model, tmp_path, edit, expected):
    payload = create_distill_config(chain_model).to_json()
    edit(payload)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=expected):
        DistillConfig.load(str(path))


@pytest.mark.parametrize("text, expected", [
    ('quant_skip_layers: "conv9"', r"cfg:1: quant_skip_layers: model 'chain' has no layer 'conv9'"),
    ('quant_skip_layer_types: "Conv3D"', r"'Conv3D' is not a layer type the quantizer handles"),
    ('group_size: 1\ndistill_group { start_layer_name: "conv1" end_layer_name: "conv1_bn" }',
     r"cfg:2: distill_group \(conv1, conv1_bn\) cuts the unit"),
    ('distill_group { start_layer_name: "flatten" end_layer_name: "flatten" }',
     r"holds no quantized"),
    ('distill_group { start_layer_name: "conv1" end_layer_name: "conv2_relu" }\n'
     'distill_group { start_layer_name: "conv2" end_layer_name: "conv3_relu" }', r"overlaps"),
    ('distill_override_layers { layer_name: "pool" }', r"'pool' is not a quantized"),
])
def test_config_errors_against_the_model(chain_model, text, expected):
    with pytest.raises(ValueError, match=expected):
        create_distill_config(chain_model, text, "cfg")


def test_record_round_trip_is_exact():
    rng = np.random.default_rng(0)
    round_up = rng.random((3, 3, 2, 5)) > 0.5
    states = {
        "conv1": QuantState(np.float32(0.0123456789), -128,
                            rng.random(5).astype(np.float32) / 7, "INT4", round_up),
        "logits": QuantState(np.float32(1 / 3), 17, np.float32([1e-3, 2e-3]), "INT8"),
    }
    text = record_to_text(states)
    assert 'record {\n  key: "conv1"\n  value {\n    scale_d: ' in text
    assert 'dst_type: "INT8"' in text and "offset_w: 0" in text
    back = parse_record(text)
    assert list(back) == ["conv1", "logits"]
    for name, state in states.items():
        assert back[name].scale_d == state.scale_d and back[name].offset_d == state.offset_d
        np.testing.assert_array_equal(back[name].scale_w, state.scale_w)
        assert back[name].dst_type_w == state.dst_type_w
    np.testing.assert_array_equal(back["conv1"].round_up[: round_up.size], round_up.reshape(-1))
    assert back["logits"].round_up is None


@pytest.mark.parametrize("text, expected", [
    ('record { key: "a" value { scale_d: 1 scale_w: 1 offset_d: 300 } }', "outside int8"),
    ('record { key: "a" value { scale_d: 1 } }', "needs scale_d and scale_w"),
    ('record { key: "a" value { scale_d: 1 scale_w: 1 offset_w: 2 } }', "symmetric"),
    ('record { key: "a" value { scale_d: 1 scale_w: 1 dst_type: "INT2" } }', "INT8, INT4"),
    ('record { key: "a" value { scale_d: 1 scale_w: 1 scale_x: 2 } }', r"rec\.txt:1:.*scale_x"),
])
def test_record_errors(text, expected):
    with pytest.raises(ValueError, match=expected):
        parse_record(text, "rec.txt")
