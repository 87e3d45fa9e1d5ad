"""Command line of the quantizer: absl flags -> one frozen config -> run.

```
python -m knowledge_distillation.quant --model PATH.keras \\
    [--data_path DIR] [--config_defination FILE] [--batch_size 32] \\
    [--num_parallel_reads 4] [--calibration_size 1024] [--output_dir D] \\
    [--deploy_format auto|qdq|integer] [--deploy_activation_dtype auto|int8|uint8]
```

It prints AMCT's two lines,

```
[INFO] <model> before quantize top1:   0.8759 top5:   0.9962
[INFO] <model> after quantize  top1:   0.8752 top5:   0.9963
```

(the float Keras model, then the fake-quant ONNX model in ONNX Runtime, on
the test split) and writes `tmp/distill_config.json`,
`tmp/scale_offset_record.txt`, `result/<name>_fake_quant_model.onnx`,
`result/<name>_deploy_model.onnx`, `amct_log/quantize.log` and
`quantize_summary.json` under `--output_dir`.
"""

import dataclasses
import json
import logging
import os
import re
import sys
from typing import Optional

from absl import flags

from knowledge_distillation import flags as kd_flags
from knowledge_distillation.util.logs import quiet_tensorflow_start, setup_logging
from knowledge_distillation.config import DEFAULT_DATA_PATH, DistributeConfig, check_image_options

logger = logging.getLogger("knowledge_distillation.quant")

PROG = "python -m knowledge_distillation.quant"
_NAME = re.compile(r"[A-Za-z0-9._-]+")
DEPLOY_ACTIVATION_DTYPES = ("auto", "int8", "uint8")
DEPLOY_FORMATS = ("auto", "qdq", "integer")


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """One quantization run.

    Args:
        model: the float `.keras` model file.
        data_path: the data folder (or tfds data_dir).
        dataset: `None` for MNIST-format files, or `tfds:NAME`.
        config_defination: optional AMCT simple config file (protobuf text).
        batch_size: examples per distillation step.
        num_parallel_reads: threads of the data input pipelines.
        calibration_size: training images that calibrate and distil.
        epochs: passes over them per block (0: calibration only).
        output_dir: where tmp/, result/ and amct_log/ go.
        name: stem of the ONNX file names (default: the model's name).
        test_size: if set, evaluate on the first N test images only.
        max_input_drift: see `quant.distill`.
        seed: seed of the calibration sample and of training.
        distribute: the `--distributed` flags, the trainer's (distil on every
            local device, across hosts or across NPU ranks; see
            `knowledge_distillation/distribute/`).
        deploy_format: the deploy model's form, "auto" (qdq on a VNNI or
            non-x86 CPU, integer on x86 without VNNI), "qdq" or "integer".
        deploy_activation_dtype: the deploy model's activations, "auto"
            (uint8 on an x86-64 CPU with VNNI, else int8), "int8" or "uint8".
        labels_file: label list of a flat image folder (`<file name> <class
            index>` lines); its images both calibrate and test. Without it,
            a folder of images without labels calibrates only.
        interpolation: resize method; None: the model file's, else bilinear.
        preprocessing: pixel scaling; None: the model file's, else unit.
    """

    model: str
    data_path: str = DEFAULT_DATA_PATH
    dataset: Optional[str] = None
    config_defination: Optional[str] = None
    batch_size: int = 32
    num_parallel_reads: int = 4
    calibration_size: int = 1024
    epochs: int = 1
    output_dir: str = os.path.join("output", "quant")
    name: Optional[str] = None
    test_size: Optional[int] = None
    max_input_drift: float = 0.1
    seed: int = 0
    deploy_activation_dtype: str = "auto"
    deploy_format: str = "auto"
    labels_file: Optional[str] = None
    interpolation: Optional[str] = None
    preprocessing: Optional[str] = None
    distribute: DistributeConfig = dataclasses.field(default_factory=DistributeConfig)

    def __post_init__(self):
        for key in ("batch_size", "num_parallel_reads", "calibration_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key} must be positive, got {getattr(self, key)}")
        if self.name is not None and (not _NAME.fullmatch(self.name) or self.name.startswith(".")):
            raise ValueError(f"--name={self.name!r}: expected a file-name stem (letters, digits, "
                             "'.', '_', '-'; no folders), e.g. --name=mobilenet_v2")
        if self.epochs < 0:
            raise ValueError(f"--epochs must be >= 0, got {self.epochs}")
        if self.test_size is not None and self.test_size <= 0:
            raise ValueError(f"--test_size must be positive, got {self.test_size}")
        if self.max_input_drift < 0:
            raise ValueError(f"--max_input_drift must be >= 0, got {self.max_input_drift}")
        check_image_options(None, self.interpolation, self.preprocessing)
        if self.deploy_format not in DEPLOY_FORMATS:
            raise ValueError(f"--deploy_format must be one of {', '.join(DEPLOY_FORMATS)}, "
                             f"got {self.deploy_format!r}")
        if self.deploy_activation_dtype not in DEPLOY_ACTIVATION_DTYPES:
            raise ValueError("--deploy_activation_dtype must be one of "
                             f"{', '.join(DEPLOY_ACTIVATION_DTYPES)}, "
                             f"got {self.deploy_activation_dtype!r}")


def define_flags(fv):
    """Defines the quantizer's flags (AMCT sample names) on FlagValues `fv`."""
    flags.DEFINE_string("model", None, "The float .keras model to quantize.", flag_values=fv)
    flags.DEFINE_string(
        "data_path", DEFAULT_DATA_PATH,
        "Folder with mnist.npz or the four MNIST IDX files, train/ and test/ class folders, a "
        "folder of images (with --labels_file, or unlabelled for calibration only), or the "
        "tfds data_dir.", flag_values=fv)
    kd_flags.define_image_flags(fv, trainer=False)
    flags.DEFINE_string("dataset", None, "tfds:NAME to read a prepared tensorflow-datasets set.",
                        flag_values=fv)
    flags.DEFINE_string("config_defination", None,
                        "AMCT simple config file (protobuf text format).", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "Examples per distillation step.", flag_values=fv)
    flags.DEFINE_integer("num_parallel_reads", 4, "Threads reading the data set.", flag_values=fv)
    flags.DEFINE_integer("calibration_size", 1024,
                         "Training images used to calibrate and distil.", flag_values=fv)
    flags.DEFINE_integer("epochs", 1, "Passes over the calibration images per block "
                         "(0: calibration only).", flag_values=fv)
    flags.DEFINE_string("output_dir", os.path.join("output", "quant"),
                        "Where tmp/, result/ and amct_log/ are written.", flag_values=fv)
    flags.DEFINE_string("name", None, "Stem of the ONNX file names (default: the model name).",
                        flag_values=fv)
    flags.DEFINE_integer("test_size", None, "Evaluate on the first N test images only.",
                         flag_values=fv)
    flags.DEFINE_float("max_input_drift", 0.1,
                       "Largest relative error of a block's quantized input before it "
                       "learns from the float input instead.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the calibration sample and training.", flag_values=fv)
    kd_flags.define_distribute_flags(fv)
    flags.DEFINE_enum(
        "deploy_format", "auto", list(DEPLOY_FORMATS),
        "Form of the deploy ONNX model. qdq: int8/int4 weights, int32 bias and quantized "
        "inputs through DequantizeLinear into Conv/Gemm, which ONNX Runtime fuses into "
        "QLinearConv/QGemm and TensorRT, OpenVINO and QNN read. integer: ConvInteger/"
        "MatMulInteger with a float epilogue (AMCT's form; ONNX Runtime's CPU provider only). "
        "auto: qdq on an x86-64 CPU with VNNI or another architecture, integer on x86 without "
        "VNNI, where ONNX Runtime's fused kernels can saturate.", flag_values=fv)
    flags.DEFINE_enum(
        "deploy_activation_dtype", "auto", list(DEPLOY_ACTIVATION_DTYPES),
        "Activations of the deploy ONNX model (same logits either way). int8: int8 x int8 "
        "integer ops, exact on any CPU but slow in ONNX Runtime on x86 (slower than float). "
        "uint8: uint8 x int8, ONNX Runtime's fast VNNI kernel, but on x86 CPUs without VNNI "
        "(plain AVX2) its 16-bit sums saturate and lose accuracy. auto: uint8 if this CPU is "
        "x86-64 with VNNI (avx512_vnni/avx_vnni), else int8; name one explicitly when the "
        "model will run on another CPU.", flag_values=fv)


def quantize_config(fv):
    """The `QuantizeConfig` of parsed flags."""
    if not fv["model"].value:
        raise ValueError("--model is required: the float .keras model to quantize")
    names = [f.name for f in dataclasses.fields(QuantizeConfig) if f.name != "distribute"]
    return QuantizeConfig(**{name: fv[name].value for name in names},
                          distribute=kd_flags.distribute_config(fv))


def info_line(name, when, accuracy):
    """AMCT's result line, e.g. `[INFO] Net before quantize top1:   0.875 top5:   0.996`."""
    label = "before quantize" if when == "before" else "after quantize "
    if accuracy["top1"] is None:
        return f"[INFO] {name} {label} top1: n/a top5: n/a (the images have no labels)"
    return f"[INFO] {name} {label} top1:{accuracy['top1']:>10} top5:{accuracy['top5']:>10}"


def run(config):
    """Loads the model and data, quantizes, writes the summary; returns it.

    Under `--distributed` every worker distils; only the chief writes
    `--output_dir` (see `knowledge_distillation/distribute/`).
    """
    from knowledge_distillation import distribute

    # First: logical devices and multi-worker collectives need TensorFlow unstarted.
    dist = distribute.setup(config.distribute, batch_size=config.batch_size)
    with dist.scope():
        summary = _run(config, dist.write_dir(config.output_dir))
    dist.finish()
    return summary


def _run(config, output_dir):
    from knowledge_distillation import data as data_lib
    from knowledge_distillation import models
    from knowledge_distillation.config import DeviceConfig
    from knowledge_distillation.ascend.device import setup_device
    from knowledge_distillation.quant.quantize import quantize_into
    from knowledge_distillation.quant.quantize_config import load_simple_config
    from knowledge_distillation.rundir import check_writable_dir

    check_writable_dir(output_dir, "--output_dir")
    # Quantization factors are learned and checked in float32.
    setup_device(DeviceConfig(precision_mode="must_keep_origin_dtype"), output_dir)
    config_text = None
    if config.config_defination:
        _, config_text = load_simple_config(config.config_defination)
    model = models.load_model(config.model, flag="--model")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"--model: {config.model} has {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs; the quantizer takes a model with one image input and one logits output")
    data = _load_data(config, data_lib)
    view = _model_view(config, model, data, data_lib)
    if data.labelled:
        models.check_compatible(model, view.output_shape(data.x_train.shape[1:]),
                                model.output_shape[-1], "--model")
        source = config.labels_file or config.data_path
        data_lib.check_labels_below(data.y_test, model.output_shape[-1], source,
                                    f"the {model.output_shape[-1]} outputs of {config.model}")
    with data_lib.naming_undecodable(data):
        return quantize_into(
            output_dir, model, data,
            summary_extra={"config": dataclasses.asdict(config)},
            name=config.name or model.name,
            batch_size=config.batch_size,
            calibration_size=config.calibration_size,
            config_text=config_text,
            config_source=config.config_defination or "<config>",
            epochs=config.epochs,
            max_input_drift=config.max_input_drift,
            seed=config.seed,
            num_parallel_reads=config.num_parallel_reads,
            activation_dtype=config.deploy_activation_dtype,
            deploy_format=config.deploy_format,
            view=view,
        )


def _load_data(config, data_lib):
    """The labelled split pair, or one folder of images (labelled by --labels_file, or not)."""
    path = config.data_path
    flat = config.labels_file or (
        config.dataset is None and os.path.isdir(path) and not data_lib.has_mnist_files(path)
        and data_lib.is_flat_image_folder(path))
    if flat:
        if config.dataset:
            raise ValueError(f"--labels_file names an image list; --dataset {config.dataset} "
                             "reads a tfds data set: give one or the other")
        return data_lib.load_flat_folder(path, config.labels_file, test_size=config.test_size)
    return data_lib.load_data(path, config.dataset, test_size=config.test_size)


def _model_view(config, model, data, data_lib):
    """The images through the model's eyes: its input size and channels, the model file's
    preprocessing and interpolation unless the flags name others."""
    from knowledge_distillation.util.files import read_model_metadata

    stored = read_model_metadata(config.model)
    choices = {}
    for key, default in (("preprocessing", "unit"), ("interpolation", "bilinear")):
        flag, carried = getattr(config, key), stored.get(key)
        if flag and carried and flag != carried:
            logger.warning("--%s %s overrides the %s the model file carries (%s)", key, flag,
                           key, carried)
        choices[key] = flag or carried or default
        logger.info("%s: %s (%s)", key, choices[key], "--" + key if flag else
                    ("from the model file" if carried else "default"))
    height, width, channels = (tuple(model.input_shape[1:]) + (None,) * 3)[:3]
    stored_shape = tuple(data.x_train.shape[1:])
    size = (height, width) if None not in (height, width) else None
    if size is not None and stored_shape[:2] != size:
        logger.info("images of %s resized to the model's %dx%d", "mixed sizes"
                    if None in stored_shape[:2] else f"{stored_shape[0]}x{stored_shape[1]}",
                    height, width)
    view = data_lib.ImageView(size, channels if channels in (1, 3) else None,
                              choices["interpolation"], choices["preprocessing"])
    data_lib.model_input_shape(data, view, "a model with a fixed input size")
    return view


def main(argv=None):
    """Entry point of `python -m knowledge_distillation.quant`. Returns an exit code."""
    argv = list(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    define_flags(fv)
    config = kd_flags.parse(fv, argv, PROG, "--model PATH.keras [--flag=value ...]",
                            to_config=quantize_config)
    if isinstance(config, int):
        return config
    quiet_tensorflow_start()
    setup_logging()
    logger.info("config: %s", json.dumps(dataclasses.asdict(config), sort_keys=True))
    try:
        summary = run(config)
    except (ValueError, OSError) as e:
        logger.error("%s", e)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(info_line(summary["name"], "before", summary["before"]))
    print(info_line(summary["name"], "after", summary["after"]))
    for key in ("config", "record", "fake_quant_model", "deploy_model", "log", "summary"):
        print(f"{key}: {summary['paths'][key]}")
    return 0
