"""End to end on a convnet trained here on a Fashion-MNIST slice."""

import filecmp
import json
import os

import keras
import numpy as np
import onnx
import pytest
from keras import layers

from knowledge_distillation.data import load_data, make_dataset, preprocess
from knowledge_distillation.quant import (
    DistillConfig,
    compare_logits,
    create_distill_config,
    create_quant_model,
    distill,
    keras_logits,
    load_record,
    output_paths,
    quantize_model,
    save_quant_model,
)


def build_convnet(input_shape, num_classes):
    """Conv-BN-ReLU, a depthwise-separable residual block, a strided conv, Dense."""
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = layers.BatchNormalization(momentum=0.9, name="conv1_bn")(x)
    x = layers.ReLU(name="conv1_relu")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    y = layers.BatchNormalization(momentum=0.9, name="dw_bn")(y)
    y = layers.ReLU(6.0, name="dw_relu")(y)
    y = layers.Conv2D(16, 1, use_bias=False, name="pw")(y)
    y = layers.BatchNormalization(momentum=0.9, name="pw_bn")(y)
    x = layers.Add(name="add")([x, y])
    x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="convnet")


@pytest.fixture(scope="module")
def data(fashion_mnist_path):
    return load_data(fashion_mnist_path, train_size=4096, test_size=1000)


@pytest.fixture(scope="module")
def trained(data):
    keras.utils.set_random_seed(0)
    model = build_convnet(data.input_shape, data.num_classes)
    model.compile(keras.optimizers.Adam(2e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(make_dataset(data.x_train, data.y_train, 64, shuffle=True, seed=0),
              epochs=2, verbose=0)
    return model


@pytest.fixture(scope="module")
def int8_run(trained, data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("int8"))
    return out, quantize_model(trained, data, out, name="net", calibration_size=512, epochs=1,
                               deploy_format="integer")


def test_int8_keeps_float_accuracy_and_onnx_reproduces_tf(int8_run):
    out, result = int8_run
    before, after = result["before"]["top1"], result["after"]["top1"]
    assert before > 0.7, f"the test model trained badly: {before}"
    assert after >= before - 0.015, result
    assert result["vs_float"]["argmax_agreement"] >= 0.98, result["vs_float"]
    # the fake-quant ONNX model in ONNX Runtime is the TF simulation
    assert after == result["tf_simulation"]["top1"]
    # every quantized op sums exact integers: the three agree bitwise here
    assert result["onnx_vs_tf"]["max_abs_logit_diff"] <= 1e-4
    assert result["deploy_vs_fake_quant"]["max_abs_logit_diff"] <= 1e-4
    assert result["deploy"]["top1"] == after
    sizes = result["sizes"]
    assert sizes["deploy_bytes"] * 3 < sizes["float_onnx_bytes"]  # int8 weights + per-channel scales
    for key in ("config", "record", "fake_quant_model", "deploy_model", "log"):
        assert os.path.getsize(result["paths"][key]) > 0
    assert [b["layers"][0] for b in result["blocks"]] == ["conv1", "dw", "pw", "conv2", "logits"]
    log = open(result["paths"]["log"]).read()
    assert "block 3/5 ['pw', 'pw_bn']" in log and "MSE loss before" in log
    json.dumps(result)


def test_deploy_model_holds_int8_weights_with_batchnorm_folded(int8_run):
    _, result = int8_run
    deploy = onnx.load(result["paths"]["deploy_model"])
    ops = [node.op_type for node in deploy.graph.node]
    assert ops.count("ConvInteger") == 4 and ops.count("MatMulInteger") == 1
    assert "Conv" not in ops and "MatMul" not in ops and "BatchNormalization" not in ops
    weights = [onnx.numpy_helper.to_array(t) for t in deploy.graph.initializer
               if t.name.endswith("/weight_int8")]
    assert len(weights) == 5 and all(w.dtype == np.int8 and np.abs(w).max() <= 127 for w in weights)


def test_saving_again_from_the_record_reproduces_the_onnx_models(int8_run, trained, tmp_path):
    out, _ = int8_run
    paths = output_paths(out, "net")
    config = DistillConfig.load(paths["config"])
    qmodel = create_quant_model(trained, config)
    qmodel.apply_record(load_record(paths["record"]))
    again = save_quant_model(qmodel, str(tmp_path), "net", deploy_format="integer")
    assert filecmp.cmp(again["record"], paths["record"], shallow=False)
    for key in ("fake_quant_model", "deploy_model"):
        assert filecmp.cmp(again[key], paths[key], shallow=False), key


def test_int4_learned_rounding_beats_round_to_nearest(trained, data):
    config = create_distill_config(
        trained, "distill_weight_quant_config { arq_distill { dst_type: INT4 } }")
    images = preprocess(data.x_train[:256]).numpy()
    distilled = create_quant_model(trained, config)
    reports = distill(distilled, images, epochs=8)
    before = sum(r["loss_before"] for r in reports)  # calibrated, rounded to nearest
    after = sum(r["loss_after"] for r in reports)
    assert after < 0.85 * before, reports
    assert sum(r["kept"] == "distilled" for r in reports) >= 3, reports
    # and the whole model follows the float one more closely on unseen images
    calibrated = create_quant_model(trained, config)
    distill(calibrated, images, epochs=0)
    reference = keras_logits(trained, data.x_test)
    error = {name: compare_logits(keras_logits(q.keras_model, data.x_test), reference)
             for name, q in (("distilled", distilled), ("calibrated", calibrated))}
    assert error["distilled"]["relative_error"] < 0.8 * error["calibrated"]["relative_error"], error


def _carried_inputs_match_from_input(model, images):
    from knowledge_distillation.quant.quantize_distill import CarriedOutputs

    qmodel = create_quant_model(model, create_distill_config(model))
    distill(qmodel, images, epochs=0)

    def from_input(tensor_id):
        return CarriedOutputs(images).inputs(qmodel, tensor_id)

    carried = CarriedOutputs(images)
    sources = []
    for block in qmodel.blocks:
        tensor_id = qmodel.block_input_id(block)
        sources.append(len(qmodel.segment_sources(tensor_id, carried.values)))
        for got, want in zip(carried.inputs(qmodel, tensor_id), from_input(tensor_id)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        carried.add(qmodel.block_output_id(block), *from_input(qmodel.block_output_id(block)))
    return qmodel, sources


def test_block_inputs_carried_forward_match_the_whole_prefix(trained, data):
    images = preprocess(data.x_train[:128]).numpy()
    qmodel, sources = _carried_inputs_match_from_input(trained, images)
    # the block after the residual add starts from two kept tensors (the
    # skip branch and the previous block's output), not from the image
    assert max(sources) == 2, (qmodel.blocks, sources)


def test_block_inputs_carried_through_dropout_and_pooling(data):
    # the zoo's cnn teacher: a Dropout right after a block passes the kept
    # output through unchanged in the quantized model
    from knowledge_distillation.models import build_model

    model = build_model("cnn", data.input_shape, data.num_classes, seed=0)
    _carried_inputs_match_from_input(model, preprocess(data.x_train[:64]).numpy())
