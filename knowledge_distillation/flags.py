"""The flag definitions both command lines share, and their parsing.

absl flags are defined here on a `FlagValues` the caller owns and turned
into the frozen configs of `config.py`; nothing below the command lines
reads a flag. The trainer's flag names and defaults are ModelZoo's
(`python knowledge_distillation.py --epoch 5`, `bash test/train_full_1p.sh
--data_path=...`) plus the KD hyper-parameters; the quantizer adds AMCT's
(`knowledge_distillation/quant/quantize_cli.py`) and shares `--distributed`'s.
"""

import dataclasses
import sys

from absl import flags

from knowledge_distillation.config import (
    AUGMENT_MIXES,
    CACHE_IMAGES,
    DISTILLATION_LOSSES,
    DEFAULT_DATA_PATH,
    INTERPOLATIONS,
    PREPROCESSINGS,
    DEFAULT_STEPS_PER_EXECUTION,
    PRECISION_MODES,
    DeviceConfig,
    DistributeConfig,
    TrainConfig,
)


def define_device_flags(fv):
    """Defines the ModelZoo device flags on the FlagValues `fv`."""
    flags.DEFINE_enum(
        "precision_mode", "allow_mix_precision", PRECISION_MODES,
        "Ascend precision mode; on GPU/CPU the matching Keras dtype policy.",
        flag_values=fv)
    flags.DEFINE_boolean(
        "static", False,
        "Static shapes: every batch full (drop_remainder) in training and evaluation.",
        flag_values=fv)
    flags.DEFINE_alias("eval_static", "static", flag_values=fv)
    flags.DEFINE_boolean("over_dump", False, "Overflow (inf/nan) detection and dump.", flag_values=fv)
    flags.DEFINE_string("over_dump_path", None, "Where overflow dumps go (default: OUTPUT_DIR/over_dump).", flag_values=fv)
    flags.DEFINE_boolean("data_dump_flag", False, "Dump tensors at --data_dump_step.", flag_values=fv)
    flags.DEFINE_string("data_dump_step", "10", "Step(s) to dump: 10, 10|20, or ranges such as 0|5|10-20.", flag_values=fv)
    flags.DEFINE_string("data_dump_path", None, "Where data dumps go (default: OUTPUT_DIR/data_dump).", flag_values=fv)
    flags.DEFINE_boolean("profiling", False, "Profile a window of training steps.", flag_values=fv)
    flags.DEFINE_string("profiling_dump_path", None, "Where profiles go (default: OUTPUT_DIR/profiling).", flag_values=fv)
    flags.DEFINE_boolean("use_mixlist", False, "Apply --mixlist_file (only with allow_mix_precision).", flag_values=fv)
    flags.DEFINE_string("mixlist_file", "ops_info.json", "Ascend ops_info.json per-op precision lists.", flag_values=fv)
    flags.DEFINE_boolean("fusion_off_flag", False, "Switch graph fusions off per --fusion_off_file.", flag_values=fv)
    flags.DEFINE_string("fusion_off_file", "fusion_switch.cfg", "Ascend fusion_switch.cfg.", flag_values=fv)


def define_distribute_flags(fv):
    """Defines the `--distributed` flags on the FlagValues `fv` (see the distribute package)."""
    flags.DEFINE_boolean(
        "distributed", False,
        "Train on every local GPU (or --num_cpu_devices CPU devices), across "
        "hosts (TF_CONFIG or --worker_hosts), or across NPU ranks (RANK_SIZE).",
        flag_values=fv)
    flags.DEFINE_integer("num_cpu_devices", None, "CPU-only host: logical CPU devices to train on.", flag_values=fv)
    flags.DEFINE_list("worker_hosts", None, "host:port of every worker, chief first (multi-host).", flag_values=fv)
    flags.DEFINE_integer("task_index", None, "This host's index in --worker_hosts.", flag_values=fv)
    flags.DEFINE_string("dist_url", None, "AMCT's tcp://host:port: the chief's address.", flag_values=fv)


def define_image_flags(fv, trainer=True):
    """Defines the flags of how images are read and scaled (trainer and quantizer)."""
    flags.DEFINE_string(
        "labels_file", None,
        "Label list of a flat image folder: '<file name> <class index>' per line"
        + (" (training images)." if trainer else "."), flag_values=fv)
    flags.DEFINE_enum(
        "interpolation", "bilinear" if trainer else None, list(INTERPOLATIONS),
        "Resize method" + ("." if trainer else " (default: the model file's, else bilinear)."),
        flag_values=fv)
    flags.DEFINE_enum(
        "preprocessing", "unit" if trainer else None, list(PREPROCESSINGS),
        "Pixel scaling: unit [0,1], symmetric [-1,1], caffe (BGR minus ImageNet mean), torch "
        "(ImageNet mean/std), none (0-255)"
        + ("." if trainer else "; default: the model file's, else unit."), flag_values=fv)


def define_trainer_flags(fv):
    """Defines every trainer flag on the FlagValues `fv`."""
    flags.DEFINE_string(
        "data_path", DEFAULT_DATA_PATH,
        "Folder with mnist.npz or the four MNIST IDX files, train/ and test/ class folders, "
        "a flat image folder (with --labels_file), or the tfds data_dir.",
        flag_values=fv)
    define_image_flags(fv)
    flags.DEFINE_string("test_labels_file", None, "Label list of the test images (flat folder).",
                        flag_values=fv)
    flags.DEFINE_list("image_size", None, "H,W every image is resized to (e.g. 224,224).",
                      flag_values=fv)
    flags.DEFINE_list("teacher_image_size", None,
                      "H,W of the teacher's copy of each image (default: --image_size).",
                      flag_values=fv)
    flags.DEFINE_integer("channels", None, "1 or 3: convert colour modes (default: the data's).",
                         flag_values=fv)
    flags.DEFINE_enum("cache_images", "none", list(CACHE_IMAGES),
                      "Decoded images of image folders: stream from the files (none), keep "
                      "in memory, or in a file under --output_dir (disk).", flag_values=fv)
    flags.DEFINE_float("alpha_width", 1.0, "Width multiplier of mobilenet_v2 / "
                       "mobilenet_v3_small.", flag_values=fv)
    flags.DEFINE_string("dataset", None, "tfds:NAME to read a prepared tensorflow-datasets set.", flag_values=fv)
    flags.DEFINE_integer("epoch", 5, "Epochs of the scratch and distilled students.", flag_values=fv)
    flags.DEFINE_integer("teacher_epoch", None, "Epochs of the teacher (default: --epoch).", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "Examples per step.", flag_values=fv)
    flags.DEFINE_integer("log_steps", 100, "Steps between throughput log lines.", flag_values=fv)
    flags.DEFINE_float("alpha", 0.1, "Weight of the label loss (1 - alpha weighs distillation).", flag_values=fv)
    flags.DEFINE_float("temperature", None, "Distillation softmax temperature (default: 10 "
                       "for kd, 1 for dist; kl is T=1).", flag_values=fv)
    flags.DEFINE_enum("distillation_loss", "kd", list(DISTILLATION_LOSSES),
                      "kd: Hinton's T^2 KL; kl: KL at T=1 (function matching); dist: DIST "
                      "(Pearson correlations between and within classes).", flag_values=fv)
    flags.DEFINE_float("learning_rate", 1e-3, "Adam peak learning rate (cosine decay to 0).", flag_values=fv)
    flags.DEFINE_integer("seed", 42, "Seed of initial weights and shuffling.", flag_values=fv)
    flags.DEFINE_string("output_dir", "output", "Models, checkpoints, logs and summary.json.", flag_values=fv)
    flags.DEFINE_string(
        "teacher", "cnn", "Zoo teacher: cnn, seed_teacher, mlp_teacher, or a keras.applications "
        "network: mobilenet_v2, mobilenet_v3_small, resnet50, efficientnet_b0, convnext_tiny.",
        flag_values=fv)
    flags.DEFINE_string(
        "student", "mlp_student", "Zoo student: mlp_student (Hinton 2x800), seed_student, or a "
        "keras.applications network (as --teacher).", flag_values=fv)
    flags.DEFINE_string("teacher_model", None, "A trained .keras teacher (evaluated, not retrained).", flag_values=fv)
    flags.DEFINE_string("student_model", None, "A .keras student architecture (re-initialised).", flag_values=fv)
    flags.DEFINE_integer("max_steps", None, "Bound on the steps of every epoch.", flag_values=fv)
    flags.DEFINE_integer("train_size", None, "Use only the first N training examples.", flag_values=fv)
    flags.DEFINE_integer("test_size", None, "Use only the first N test examples.", flag_values=fv)
    flags.DEFINE_boolean(
        "cache_teacher", True,
        "Compute teacher logits once instead of on every step.", flag_values=fv)
    flags.DEFINE_boolean(
        "augment", False,
        "Augment the training batches: teacher and student see the same view (function "
        "matching); the scratch student gets the same batches.", flag_values=fv)
    flags.DEFINE_integer("augment_shift", 2, "With --augment: random shift, in pixels "
                         "(pad and crop; 0 for none).", flag_values=fv)
    flags.DEFINE_boolean("augment_flip", True, "With --augment: random horizontal flips "
                         "(--noaugment_flip for digits or text).", flag_values=fv)
    flags.DEFINE_enum("augment_mix", "none", list(AUGMENT_MIXES),
                      "With --augment: mix pairs of images (and labels).", flag_values=fv)
    flags.DEFINE_float("augment_mix_alpha", 1.0, "Beta(alpha, alpha) of the mixing weight.",
                       flag_values=fv)
    flags.DEFINE_integer(
        "teacher_views", 0,
        "With --augment: 0 runs the teacher on every step; K caches its logits on K fixed "
        "views per image, one used per epoch.", flag_values=fv)
    flags.DEFINE_integer(
        "steps_per_execution", None,
        "Training steps per compiled call (default: %d on GPU/CPU, 1 on Ascend and with "
        "--data_dump_flag, --over_dump or --profiling, which look at every step)."
        % DEFAULT_STEPS_PER_EXECUTION, flag_values=fv)
    flags.DEFINE_boolean("quantize", False, "Quantize the distilled student at the end.", flag_values=fv)
    flags.DEFINE_boolean(
        "overwrite", False,
        "Start over in an --output_dir that holds a run with other settings (its models, "
        "checkpoints, logs and summary are removed) instead of ending with an error.",
        flag_values=fv)
    define_device_flags(fv)
    define_distribute_flags(fv)


def device_config(fv):
    """The DeviceConfig of parsed flags."""
    names = [f.name for f in dataclasses.fields(DeviceConfig)]
    return DeviceConfig(**{name: fv[name].value for name in names})


def distribute_config(fv):
    """The DistributeConfig of parsed flags."""
    names = [f.name for f in dataclasses.fields(DistributeConfig)]
    return DistributeConfig(**{name: fv[name].value for name in names})


def train_config(fv):
    """The TrainConfig of parsed flags."""
    nested = ("device", "distribute")
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in nested]
    return TrainConfig(**{name: fv[name].value for name in names}, device=device_config(fv),
                       distribute=distribute_config(fv))


def parse(fv, argv, prog, usage="[--flag=value ...]", to_config=None):
    """Parses `argv` into `fv` and returns `to_config(fv)`, or an exit code.

    `-h`/`--help`/`--helpfull` print the usage and the flags: exit code 0.
    A bad flag, or a `ValueError` from `to_config`, prints one error line:
    exit code 2. A stray positional argument is a bad flag.
    """
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(f"usage: {prog} {usage}\n")
        print(fv.get_help())
        return 0
    try:
        rest = fv(argv)
        if len(rest) > 1:
            raise flags.Error(f"unexpected argument {rest[1]!r}: flags are --name=value")
        return to_config(fv) if to_config else None
    except (flags.Error, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
