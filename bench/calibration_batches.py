"""Benchmark 5: how many calibration images should set the activation ranges.

AMCT's `batch_num` (default 1) is the number of batches of `--batch_size`
calibration images whose min/max set each quantized layer's activation
range. This runs the quantizer on one float model with the same calibration
images, seed and everything else, varying only `batch_num`: 1 (AMCT's
default, 32 images at batch 32) against every calibration batch
(`--calibration_size / --batch_size`), at INT8 and INT4 weights, with
calibration only (`epochs=0`: the ranges are all there is) and with block
distillation (`--epochs`: the ranges are where the learned clips start).
Each row reports the TF simulation's top-1 on the test split (equal to the
fake-quant ONNX model's, see tests/test_quant.py) and the relative logit
error against the float model.

    python bench/calibration_batches.py --model=output/distilled.keras

Prints one JSON line.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

common.quiet_tf()

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
common.define_float_model_flags(flags)
common.define_quantizer_flags(flags, "Block-distillation passes of the distilled rows.")
flags.DEFINE_integer("batch_size", 32, "Calibration batch size.")
flags.DEFINE_list("seeds", ["0"], "Calibration-sample and training seeds.")


def main(argv):
    import numpy as np

    from knowledge_distillation import quant

    model, data, view = common.float_model_and_data(
        FLAGS.model, FLAGS.data_path, FLAGS.model_name, FLAGS.train_size, FLAGS.test_size,
        FLAGS.train_epochs, image_size=FLAGS.image_size, preprocessing=FLAGS.preprocessing,
        model_cache=FLAGS.model_cache)
    all_batches = -(-FLAGS.calibration_size // FLAGS.batch_size)
    rows = []
    float_top1 = None
    for seed in (int(s) for s in FLAGS.seeds):
        rng = np.random.default_rng(seed)
        index = np.sort(rng.choice(len(data.x_train), min(FLAGS.calibration_size,
                                                          len(data.x_train)), replace=False))
        calibration = common.processed(data.x_train[index], view)
        for bits in FLAGS.bits:
            for epochs in sorted({0, FLAGS.epochs}):
                for batch_num in (1, all_batches):
                    start = time.perf_counter()
                    config = quant.create_distill_config(
                        model, common.INT4_CONFIG if bits == "INT4" else None)
                    qmodel = quant.create_quant_model(model, config)
                    quant.distill(qmodel, calibration, epochs=epochs, batch_size=FLAGS.batch_size,
                                  batch_num=batch_num, seed=seed)
                    seconds = time.perf_counter() - start
                    reference = quant.keras_logits(qmodel.teacher_model, data.x_test)
                    logits = quant.keras_logits(qmodel.keras_model, data.x_test)
                    float_top1 = quant.topk_accuracy(reference, data.y_test)[0]
                    compared = quant.compare_logits(logits, reference)
                    rows.append({
                        "seed": seed, "weights": bits, "epochs": epochs, "batch_num": batch_num,
                        "range_images": min(len(calibration), batch_num * FLAGS.batch_size),
                        "top1": quant.topk_accuracy(logits, data.y_test)[0],
                        "relative_logit_error": compared["relative_error"],
                        "argmax_agreement": compared["argmax_agreement"],
                        "seconds": seconds,
                    })
    common.emit({
        "bench": "calibration_batches",
        "config": {"model": FLAGS.model or FLAGS.model_name, "train_size": len(data.x_train),
                   "test_size": len(data.x_test), "calibration_size": FLAGS.calibration_size,
                   "batch_size": FLAGS.batch_size, "epochs": FLAGS.epochs},
        "machine": common.machine(),
        "float_top1": float_top1,
        "rows": rows,
    })


if __name__ == "__main__":
    app.run(main)
