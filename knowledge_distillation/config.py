"""Frozen run configurations.

`cli.py` is the only place that reads flags; it turns them into these
dataclasses, and everything below takes them (or plain arguments) explicitly.
"""

import dataclasses
import math
from typing import Optional

PRECISION_MODES = (
    "allow_fp32_to_fp16",
    "force_fp16",
    "must_keep_origin_dtype",
    "allow_mix_precision",
    # Newer CANN modes (npu_device accepts them too).
    "force_fp32",
    "allow_mix_precision_bf16",
    "allow_fp32_to_bf16",
)

DEFAULT_DATA_PATH = "/usr/share/datasets/fashion-mnist"
# Resize methods (tf.image.resize) and pixel scalings (data.preprocess).
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area")
PREPROCESSINGS = ("unit", "symmetric", "caffe", "torch", "none")
CACHE_IMAGES = ("none", "memory", "disk")
# Distillation losses (kd.losses.distillation_loss) and their default temperatures.
DISTILLATION_LOSSES = ("kd", "kl", "dist")
DEFAULT_TEMPERATURES = {"kd": 10.0, "kl": 1.0, "dist": 1.0}
AUGMENT_MIXES = ("none", "mixup", "cutmix")
# Training steps per compiled call on GPU/CPU when nothing inspects every
# step: at batch 32 a small student's step is mostly per-call overhead
# (measured: the seed student's epoch 0.44x, the 2x800 MLP's 0.80-0.91x).
DEFAULT_STEPS_PER_EXECUTION = 32


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """The ModelZoo device flags, with their ModelZoo names and defaults.

    On Ascend they configure `npu_device.global_options()`; on GPU/CPU each
    does its nearest real equivalent (see `device.py`).
    """

    precision_mode: str = "allow_mix_precision"
    static: bool = False
    over_dump: bool = False
    over_dump_path: Optional[str] = None
    data_dump_flag: bool = False
    data_dump_step: str = "10"
    data_dump_path: Optional[str] = None
    profiling: bool = False
    profiling_dump_path: Optional[str] = None
    use_mixlist: bool = False
    mixlist_file: str = "ops_info.json"
    fusion_off_flag: bool = False
    fusion_off_file: str = "fusion_switch.cfg"

    def __post_init__(self):
        if self.precision_mode not in PRECISION_MODES:
            raise ValueError(
                f"--precision_mode must be one of {', '.join(PRECISION_MODES)}, "
                f"got {self.precision_mode!r}"
            )


@dataclasses.dataclass(frozen=True)
class DistributeConfig:
    """The `--distributed` flags (see the `distribute` package for what runs).

    Args:
        distributed: train on every local device, or across hosts / NPU ranks.
        num_cpu_devices: on a CPU-only host, the number of logical CPU devices
            (MirroredStrategy replicas). Defaults to one.
        worker_hosts: `host:port` of every worker, the chief first, the same
            list on every host. TF_CONFIG may describe the cluster instead.
        task_index: this host's index in `worker_hosts`.
        dist_url: AMCT's `tcp://host:port`: the chief's address, checked
            against the cluster.
    """

    distributed: bool = False
    num_cpu_devices: Optional[int] = None
    worker_hosts: Optional[tuple] = None
    task_index: Optional[int] = None
    dist_url: Optional[str] = None

    def __post_init__(self):
        if self.worker_hosts is not None:
            object.__setattr__(self, "worker_hosts", tuple(self.worker_hosts) or None)
        if not self.distributed:
            for name in ("num_cpu_devices", "worker_hosts", "task_index", "dist_url"):
                if getattr(self, name) is not None:
                    raise ValueError(f"--{name} needs --distributed")
            return
        if self.num_cpu_devices is not None:
            _check_positive("num_cpu_devices", self.num_cpu_devices)
        if (self.worker_hosts is None) != (self.task_index is None):
            raise ValueError(
                "--worker_hosts and --task_index go together: the list of every "
                "worker (chief first) and this host's index in it"
            )
        if self.worker_hosts is not None:
            for host in self.worker_hosts:
                _check_host_port("--worker_hosts", host)
            if not 0 <= self.task_index < len(self.worker_hosts):
                raise ValueError(
                    f"--task_index must be in 0..{len(self.worker_hosts) - 1} for "
                    f"{len(self.worker_hosts)} --worker_hosts, got {self.task_index}"
                )
        if self.dist_url is not None:
            scheme, _, address = self.dist_url.partition("://")
            if scheme != "tcp":
                raise ValueError(
                    f"--dist_url must be tcp://HOST:PORT, got {self.dist_url!r}"
                )
            _check_host_port("--dist_url", address)


def _check_host_port(flag, text):
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag}: expected HOST:PORT, got {text!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one knowledge-distillation run needs.

    Args:
        data_path: folder with `mnist.npz` or the four MNIST IDX files, or the
            tensorflow-datasets `data_dir` when `dataset` is `tfds:NAME`.
        dataset: `None` for MNIST-format files, or `tfds:NAME`.
        epoch: epochs for the scratch and distilled students.
        teacher_epoch: epochs for the teacher. Defaults to `epoch`.
        batch_size: examples per training step.
        log_steps: interval, in steps, of the throughput log.
        alpha: weight of the student (label) loss; `1 - alpha` weighs the
            distillation loss.
        temperature: softmax temperature of the distillation loss; None for
            the loss's default (`DEFAULT_TEMPERATURES`: 10 for kd, 1 for kl
            and dist).
        distillation_loss: "kd" (Hinton), "kl" (KL at T=1, function
            matching) or "dist" (DIST, Huang et al. 2022).
        learning_rate: Adam learning rate of all three models.
        seed: seed of weights initialisation and data shuffling.
        output_dir: where models, checkpoints, logs and `summary.json` go.
        teacher: name of the zoo teacher to build (see `models.TEACHERS`).
        student: name of the zoo student to build (see `models.STUDENTS`).
        teacher_model: path of a user `.keras` teacher; evaluated, not trained.
        student_model: path of a user `.keras` student architecture; it is
            re-initialised for the scratch and distilled runs.
        max_steps: if set, bounds the steps of every epoch (perf runs).
        train_size: if set, uses only the first `train_size` training examples.
        test_size: if set, uses only the first `test_size` test examples.
        cache_teacher: compute teacher logits once instead of every step
            (without augmentation).
        augment: augment the training batches (teacher, scratch and
            distilled students alike; see `kd.augment`).
        augment_shift: pixels of the random shift with `augment`.
        augment_flip: random horizontal flips with `augment` (off for digits).
        augment_mix: "none", "mixup" or "cutmix" with `augment`.
        augment_mix_alpha: the Beta(alpha, alpha) of the mixing weight.
        teacher_views: with `augment`, 0 runs the teacher on every step;
            K > 0 caches its logits on K fixed views per image.
        steps_per_execution: training steps per compiled call (Keras
            `steps_per_execution`); None picks it per device (see
            `DeviceSession.steps_per_execution`).
        quantize: quantize the distilled student at the end of the run.
        labels_file: training label list of a flat image folder
            (`<file name> <class index>` lines).
        test_labels_file: its test label list.
        image_size: `(H, W)` every image is resized to; None keeps the
            stored size (one size for all, or taken from a user model).
        teacher_image_size: `(H, W)` of the teacher's copy of each image;
            None: the student's.
        channels: 1 or 3 to convert colour modes; None keeps the data's.
        interpolation: the resize method (`INTERPOLATIONS`).
        preprocessing: the pixel scaling (`PREPROCESSINGS`, see
            `data.preprocess`).
        cache_images: keep decoded images of image folders: "none" (stream
            from the files), "memory" or "disk" (a file under output_dir).
        alpha_width: width multiplier of the keras.applications MobileNets.
        overwrite: start over in an `output_dir` that holds a run with other
            settings (see `rundir.py`), instead of ending with an error.
        device: the ModelZoo device flags.
        distribute: the `--distributed` flags.
    """

    data_path: str = DEFAULT_DATA_PATH
    dataset: Optional[str] = None
    epoch: int = 5
    teacher_epoch: Optional[int] = None
    batch_size: int = 32
    log_steps: int = 100
    alpha: float = 0.1
    temperature: Optional[float] = None
    distillation_loss: str = "kd"
    learning_rate: float = 1e-3
    seed: int = 42
    output_dir: str = "output"
    teacher: str = "cnn"
    student: str = "mlp_student"
    teacher_model: Optional[str] = None
    student_model: Optional[str] = None
    max_steps: Optional[int] = None
    train_size: Optional[int] = None
    test_size: Optional[int] = None
    cache_teacher: bool = True
    augment: bool = False
    augment_shift: int = 2
    augment_flip: bool = True
    augment_mix: str = "none"
    augment_mix_alpha: float = 1.0
    teacher_views: int = 0
    steps_per_execution: Optional[int] = None
    quantize: bool = False
    labels_file: Optional[str] = None
    test_labels_file: Optional[str] = None
    image_size: Optional[tuple] = None
    teacher_image_size: Optional[tuple] = None
    channels: Optional[int] = None
    interpolation: str = "bilinear"
    preprocessing: str = "unit"
    cache_images: str = "none"
    alpha_width: float = 1.0
    overwrite: bool = False
    device: DeviceConfig = dataclasses.field(default_factory=DeviceConfig)
    distribute: DistributeConfig = dataclasses.field(default_factory=DistributeConfig)

    def __post_init__(self):
        _check_positive("epoch", self.epoch)
        _check_positive("batch_size", self.batch_size)
        _check_positive("log_steps", self.log_steps)
        if self.teacher_epoch is not None and self.teacher_epoch < 0:
            raise ValueError(
                f"--teacher_epoch must be >= 0, got {self.teacher_epoch}"
            )
        for name in ("max_steps", "train_size", "test_size", "steps_per_execution"):
            value = getattr(self, name)
            if value is not None:
                _check_positive(name, value)
        for name in ("alpha", "temperature", "learning_rate", "augment_mix_alpha"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name} must be a finite number, got {value}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be between 0.0 and 1.0, got {self.alpha}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(
                f"--temperature must be positive, got {self.temperature}"
            )
        if self.distillation_loss not in DISTILLATION_LOSSES:
            raise ValueError(f"--distillation_loss must be one of "
                             f"{', '.join(DISTILLATION_LOSSES)}, got {self.distillation_loss!r}")
        if self.distillation_loss == "kl" and self.temperature not in (None, 1.0):
            raise ValueError(f"--distillation_loss kl is KL at T=1 (function matching), got "
                             f"--temperature {self.temperature}: use --distillation_loss kd "
                             "for a softened KL")
        self._check_augment()
        if self.learning_rate <= 0:
            raise ValueError(
                f"--learning_rate must be positive, got {self.learning_rate}"
            )
        for name in ("image_size", "teacher_image_size"):
            object.__setattr__(self, name, parse_size(getattr(self, name), name))
        check_image_options(self.channels, self.interpolation, self.preprocessing)
        if self.cache_images not in CACHE_IMAGES:
            raise ValueError(f"--cache_images must be one of {', '.join(CACHE_IMAGES)}, "
                             f"got {self.cache_images!r}")
        if not (math.isfinite(self.alpha_width) and self.alpha_width > 0):
            raise ValueError(f"--alpha_width must be a positive number, got {self.alpha_width}")

    def _check_augment(self):
        if self.augment_shift < 0:
            raise ValueError(f"--augment_shift must be >= 0 pixels, got {self.augment_shift}")
        if self.augment_mix not in AUGMENT_MIXES:
            raise ValueError(f"--augment_mix must be one of {', '.join(AUGMENT_MIXES)}, "
                             f"got {self.augment_mix!r}")
        if self.augment_mix_alpha <= 0:
            raise ValueError(f"--augment_mix_alpha must be positive, got {self.augment_mix_alpha}")
        if self.teacher_views < 0:
            raise ValueError(f"--teacher_views must be >= 0, got {self.teacher_views}")
        if not self.augment:
            changed = [f"--{name}" for name, default in (
                ("augment_shift", 2), ("augment_flip", True), ("augment_mix", "none"),
                ("augment_mix_alpha", 1.0), ("teacher_views", 0))
                if getattr(self, name) != default]
            if changed:
                raise ValueError(f"{', '.join(changed)} set without --augment: nothing is "
                                 "augmented unless --augment is given")
            return
        if not (self.augment_shift or self.augment_flip or self.augment_mix != "none"):
            raise ValueError("--augment with --augment_shift 0, --noaugment_flip and "
                             "--augment_mix none augments nothing: drop --augment")
        if self.teacher_views and self.augment_mix != "none":
            raise ValueError(
                f"--teacher_views {self.teacher_views} with --augment_mix {self.augment_mix}: "
                "mixing pairs images within a batch, so its views cannot be cached per image; "
                "use --teacher_views 0 (the teacher runs on every step) or --augment_mix none")
        if self.teacher_views and not (self.augment_shift or self.augment_flip):
            raise ValueError("--teacher_views needs --augment_shift > 0 or --augment_flip: "
                             "there is nothing to draw views from")
        if self.teacher_views and not self.cache_teacher:
            raise ValueError(f"--teacher_views {self.teacher_views} caches teacher logits; "
                             "--nocache_teacher asks for none: drop one of them")
        if self.teacher_image_size is not None and self.teacher_image_size != self.image_size:
            raise ValueError("--augment with --teacher_image_size: the teacher must see the "
                             "student's very view; drop --teacher_image_size")
        if self.distribute.distributed:
            raise ValueError("--augment does not run under --distributed yet (its epoch "
                             "counter is per process); train on one device")

    @property
    def distill_temperature(self):
        """The temperature of the distillation loss: `--temperature`, else the loss's default."""
        if self.temperature is not None:
            return self.temperature
        return DEFAULT_TEMPERATURES[self.distillation_loss]

    @property
    def teacher_epochs(self):
        return self.epoch if self.teacher_epoch is None else self.teacher_epoch


def parse_size(value, name):
    """`(H, W)` from None, "H,W", "S" (square), or a sequence of one or two sizes."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        sizes = tuple(int(str(part).strip()) for part in parts)
    except ValueError:
        sizes = ()
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        shown = ",".join(str(part) for part in parts)
        raise ValueError(f"--{name} must be H,W (two positive sizes, e.g. 224,224) or one size "
                         f"for a square, got {shown!r}")
    return sizes


def check_image_options(channels, interpolation, preprocessing):
    if channels not in (None, 1, 3):
        raise ValueError(f"--channels must be 1 or 3, got {channels}")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ValueError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                         f"got {interpolation!r}")
    if preprocessing is not None and preprocessing not in PREPROCESSINGS:
        raise ValueError(f"--preprocessing must be one of {', '.join(PREPROCESSINGS)}, "
                         f"got {preprocessing!r}")


def _check_positive(name, value):
    if value <= 0:
        raise ValueError(f"--{name} must be positive, got {value}")
