"""What a training run's models see: the data, its views, the input shapes, the image cache.

`prepare_inputs(config)` loads the data (`data.load_data`) and decides:

- the student's `ImageView` (`--image_size`, `--channels`, `--interpolation`,
  `--preprocessing`); when image files differ in size and no `--image_size`
  is given, the size of a user model file (`--student_model`, else
  `--teacher_model`) is used, else the error names the first file that
  differs;
- the teacher's view: the student's, at `--teacher_image_size` if given;
- the model input shapes after resizing;
- `--cache_images`: image files decoded once at the student's view, in
  memory or in a file under the output folder. The teacher reads the files
  when its view differs.
"""

import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np

from knowledge_distillation import compat
from knowledge_distillation import data as data_lib
from knowledge_distillation import models
from knowledge_distillation.kd import teacher_cache

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunInputs:
    """The data of a run and how its models see it.

    Attributes:
        raw_data: the `ImageData` as loaded (arrays or image files).
        data: the student's data: `raw_data`, or its `--cache_images` copy.
        teacher_data: what the teacher reads: `data` when it shares the
            student's view, else `raw_data`.
        view: the student's `ImageView`.
        teacher_view: the teacher's `ImageView`.
        input_shape: `(H, W, C)` of the student's input.
        teacher_shape: `(H, W, C)` of the teacher's input.
    """

    raw_data: Any
    data: Any
    teacher_data: Any
    view: Any
    teacher_view: Any
    input_shape: tuple
    teacher_shape: tuple


def streams(data):
    """Whether `data`'s training images stream (image files, a large tfds split), not arrays."""
    return not isinstance(data.x_train, np.ndarray)


def _user_model_size(config):
    """`(H, W)` of the first user model file with a fixed input size, and its flag."""
    for flag, path in (("--student_model", config.student_model),
                       ("--teacher_model", config.teacher_model)):
        if path:
            shape = tuple(models.load_model(path, flag).input_shape[1:3])
            if None not in shape:
                return shape, flag
    return None, None


def prepare_inputs(config):
    """The `RunInputs` of a `TrainConfig`; `DataError`/`ValueError` on bad data or flags."""
    cfg = config
    raw = data_lib.load_data(cfg.data_path, cfg.dataset, train_size=cfg.train_size,
                             test_size=cfg.test_size, labels_file=cfg.labels_file,
                             test_labels_file=cfg.test_labels_file)
    view = data_lib.ImageView(cfg.image_size, cfg.channels, cfg.interpolation, cfg.preprocessing)
    if view.image_size is None and streams(raw) and None in raw.x_train.shape[1:3]:
        size, flag = _user_model_size(cfg)
        if size is not None:
            logger.info("data: the images differ in size; resizing them to %s's %dx%d", flag,
                        size[0], size[1])
            view = dataclasses.replace(view, image_size=size)
    teacher_view = (dataclasses.replace(view, image_size=cfg.teacher_image_size)
                    if cfg.teacher_image_size else view)
    input_shape = data_lib.model_input_shape(raw, view)
    teacher_shape = data_lib.model_input_shape(raw, teacher_view, "--teacher_image_size H,W")
    if cfg.augment and cfg.augment_shift and cfg.augment_shift >= min(input_shape[:2]):
        # (--augment refuses --teacher_image_size: the teacher's copy is this size too.)
        raise ValueError(
            f"--augment_shift {cfg.augment_shift}: the model input is {input_shape[0]}x"
            f"{input_shape[1]}; a shift must be smaller than the image, at most "
            f"{min(input_shape[:2]) - 1} pixels")
    # The colour mode is the whole split's, fixed here: a chunk or sample of
    # the files must not guess its own (an all-gray subset of a mixed folder).
    view = dataclasses.replace(view, channels=input_shape[2])
    teacher_view = dataclasses.replace(teacher_view, channels=teacher_shape[2])
    for flag, name, user in (("--student", cfg.student, cfg.student_model),
                             ("--teacher", cfg.teacher, cfg.teacher_model)):
        wanted = models.RESCALES_ITSELF.get(name)
        if wanted and not user and cfg.preprocessing != wanted:
            logger.warning("%s %s rescales its 0-255 input itself: --preprocessing %s scales it "
                           "twice (--preprocessing %s is its convention)", flag, name,
                           cfg.preprocessing, wanted)
    data = raw
    if cfg.cache_images != "none":
        if not streams(raw):
            logger.warning("--cache_images %s: the images are already in memory (%s)",
                           cfg.cache_images, raw.name)
        else:
            cache_dir = os.path.join(cfg.output_dir, "image_cache")
            with data_lib.naming_undecodable(raw):
                data = dataclasses.replace(raw, **{
                    f"x_{split}": data_lib.cached_images(getattr(raw, f"x_{split}"), view,
                                                         cfg.cache_images, cache_dir, split)
                    for split in ("train", "test")})
    teacher_data = data if teacher_view == view else raw
    logger.info(
        "data: %s, %d training and %d test images (%s), model input %s%s, preprocessing %s, "
        "%d classes", raw.name, len(raw.x_train), len(raw.x_test),
        "streamed from image files" if streams(data) else "in memory", input_shape,
        f" (teacher {teacher_shape})" if teacher_shape != input_shape else "",
        view.preprocessing, raw.num_classes)
    return RunInputs(raw, data, teacher_data, view, teacher_view, input_shape, teacher_shape)


def model_metadata(model, view, class_names=None):
    """What a saved model's user needs to feed it; stored inside the file (`util.files`)."""
    return {"preprocessing": view.preprocessing, "interpolation": view.interpolation,
            "input_shape": [None if d is None else int(d) for d in model.input_shape[1:]],
            "class_names": list(class_names or []) or None, "stack": compat.STACK}


def teacher_view_version(teacher_view):
    """The teacher cache's preprocessing version: its view and the converter's source digest."""
    described = json.dumps(teacher_view.describe(), sort_keys=True, default=list)
    return f"{teacher_cache.PREPROCESSING_VERSION}|{described}|{data_lib.conversion_digest()}"
