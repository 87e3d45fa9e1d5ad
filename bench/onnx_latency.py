"""Benchmark 3: int8 deploy ONNX vs float ONNX in ONNX Runtime.

The float ONNX is the quantizer's own float export of the same Keras model
(`quant.build_onnx(model, "float")`), so the two graphs differ only by
quantization. The deploy model comes from the block-distillation quantizer
(`quant.quantize_model`, with --deploy_activation_dtype), or from
--deploy_onnx/--float_onnx files. When it quantizes itself (once), it times
both deploy variants, int8 and uint8 activations (int8 weights in both, the
same logits; see `quantize_onnx.deploy_activation_dtype`): the second is
exported again from the run's record. Latency is per `session.run` at batch
1 and 32, the models interleaved round after round (median per model):
`int8_act_over_float` and `uint8_act_over_float` (only the given file's
variant with --deploy_onnx); sizes are the files' bytes.

Full run (the trainer's distilled student):

    python -m knowledge_distillation --output_dir=output
    python bench/onnx_latency.py --model=output/distilled.keras
Reduced run (trains a Hinton 2x800 student briefly here):

    python bench/onnx_latency.py --train_size=8192 --calibration_size=512 --runs=100

Prints one JSON line.
"""

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

common.quiet_tf()

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
common.define_float_model_flags(flags)
flags.DEFINE_string("float_onnx", None, "A float ONNX file (with --deploy_onnx: no quantizing).")
flags.DEFINE_string("deploy_onnx", None, "An int8 deploy ONNX file.")
flags.DEFINE_integer("runs", 300, "Timed runs per model, batch size and round.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes.")
flags.DEFINE_integer("threads", 0, "ORT intra-op threads (0: ORT default).")
flags.DEFINE_enum("deploy_activation_dtype", "auto", ["auto", "int8", "uint8"],
                  "The quantizer's deploy model activations (the other variant is timed too).")
flags.DEFINE_boolean("ort_reference", True,
                     "Also time ORT's own quantize_static QDQ int8 model (S8S8, per-channel, "
                     "MinMax) of the same float ONNX: what ORT's fused int8 kernels reach here.")


def _activation_dtype(onnx_path):
    """"int8" or "uint8": the zero point dtype of a deploy model's QuantizeLinear nodes."""
    import onnx

    model = onnx.load(onnx_path)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    types = {inits.get(n.input[2]) for n in model.graph.node
             if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    return "uint8" if types == {onnx.TensorProto.UINT8} else "int8"


def _other_variant(model, quant_dir, activation_dtype, path):
    """The deploy model with `activation_dtype` activations, from the run's record."""
    from knowledge_distillation import quant
    from knowledge_distillation.quant.quantize_build import float32_policy

    paths = quant.output_paths(quant_dir, "model")
    with float32_policy():
        qmodel = quant.create_quant_model(model, quant.DistillConfig.load(paths["config"]))
        qmodel.apply_record(quant.load_record(paths["record"]))
        quant.save_onnx(quant.build_onnx(qmodel.keras_model, "deploy", name="model_deploy",
                                         activation_dtype=activation_dtype), path)
    return path


def main(argv):
    import numpy as np
    import onnxruntime as ort

    from knowledge_distillation import data as data_lib
    from knowledge_distillation import quant

    quant_info = {}
    with tempfile.TemporaryDirectory() as tmp:
        if FLAGS.float_onnx and FLAGS.deploy_onnx:
            float_path, deploy_path = FLAGS.float_onnx, FLAGS.deploy_onnx
            data = data_lib.load_data(FLAGS.data_path, train_size=64, test_size=64)
            view = common.model_view(FLAGS.model_name, FLAGS.image_size, FLAGS.preprocessing)
        else:
            model, data, view = common.float_model_and_data(
                FLAGS.model, FLAGS.data_path, FLAGS.model_name, FLAGS.train_size, 2000,
                FLAGS.train_epochs, image_size=FLAGS.image_size,
                preprocessing=FLAGS.preprocessing, model_cache=FLAGS.model_cache)
            float_path = os.path.join(tmp, "float.onnx")
            quant.save_onnx(quant.build_onnx(model, "float"), float_path)
            summary = quant.quantize_model(model, data, os.path.join(tmp, "q"), name="model",
                                           calibration_size=FLAGS.calibration_size,
                                           activation_dtype=FLAGS.deploy_activation_dtype,
                                           deploy_format="integer", view=view)
            deploy_path = summary["paths"]["deploy_model"]
            quant_info = {"float_top1": summary["before"]["top1"],
                          "fake_quant_top1": summary["after"]["top1"],
                          "deploy_top1": summary["deploy"]["top1"],
                          "deploy_activation_dtype": summary["deploy_activation_dtype"],
                          "quantize_seconds": summary["seconds"]}
        options = ort.SessionOptions()
        if FLAGS.threads:
            options.intra_op_num_threads = FLAGS.threads
        deploy_dtype = _activation_dtype(deploy_path)
        paths = {"float": float_path, f"{deploy_dtype}_act": deploy_path}
        if quant_info:  # quantized here: time the other activation dtype too
            other = "int8" if deploy_dtype == "uint8" else "uint8"
            paths[f"{other}_act"] = _other_variant(
                model, os.path.join(tmp, "q"), other, os.path.join(tmp, f"deploy_{other}.onnx"))
            outputs = {}
            for key in ("int8_act", "uint8_act"):
                s = ort.InferenceSession(paths[key], providers=["CPUExecutionProvider"])
                outputs[key] = s.run(None, {s.get_inputs()[0].name:
                                            common.processed(data.x_test[:256], view)})[0]
            quant_info["uint8_vs_int8_act_max_abs_logit_diff"] = float(
                np.max(np.abs(outputs["uint8_act"] - outputs["int8_act"])))
        if FLAGS.ort_reference:
            from onnxruntime import quantization as oq

            calib = common.processed(data.x_train[:256], view)
            name = ort.InferenceSession(float_path).get_inputs()[0].name
            paths["ort_qdq_int8"] = os.path.join(tmp, "ort_qdq.onnx")
            oq.quantize_static(float_path, paths["ort_qdq_int8"],
                               common.CalibrationReader(name, calib),
                               quant_format=oq.QuantFormat.QDQ, per_channel=True,
                               activation_type=oq.QuantType.QInt8,
                               weight_type=oq.QuantType.QInt8)
        sessions = {name: ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                    for name, path in paths.items()}
        sizes = {"float_bytes": os.path.getsize(float_path),
                 "int8_bytes": os.path.getsize(deploy_path)}
        images = common.processed(data.x_test[:32], view)
        latency = {}
        for bs in (int(b) for b in FLAGS.batch_sizes):
            batch = np.ascontiguousarray(images[:bs])
            times = {name: [] for name in sessions}
            for name, s in sessions.items():
                for _ in range(20):  # warm-up
                    s.run(None, {s.get_inputs()[0].name: batch})
            for _ in range(FLAGS.rounds):
                for name, s in sessions.items():
                    feed = {s.get_inputs()[0].name: batch}
                    start = time.perf_counter()
                    for _ in range(FLAGS.runs):
                        s.run(None, feed)
                    times[name].append((time.perf_counter() - start) / FLAGS.runs)
            f = statistics.median(times["float"])
            latency[f"batch{bs}"] = {"float_ms": f * 1e3}
            for key in ("int8_act", "uint8_act"):
                if key in times:
                    q = statistics.median(times[key])
                    latency[f"batch{bs}"].update({f"{key}_ms": q * 1e3,
                                                  f"{key}_over_float": q / f})
            if "ort_qdq_int8" in times:
                o = statistics.median(times["ort_qdq_int8"])
                latency[f"batch{bs}"].update({"ort_qdq_int8_ms": o * 1e3,
                                              "ort_qdq_int8_over_float": o / f})
        ops = sorted({n.op_type for n in __import__("onnx").load(deploy_path).graph.node})
    common.emit({
        "bench": "onnx_latency",
        "config": {"model": FLAGS.model or FLAGS.deploy_onnx or FLAGS.model_name,
                   "train_size": FLAGS.train_size, "calibration_size": FLAGS.calibration_size,
                   "runs": FLAGS.runs, "rounds": FLAGS.rounds, "threads": FLAGS.threads,
                   "deploy_activation_dtype": FLAGS.deploy_activation_dtype,
                   "onnxruntime": ort.__version__},
        "machine": common.machine(),
        "latency": latency,
        "sizes": {**sizes, "float_over_int8": sizes["float_bytes"] / sizes["int8_bytes"]},
        "deploy_op_types": ops,
        "deploy_activation_dtype": deploy_dtype,
        "quantizer": quant_info,
    })


if __name__ == "__main__":
    app.run(main)
