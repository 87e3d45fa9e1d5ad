"""The block-distillation quantization flow, step by step and end to end.

The steps follow AMCT's sample, each usable alone:

1. `create_distill_config(model, simple_config)` -> `DistillConfig`
   (saved as `tmp/distill_config.json`);
2. `create_quant_model(model, config)` -> `QuantizedModel`;
3. `distill(qmodel, images, epochs=...)` calibrates and distils it block by
   block;
4. `save_quant_model(qmodel, output_dir, name)` writes
   `tmp/scale_offset_record.txt`, `result/<name>_fake_quant_model.onnx`
   and `result/<name>_deploy_model.onnx` (its activations int8 or uint8, as
   suits this CPU: see `quantize_onnx.deploy_activation_dtype`).

`quantize_model` runs them all on an `ImageData`, evaluates the float model
(Keras) and the fake-quant model (ONNX Runtime) on the test split, checks the
TF simulation, fake-quant and deploy models against each other, and returns
a JSON-ready summary. The trainer calls it with `--quantize`.
"""

import logging
import os
import shutil
import time

import numpy as np
import onnxruntime as ort

from knowledge_distillation import data as data_lib
from knowledge_distillation.quant import quantize_distill, quantize_graph, quantize_onnx
from knowledge_distillation.quant.quantize_build import create_quant_model, float32_policy
from knowledge_distillation.quant.quantize_config import create_distill_config
from knowledge_distillation.quant.quantize_record import save_record
from knowledge_distillation.util.files import (
    make_staging_dir,
    remove_stale_staging,
    replace_entries,
    write_json_atomic,
)
from knowledge_distillation.util.inference import batched_predict

logger = logging.getLogger(__name__)

LOG_DIR = "amct_log"
LOG_FILE = "quantize.log"
SUMMARY_FILE = "quantize_summary.json"
CONFIG_FILE = os.path.join("tmp", "distill_config.json")
RECORD_FILE = os.path.join("tmp", "scale_offset_record.txt")


def output_paths(output_dir, name):
    """Where the flow writes its files under `output_dir`."""
    return {
        "config": os.path.join(output_dir, CONFIG_FILE),
        "record": os.path.join(output_dir, RECORD_FILE),
        "fake_quant_model": os.path.join(output_dir, "result", f"{name}_fake_quant_model.onnx"),
        "deploy_model": os.path.join(output_dir, "result", f"{name}_deploy_model.onnx"),
        "log": os.path.join(output_dir, LOG_DIR, LOG_FILE),
    }


def save_quant_model(qmodel, output_dir, name, activation_dtype="auto", deploy_format="auto"):
    """Writes the record and the fake-quant and deploy ONNX models.

    Args:
        qmodel: a frozen `QuantizedModel` (distilled, or with a record applied).
        output_dir: the run's folder (`tmp/` and `result/` go under it).
        name: file name stem of the ONNX models.
        activation_dtype: the deploy model's activations: "int8", "uint8"
            (same logits, different ONNX Runtime kernels) or "auto" (uint8
            on an x86-64 CPU with VNNI, else int8); see
            `quantize_onnx.deploy_activation_dtype`. Defaults to "auto".
        deploy_format: "qdq" (DequantizeLinear -> Conv/Gemm, fused by
            ONNX Runtime into QLinearConv/QGemm; what TensorRT, OpenVINO
            and QNN read), "integer" (ConvInteger/MatMulInteger with a float
            epilogue, AMCT's form) or "auto" (qdq on a VNNI or non-x86 CPU,
            integer on x86 without VNNI); see
            `quantize_onnx.resolve_deploy_format`. Defaults to "auto".

    Returns:
        `{"record": path, "fake_quant_model": path, "deploy_model": path,
        "fake_quant_bytes": int, "deploy_bytes": int,
        "deploy_activation_dtype": "int8" or "uint8",
        "deploy_format": "qdq" or "integer"}`.
    """
    if not qmodel.frozen:
        raise ValueError("the quantized model is not frozen: run distill() or apply_record() first")
    deploy_format = quantize_onnx.resolve_deploy_format(deploy_format)
    activation_dtype = quantize_onnx.deploy_activation_dtype(
        activation_dtype, deploy_format=deploy_format)
    paths = output_paths(output_dir, name)
    save_record(paths["record"], qmodel.states())
    result = {"record": paths["record"], "deploy_activation_dtype": activation_dtype,
              "deploy_format": deploy_format}
    for mode in ("fake_quant", "deploy"):
        kwargs = {"activation_dtype": activation_dtype, "deploy_format": deploy_format} \
            if mode == "deploy" else {}
        model = quantize_onnx.build_onnx(qmodel.keras_model, mode, name=f"{name}_{mode}", **kwargs)
        result[f"{mode}_bytes"] = quantize_onnx.save_onnx(model, paths[f"{mode}_model"])
        result[f"{mode}_model"] = paths[f"{mode}_model"]
    logger.info("record written to %s", paths["record"])
    logger.info("fake-quant model written to %s (%d bytes)", result["fake_quant_model"],
                result["fake_quant_bytes"])
    logger.info("deploy model (%s, %s activations) written to %s (%d bytes)", deploy_format,
                activation_dtype, result["deploy_model"], result["deploy_bytes"])
    return result


# --- evaluation ----------------------------------------------------------------


def topk_accuracy(logits, labels):
    """`(top1, top5)` of logits against integer labels (top-k capped at the class count);
    `(None, None)` when `labels` is None (images without labels)."""
    if labels is None:
        return None, None
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    k = min(5, logits.shape[-1])
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    top1 = int(np.sum(top[:, 0] == labels)) / len(labels)
    top5 = int(np.sum(np.any(top == labels[:, None], axis=1))) / len(labels)
    return top1, top5


def _batches(x, batch_size, num_parallel_reads=None, view=None):
    dataset = data_lib.make_dataset(x, np.zeros(len(x), np.int64), batch_size, view=view)
    if num_parallel_reads:
        import tensorflow as tf

        options = tf.data.Options()
        options.threading.private_threadpool_size = int(num_parallel_reads)
        dataset = dataset.with_options(options)
    for images, _ in dataset:
        yield images


def keras_logits(model, x, batch_size=256, num_parallel_reads=None, view=None):
    """Logits of a Keras model on stored images (or image files) through `view`
    (`data.ImageView`; default: as stored, `unit` scaling)."""
    return batched_predict(model, _batches(x, batch_size, num_parallel_reads, view))


def onnx_session(model, num_threads=None, optimize="basic"):
    """An ONNX Runtime CPU session of a path or `ModelProto`.

    `optimize="basic"` (the default) is not ORT's default (all): from the
    extended level on, ORT fuses the fake-quant model's
    QuantizeLinear/DequantizeLinear pairs into integer kernels, which
    saturate on x86 CPUs without VNNI, so the model would no longer simulate
    the quantized arithmetic (measured on a 2-core AVX2 AMD EPYC: largest
    logit error 0.38 against the TF simulation, 0.0 at basic). A QDQ deploy
    model is meant to be fused: run it with `optimize="all"`, as deployed.
    """
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimize]
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_logits(model, x, batch_size=256, num_parallel_reads=None, view=None, optimize="basic"):
    """Logits of an ONNX model (path or proto) in ONNX Runtime on stored images through `view`."""
    session = model if isinstance(model, ort.InferenceSession) else \
        onnx_session(model, optimize=optimize)
    input_name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {input_name: images.numpy()})[0]
                           for images in _batches(x, batch_size, num_parallel_reads, view)])


def compare_logits(logits, reference):
    """How closely `logits` follow `reference` (same images).

    Returns:
        `max_abs_logit_diff`, `argmax_agreement` (fraction of images with
        the same top-1 class) and `relative_error`
        (`mean((logits - reference)^2) / mean(reference^2)`).
    """
    logits = np.asarray(logits, np.float64)
    reference = np.asarray(reference, np.float64)
    return {
        "max_abs_logit_diff": float(np.max(np.abs(logits - reference))),
        "argmax_agreement": float(np.mean(np.argmax(logits, -1) == np.argmax(reference, -1))),
        "relative_error": float(np.mean((logits - reference) ** 2) / max(np.mean(reference ** 2), 1e-30)),
    }


# --- the whole flow -------------------------------------------------------------


# Evaluation batches hold at most this many bytes of layer outputs.
EVAL_BATCH_BYTES = 1 << 30


def evaluation_batch_size(model, budget=EVAL_BATCH_BYTES, largest=256):
    """Images per evaluation batch: `largest`, fewer where every layer's output of one
    image, summed, would put a batch over `budget` bytes (float32).

    The sum bounds what a graph-mode forward pass can hold at once. Unknown
    sizes (a backbone built for any input size) count as the model input's
    largest side. At 224x224 MobileNetV2's layer outputs sum to 87 MB per
    image: 12 images per batch. Measured on AMCT's 160-image sample: the
    evaluation before distillation held 10-15 GB of RSS with 256-image
    batches, 3.6 GB with 12 (the quantizer's peak, 17.5 GB, is now in block
    distillation).
    """
    try:
        graph = quantize_graph.Graph(model)
    except ValueError:
        return largest
    known = [d for d in tuple(graph.input_tensor.shape)[1:-1] if d]
    side = max(known) if known else 224
    per_image = sum(int(np.prod([d or side for d in shape[1:]])) for node in graph.nodes
                    for shape in node.output_shapes) * 4
    return int(max(1, min(largest, budget // max(per_image, 1))))


def _calibration_images(data, size, seed, view=None):
    """A seeded sample of the training images, preprocessed through `view`, as float32."""
    n = len(data.x_train)
    size = min(int(size), n)
    index = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    return np.concatenate([images.numpy() for images in
                           _batches(data.x_train[index], 256, view=view)])


def quantize_model(
    model,
    data,
    output_dir,
    name=None,
    batch_size=32,
    calibration_size=1024,
    config_text=None,
    config_source="<config>",
    epochs=1,
    max_input_drift=0.1,
    seed=0,
    num_parallel_reads=None,
    activation_dtype="auto",
    view=None,
    deploy_format="auto",
):
    """Quantizes a float Keras model by block distillation and evaluates it.

    Writes under `output_dir`: `tmp/distill_config.json`,
    `tmp/scale_offset_record.txt`, `result/<name>_fake_quant_model.onnx`,
    `result/<name>_deploy_model.onnx` and `amct_log/quantize.log`.

    Everything runs in float32, also for a model trained under a mixed
    precision policy: the "before" accuracy is that of a float32 copy.

    Args:
        model: the float functional or sequential `keras.Model` (logits out).
        data: an `ImageData`; a slice of its training split calibrates and
            distils, its test split evaluates.
        output_dir: where the files go.
        name: stem of the ONNX file names. Defaults to the model's name.
        batch_size: examples per distillation step and calibration batch.
            Defaults to 32.
        calibration_size: training images used to calibrate and distil.
            Defaults to 1024.
        config_text: optional AMCT simple config (protobuf text).
        config_source: its file name, for error messages.
        epochs: passes over the calibration images per block (0:
            calibration only). Defaults to 1.
        max_input_drift: see `distill`. Defaults to 0.1.
        seed: seed of the calibration sample and of training. Defaults to 0.
        num_parallel_reads: threads of the evaluation input pipelines.
        activation_dtype: the deploy model's activations, "auto" (uint8 on
            an x86-64 CPU with VNNI, else int8), "int8" or "uint8"; see
            `save_quant_model`. Defaults to "auto".
        view: the `data.ImageView` the images go through (size, colour mode,
            scaling), the same for Keras and ONNX Runtime. Defaults to None
            (the stored images, `unit` scaling).
        deploy_format: "auto", "qdq" or "integer"; see `save_quant_model`.
            The deploy model is scored with ORT's full optimisations (its
            QDQ form fused), as deployed.

    Returns:
        A JSON-serialisable dict: `before` and `after` (top1/top5 of the float
        Keras model and of the fake-quant ONNX model in ONNX Runtime),
        `tf_simulation` and `deploy` top1/top5, `vs_float` (the fake-quant
        model's logits against the float model's: top-1 agreement, relative
        error), `onnx_vs_tf` and `deploy_vs_fake_quant` (largest logit
        difference, argmax agreement),
        `sizes` (bytes of float/fake-quant/deploy ONNX),
        `deploy_activation_dtype` (the resolved "int8" or "uint8"),
        `deploy_format` ("qdq" or "integer"), `float_layers` (every layer
        with weights left in float: type and reason), `blocks`
        (per-block losses), `paths`, `seconds`.
    """
    quantize_onnx.check_requested_activation_dtype(activation_dtype)
    quantize_onnx.check_requested_deploy_format(deploy_format)
    name = name or model.name
    paths = output_paths(output_dir, name)
    os.makedirs(os.path.dirname(paths["log"]), exist_ok=True)
    handler = logging.FileHandler(paths["log"])
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("knowledge_distillation")
    package_logger.addHandler(handler)
    if package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)
    try:
        with float32_policy():
            return _quantize(model, data, output_dir, name, paths, batch_size, calibration_size,
                             config_text, config_source, epochs, max_input_drift, seed,
                             num_parallel_reads, activation_dtype, view, deploy_format)
    finally:
        package_logger.removeHandler(handler)
        handler.close()


def _quantize(model, data, output_dir, name, paths, batch_size, calibration_size, config_text,
              config_source, epochs, max_input_drift, seed, num_parallel_reads,
              activation_dtype, view, deploy_format):
    start = time.perf_counter()
    x_test, y_test = data.x_test, (data.y_test if data.labelled else None)
    reads = {"num_parallel_reads": num_parallel_reads, "view": view,
             "batch_size": evaluation_batch_size(model)}
    logger.info("quantizing %s: %d calibration images from %s train, %d test images",
                name, min(calibration_size, len(data.x_train)), data.name, len(x_test))
    if data.test_is_train:
        logger.info("the calibration images are a sample of the test images (one folder serves "
                    "both, as in AMCT's sample): the accuracies are not held-out figures")
    if not data.labelled:
        logger.info("the images have no labels: they calibrate, and no accuracy is measured; "
                    "the quantized model is checked against the float model's logits")
    config = create_distill_config(model, config_text, source=config_source)
    config.save(paths["config"])
    logger.info("distill config: %d quantized layers in %d blocks (group_size %d), written to %s",
                len(config.quantized_layers), len(config.distill_group), config.group_size,
                paths["config"])
    qmodel = create_quant_model(model, config)
    # The float reference is the float32 copy the blocks distil from.
    float_logits = keras_logits(qmodel.teacher_model, x_test, **reads)
    before = topk_accuracy(float_logits, y_test)
    logger.info("%s before quantize top1: %s top5: %s", name, *before)
    images = _calibration_images(data, calibration_size, seed, view)
    distill_start = time.perf_counter()
    dump_dir = os.path.join(output_dir, "tmp", "data_dump") if config.data_dump else None
    blocks = quantize_distill.distill(
        qmodel, images, epochs=epochs, batch_size=batch_size,
        max_input_drift=max_input_drift, seed=seed, dump_dir=dump_dir)
    distill_seconds = time.perf_counter() - distill_start
    saved = save_quant_model(qmodel, output_dir, name, activation_dtype, deploy_format)

    try:  # only for the size comparison: a float layer tf2onnx cannot convert must not end the run
        float_bytes = len(quantize_onnx.build_onnx(qmodel.teacher_model, "float").SerializeToString())
    except ValueError as e:
        float_bytes = None
        logger.warning("float ONNX export (for the size comparison only) failed: %s", e)
    sim_logits = keras_logits(qmodel.keras_model, x_test, **reads)
    fake_logits = onnx_logits(saved["fake_quant_model"], x_test, **reads)
    deploy_logits = onnx_logits(saved["deploy_model"], x_test, optimize="all", **reads)
    after = topk_accuracy(fake_logits, y_test)
    logger.info("%s after quantize  top1: %s top5: %s", name, *after)
    vs_float = compare_logits(fake_logits, float_logits)
    logger.info("fake-quant vs float model: same top-1 on %.4f of the test images, relative "
                "logit error %.3g", vs_float["argmax_agreement"], vs_float["relative_error"])
    onnx_vs_tf = compare_logits(fake_logits, sim_logits)
    deploy_vs_fake = compare_logits(deploy_logits, fake_logits)
    logger.info("ONNX Runtime fake-quant vs TF simulation: largest logit difference %.3g, "
                "argmax agreement %.4f", onnx_vs_tf["max_abs_logit_diff"],
                onnx_vs_tf["argmax_agreement"])
    logger.info("deploy vs fake-quant: largest logit difference %.3g, argmax agreement %.4f",
                deploy_vs_fake["max_abs_logit_diff"], deploy_vs_fake["argmax_agreement"])
    if float_bytes:
        logger.info("deploy model (%s, %s activations) %d bytes, %.2fx smaller than the float "
                    "ONNX model (%d bytes)", saved["deploy_format"], saved["deploy_activation_dtype"],
                    saved["deploy_bytes"], float_bytes / saved["deploy_bytes"], float_bytes)
    weight_types = sorted({layer.weight_dst_type for layer in config.layers.values()
                           if layer.quant_enable})
    return {
        "name": name,
        "weight_dst_types": weight_types,
        "epochs": epochs,
        "calibration_size": len(images),
        "batch_num": config.batch_num,
        "calibration_range_images": quantize_distill.range_images(
            len(images), batch_size, config.batch_num),
        "test_size": len(x_test),
        "labelled": bool(data.labelled),
        "test_is_train": bool(data.test_is_train),
        "view": (view or data_lib.ImageView()).describe(),
        "before": {"top1": before[0], "top5": before[1]},
        "after": {"top1": after[0], "top5": after[1]},
        "tf_simulation": dict(zip(("top1", "top5"), topk_accuracy(sim_logits, y_test))),
        "deploy": dict(zip(("top1", "top5"), topk_accuracy(deploy_logits, y_test))),
        "vs_float": vs_float,
        "onnx_vs_tf": onnx_vs_tf,
        "deploy_vs_fake_quant": deploy_vs_fake,
        "deploy_activation_dtype": saved["deploy_activation_dtype"],
        "deploy_format": saved["deploy_format"],
        "sizes": {"float_onnx_bytes": float_bytes,
                  "fake_quant_bytes": saved["fake_quant_bytes"],
                  "deploy_bytes": saved["deploy_bytes"]},
        "blocks": blocks,
        "float_layers": qmodel.float_layers(),
        "paths": {key: paths[key] for key in ("config", "record", "fake_quant_model",
                                              "deploy_model", "log")},
        "distill_seconds": distill_seconds,
        "seconds": time.perf_counter() - start,
    }


# The files of one quantization, replaced together (AMCT's layout under output_dir).
OUTPUT_SET = ("tmp", "result", LOG_DIR, SUMMARY_FILE)


def quantize_into(output_dir, model, data, summary_extra=None, **kwargs):
    """`quantize_model` whose outputs replace the earlier ones in `output_dir` as one set.

    Everything is written into a staging folder inside `output_dir` and moved
    into place (`tmp/`, `result/`, `amct_log/`, `quantize_summary.json`) only
    when all of it is written: a killed run leaves the earlier complete set.

    Args:
        output_dir: where the set goes.
        model, data: see `quantize_model`.
        summary_extra: entries added to the summary before it is written.
        **kwargs: passed to `quantize_model`.

    Returns:
        The summary, with the final paths.
    """
    for stale in remove_stale_staging(output_dir):
        logger.info("removed %s, left in %s by a run that was killed", stale, output_dir)
    staging = make_staging_dir(output_dir)
    try:
        summary = quantize_model(model, data, staging, **kwargs)
        summary.update(summary_extra or {})
        summary["paths"] = {key: os.path.join(output_dir, os.path.relpath(path, staging))
                            for key, path in summary["paths"].items()}
        summary["paths"]["summary"] = os.path.join(output_dir, SUMMARY_FILE)
        write_json_atomic(os.path.join(staging, SUMMARY_FILE), summary)
        replace_entries(staging, output_dir, OUTPUT_SET)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("quantization outputs written to %s", output_dir)
    return summary
