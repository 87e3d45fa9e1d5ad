"""Benchmark 3: int8 deploy ONNX vs float ONNX in ONNX Runtime.

The float ONNX is the quantizer's own float export of the same Keras model
(`quant.build_onnx(model, "float")`), so the two graphs differ only by
quantization. The deploy model comes from the block-distillation quantizer
(`quant.quantize_model`), or from --deploy_onnx/--float_onnx files.
Latency is per `session.run` at batch 1 and 32, float and int8 runs
interleaved round after round (median per model); sizes are the files' bytes.

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
flags.DEFINE_boolean("ort_reference", True,
                     "Also time ORT's own quantize_static QDQ int8 model (S8S8, per-channel, "
                     "MinMax) of the same float ONNX: what ORT's fused int8 kernels reach here.")


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
        else:
            model, data = common.float_model_and_data(
                FLAGS.model, FLAGS.data_path, FLAGS.student, FLAGS.train_size, 2000,
                FLAGS.train_epochs)
            float_path = os.path.join(tmp, "float.onnx")
            quant.save_onnx(quant.build_onnx(model, "float"), float_path)
            summary = quant.quantize_model(model, data, os.path.join(tmp, "q"), name="model",
                                           calibration_size=FLAGS.calibration_size)
            deploy_path = summary["paths"]["deploy_model"]
            quant_info = {"float_top1": summary["before"]["top1"],
                          "fake_quant_top1": summary["after"]["top1"],
                          "deploy_top1": summary["deploy"]["top1"],
                          "quantize_seconds": summary["seconds"]}
        options = ort.SessionOptions()
        if FLAGS.threads:
            options.intra_op_num_threads = FLAGS.threads
        paths = {"float": float_path, "int8": deploy_path}
        if FLAGS.ort_reference:
            from onnxruntime import quantization as oq

            calib = data_lib.preprocess(data.x_train[:256]).numpy()
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
        images = data_lib.preprocess(data.x_test[:32]).numpy()
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
            f, q = statistics.median(times["float"]), statistics.median(times["int8"])
            latency[f"batch{bs}"] = {"float_ms": f * 1e3, "int8_ms": q * 1e3,
                                     "int8_over_float": q / f}
            if "ort_qdq_int8" in times:
                o = statistics.median(times["ort_qdq_int8"])
                latency[f"batch{bs}"].update({"ort_qdq_int8_ms": o * 1e3,
                                              "ort_qdq_int8_over_float": o / f})
        ops = sorted({n.op_type for n in __import__("onnx").load(deploy_path).graph.node})
    common.emit({
        "bench": "onnx_latency",
        "config": {"model": FLAGS.model or FLAGS.deploy_onnx or FLAGS.student,
                   "train_size": FLAGS.train_size, "calibration_size": FLAGS.calibration_size,
                   "runs": FLAGS.runs, "rounds": FLAGS.rounds, "threads": FLAGS.threads,
                   "onnxruntime": ort.__version__},
        "machine": common.machine(),
        "latency": latency,
        "sizes": {**sizes, "float_over_int8": sizes["float_bytes"] / sizes["int8_bytes"]},
        "deploy_op_types": ops,
        "quantizer": quant_info,
    })


if __name__ == "__main__":
    app.run(main)
