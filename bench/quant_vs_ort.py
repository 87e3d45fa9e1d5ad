"""Benchmark 4: our block-distillation quantizer vs ONNX Runtime's quantize_static.

Same float model, same calibration images (`--calibration_size` training
images, seeded), same test images. ORT runs `quantize_static` on the
quantizer's float ONNX export with QDQ format, per-channel weights, int8
activations (S8S8: uint8 activations can saturate ORT's integer kernels on
CPUs without VNNI), MinMax and Entropy calibration, at INT8 and INT4
weights. Ours runs calibration only (`epochs=0`) and block distillation
(`epochs`, default 1 as in AMCT), same bit widths. Every ONNX model is scored
in ONNX Runtime: our fake-quant model at basic optimisation (the simulation),
the deploy models (ours in QDQ and integer form, ORT's QDQ) with every
optimisation, as deployed. Each row has its wall time, from float model to
written ONNX.

The model is `--model` (a trained `.keras`) or `--model_name` trained here:
one of the zoo's or a keras.applications network (`mobilenet_v2`,
`mobilenet_v3_small`, `resnet50`, `efficientnet_b0`, `convnext_tiny`,
weights=None) on Fashion-MNIST resized to `--image_size` RGB (64 by default).
Every row of the README's coverage table is one command, e.g.

    python bench/quant_vs_ort.py --model_name=mobilenet_v2 --train_size=10000 \
        --train_epochs=2 --test_size=2000 --model_cache=output/bench_models

It also reports the coverage (layers quantized of those with weights, and
each float one with its reason), the agreement of the TF simulation, the
fake-quant ONNX and the deploy ONNX (largest logit difference, in int8 steps
of the logits' range too), the fused quantized ops of our QDQ deploy model
in ORT's optimised graph, and latency at batch 1 and 32 of float ONNX, our
QDQ and integer deploy models (int8 and uint8 activations) and ORT's QDQ
model (INT8, interleaved rounds).

Prints one JSON line.
"""

import collections
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

common.quiet_tf()

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
common.define_float_model_flags(flags)
common.define_quantizer_flags(flags, "Our block-distillation passes.")
flags.DEFINE_list("ort_methods", ["MinMax", "Entropy"], "ORT calibration methods.")
flags.DEFINE_integer("seed", 0, "Seed of the calibration sample and of the model trained here.")
flags.DEFINE_boolean("calibration_only", True, "Also run our quantizer with epochs=0.")
flags.DEFINE_float("latency_seconds", 2.0,
                   "Seconds per model, batch size and round of the latency comparison (0: none).")
flags.DEFINE_integer("latency_rounds", 3, "Interleaved latency rounds.")

FUSED = ("QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearMul",
         "QLinearGlobalAveragePool", "QLinearConcat", "QLinearConvTranspose")


def _session(path, optimize, saved=None):
    import onnxruntime as ort

    from knowledge_distillation import quant

    if saved is None:
        return quant.onnx_session(path, optimize=optimize)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = saved
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _logits(session, x, batch_size=256):
    import numpy as np

    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


def _fused_ops(path, tmp):
    """Op counts of ORT's optimised graph (EXTENDED: the QDQ fusions, no CPU-specific layout)."""
    import onnx

    saved = os.path.join(tmp, "optimized.onnx")
    _session(path, "extended", saved)
    ops = collections.Counter(node.op_type for node in onnx.load(saved).graph.node)
    return {op: ops[op] for op in sorted(ops) if op in FUSED or op in
            ("Conv", "FusedConv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger")}


def main(argv):
    import numpy as np
    import onnx
    from onnxruntime import quantization as oq

    from knowledge_distillation import quant

    model, data, view = common.float_model_and_data(
        FLAGS.model, FLAGS.data_path, FLAGS.model_name, FLAGS.train_size, FLAGS.test_size,
        FLAGS.train_epochs, seed=FLAGS.seed, image_size=FLAGS.image_size,
        preprocessing=FLAGS.preprocessing, model_cache=FLAGS.model_cache)
    rng = np.random.default_rng(FLAGS.seed)
    index = np.sort(rng.choice(len(data.x_train), min(FLAGS.calibration_size, len(data.x_train)),
                               replace=False))
    calibration = common.processed(data.x_train[index], view)
    x_test = common.processed(data.x_test, view)
    y_test = data.y_test

    def top1(logits):
        return quant.topk_accuracy(logits, y_test)[0]

    float_logits = model.predict(x_test, batch_size=256, verbose=0)
    planned = quant.create_quant_model(model, quant.create_distill_config(model))
    float_layers = planned.float_layers()
    rows = []
    fused, latency_paths = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        float_path = os.path.join(tmp, "float.onnx")
        quant.save_onnx(quant.build_onnx(model, "float"), float_path)
        float_onnx_logits = _logits(_session(float_path, "all"), x_test)
        latency_paths["float"] = float_path
        input_name = onnx.load(float_path).graph.input[0].name
        for bits in FLAGS.bits:
            for epochs in sorted({0, FLAGS.epochs} if FLAGS.calibration_only else {FLAGS.epochs}):
                start = time.perf_counter()
                config = quant.create_distill_config(model, common.INT4_CONFIG if bits == "INT4" else None)
                qmodel = quant.create_quant_model(model, config)
                quant.distill(qmodel, calibration, epochs=epochs, seed=FLAGS.seed)
                out = os.path.join(tmp, f"ours_{bits}_{epochs}")
                saved = quant.save_quant_model(qmodel, out, "model", deploy_format="qdq")
                seconds = time.perf_counter() - start
                integer_path = os.path.join(out, "integer.onnx")
                quant.save_onnx(quant.build_onnx(qmodel.keras_model, "deploy",
                                                 activation_dtype="int8",
                                                 deploy_format="integer"), integer_path)
                sim = qmodel.keras_model.predict(x_test, batch_size=256, verbose=0)
                fake = _logits(_session(saved["fake_quant_model"], "basic"), x_test)
                qdq = _logits(_session(saved["deploy_model"], "all"), x_test)
                integer = _logits(_session(integer_path, "all"), x_test)
                step = float(fake.max() - fake.min()) / 255.0
                qdq_diff = float(np.abs(qdq - fake).max())
                rows.append({
                    "method": "ours block distillation" if epochs else "ours calibration only",
                    "weights": bits, "epochs": epochs, "seconds": seconds,
                    "top1_tf_simulation": top1(sim), "top1_fake_quant": top1(fake),
                    "top1_deploy_qdq": top1(qdq), "top1_deploy_integer": top1(integer),
                    "fake_quant_vs_float": quant.compare_logits(fake, float_logits),
                    "max_diff_fake_quant_vs_tf": float(np.abs(fake - sim).max()),
                    "max_diff_integer_vs_fake_quant": float(np.abs(integer - fake).max()),
                    "max_diff_qdq_vs_fake_quant": qdq_diff,
                    "qdq_vs_fake_quant_in_logit_int8_steps": qdq_diff / step if step else None,
                    "qdq_argmax_agreement": float(np.mean(qdq.argmax(-1) == fake.argmax(-1))),
                    "bytes_qdq": os.path.getsize(saved["deploy_model"]),
                    "bytes_integer": os.path.getsize(integer_path)})
                if epochs == FLAGS.epochs:
                    fused[bits] = _fused_ops(saved["deploy_model"], tmp)
                    if bits == "INT8":
                        latency_paths["ours_qdq"] = saved["deploy_model"]
                        latency_paths["ours_integer"] = integer_path
                        uint8_path = os.path.join(out, "integer_uint8.onnx")
                        quant.save_onnx(quant.build_onnx(
                            qmodel.keras_model, "deploy", activation_dtype="uint8",
                            deploy_format="integer"), uint8_path)
                        latency_paths["ours_integer_uint8"] = uint8_path
                print(f"{bits} epochs={epochs}: {rows[-1]}", file=sys.stderr)
            for method in FLAGS.ort_methods:
                out = os.path.join(tmp, f"ort_{bits}_{method}.onnx")
                row = {"method": f"ort quantize_static {method}", "weights": bits}
                start = time.perf_counter()
                try:
                    oq.quantize_static(
                        float_path, out, common.CalibrationReader(input_name, calibration),
                        quant_format=oq.QuantFormat.QDQ, per_channel=True,
                        activation_type=oq.QuantType.QInt8,
                        weight_type=oq.QuantType.QInt4 if bits == "INT4" else oq.QuantType.QInt8,
                        calibrate_method=getattr(oq.CalibrationMethod, method))
                    row["seconds"] = time.perf_counter() - start
                    row["top1"] = top1(_logits(_session(out, "all"), x_test))
                    row["bytes"] = os.path.getsize(out)
                    if bits == "INT8" and method == FLAGS.ort_methods[0]:
                        latency_paths["ort_qdq"] = out
                except Exception as e:  # report, keep benchmarking the rest
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                print(f"{row}", file=sys.stderr)
        latency = common.onnx_latency(latency_paths, x_test, FLAGS.latency_seconds,
                                      FLAGS.latency_rounds) if FLAGS.latency_seconds > 0 else None
    common.emit({
        "bench": "quant_vs_ort",
        "config": {"model": FLAGS.model or FLAGS.model_name, "view": view.describe(),
                   "train_size": len(data.x_train), "train_epochs": FLAGS.train_epochs,
                   "test_size": len(data.x_test), "calibration_size": len(calibration),
                   "epochs": FLAGS.epochs, "seed": FLAGS.seed},
        "machine": common.machine(),
        "float_top1": top1(float_logits),
        "float_onnx_top1": top1(float_onnx_logits),
        "coverage": {"quantized": len(planned.units),
                     "with_weights": len(planned.units) + len(float_layers),
                     "float_layers": float_layers},
        "qdq_fused_ops": fused,
        "latency": latency,
        "rows": rows,
    })


if __name__ == "__main__":
    app.run(main)
