"""Benchmark 4: our block-distillation quantizer vs ONNX Runtime's quantize_static.

Same float model, same calibration images (`--calibration_size` training
images, seeded), same test images. ORT runs `quantize_static` on the
quantizer's float ONNX export with QDQ format, per-channel weights, int8
activations (S8S8: uint8 activations can saturate ORT's integer kernels on
CPUs without VNNI), MinMax and Entropy calibration, at INT8 and INT4
weights. Ours runs calibration only (`epochs=0`) and block distillation
(`epochs`, default 1 as in AMCT), same bit widths. Every model is scored in
ONNX Runtime (our fake-quant and deploy models, ORT's QDQ model); each row
has its wall time, from float model to written ONNX.

Full run (the trainer's distilled student):

    python bench/quant_vs_ort.py --model=output/distilled.keras
Reduced run:

    python bench/quant_vs_ort.py --train_size=8192 --test_size=2000 --calibration_size=512

Prints one JSON line.
"""

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
flags.DEFINE_integer("seed", 0, "Seed of the calibration sample.")


def main(argv):
    import numpy as np
    from onnxruntime import quantization as oq

    from knowledge_distillation import data as data_lib
    from knowledge_distillation import quant

    model, data = common.float_model_and_data(
        FLAGS.model, FLAGS.data_path, FLAGS.student, FLAGS.train_size, FLAGS.test_size,
        FLAGS.train_epochs, seed=FLAGS.seed)
    rng = np.random.default_rng(FLAGS.seed)
    index = np.sort(rng.choice(len(data.x_train), min(FLAGS.calibration_size, len(data.x_train)),
                               replace=False))
    calibration = data_lib.preprocess(data.x_train[index]).numpy()

    def top1(path):
        logits = quant.onnx_logits(path, data.x_test)
        return quant.topk_accuracy(logits, data.y_test)[0]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        float_path = os.path.join(tmp, "float.onnx")
        quant.save_onnx(quant.build_onnx(model, "float"), float_path)
        float_top1 = top1(float_path)
        import onnx

        input_name = onnx.load(float_path).graph.input[0].name
        for bits in FLAGS.bits:
            for epochs in sorted({0, FLAGS.epochs}):
                start = time.perf_counter()
                config = quant.create_distill_config(model, common.INT4_CONFIG if bits == "INT4" else None)
                qmodel = quant.create_quant_model(model, config)
                quant.distill(qmodel, calibration, epochs=epochs, seed=FLAGS.seed)
                saved = quant.save_quant_model(qmodel, os.path.join(tmp, f"ours_{bits}_{epochs}"),
                                               "model")
                seconds = time.perf_counter() - start
                rows.append({"method": "ours block distillation" if epochs else
                             "ours calibration only", "weights": bits, "epochs": epochs,
                             "seconds": seconds,
                             "top1_fake_quant": top1(saved["fake_quant_model"]),
                             "top1": top1(saved["deploy_model"]),
                             "bytes": saved["deploy_bytes"]})
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
                    row["top1"] = top1(out)
                    row["bytes"] = os.path.getsize(out)
                except Exception as e:  # report, keep benchmarking the rest
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
    common.emit({
        "bench": "quant_vs_ort",
        "config": {"model": FLAGS.model or FLAGS.student, "train_size": len(data.x_train),
                   "test_size": len(data.x_test), "calibration_size": len(calibration),
                   "epochs": FLAGS.epochs, "seed": FLAGS.seed},
        "machine": common.machine(),
        "float_top1": float_top1,
        "rows": rows,
    })


if __name__ == "__main__":
    app.run(main)
