"""How the distilled student's training step gets its teacher signal.

Four ways, chosen from the flags and logged with the reason:

- **cached logits** (the default): no augmentation, so one image always gives
  the teacher the same input; its logits are computed once
  (`kd.teacher_cache`) and batched with the images;
- **per step, own view**: the teacher runs in every training step on its own
  copy of the batch (`--teacher_image_size`) or because of
  `--nocache_teacher`;
- **per step, augmented** (`--augment`, `--teacher_views 0`): function
  matching: the teacher runs in every step, in the run's compute dtype
  (bfloat16 on CPUs with it under `allow_mix_precision`, float16 on GPUs), on
  the student's augmented batch;
- **view cache** (`--augment --teacher_views K`): the teacher's logits on K
  fixed augmented views of each image, computed once; each epoch the student
  trains on one of them (`kd.augment.ViewTable`).
"""

import dataclasses
import logging
import os
from typing import Any

from knowledge_distillation import data as data_lib
from knowledge_distillation.inputs import teacher_view_version
from knowledge_distillation.kd import augment as augment_lib
from knowledge_distillation.kd import teacher_cache

logger = logging.getLogger(__name__)


def augmentation(config):
    """The `--augment` settings of a `TrainConfig` (`kd.augment.Augmentation`), or None."""
    if not config.augment:
        return None
    return augment_lib.Augmentation(config.augment_shift, config.augment_flip,
                                    config.augment_mix, config.augment_mix_alpha)


def batch_augment(config, num_classes, num_examples):
    """A fresh augmentation (its own epoch counter) for one phase, or None.

    Per step (`BatchAugment`), or with `--teacher_views K` the view cache's K
    fixed views (`ViewTable`, no teacher outputs attached), so that the
    scratch twin trains on exactly the distilled student's views.
    """
    aug = augmentation(config)
    if aug is None:
        return None
    if config.teacher_views:
        return augment_lib.ViewTable(aug, config.seed, num_classes, num_examples,
                                     config.teacher_views, config.epoch)
    return augment_lib.BatchAugment(aug, config.seed, num_classes)


@dataclasses.dataclass
class Feed:
    """The distilled student's training data and how it carries the teacher signal.

    Attributes:
        train_ds: the training dataset.
        cached: elements are `((x, teacher_logits), y)`.
        own_view: elements are `((x, teacher_x), y)` (without `cached`).
        augment: the `BatchAugment` / `ViewTable` of the pipeline, or None.
        cache_state: "computed", "reused", "views: computed", "views: reused" or "off".
        kind: "cached logits", "per step" or "view cache".
        cache_seconds: seconds spent computing (and hashing) teacher logits before training.
    """

    train_ds: Any
    cached: bool
    own_view: bool
    augment: Any
    cache_state: str
    kind: str
    cache_seconds: float = 0.0


def compute_dtype(model):
    policy = getattr(model, "dtype_policy", None)
    return str(getattr(policy, "compute_dtype", None) or getattr(model, "dtype", "float32"))


def _outputs(trainer, teacher, views=None):
    cfg = trainer.config
    if views is None:
        def predict(x):
            return trainer.teacher_logits(teacher, x, trainer.teacher_view)
    else:
        def predict(x, geometry):
            return trainer.teacher_logits(teacher, x, trainer.teacher_view, geometry)
    return teacher_cache.teacher_outputs(
        teacher,
        trainer.teacher_data.x_train,
        predict,
        cache_dir=os.path.join(cfg.output_dir, "teacher_cache"),
        preprocess=data_lib.preprocess,
        preprocessing_version=teacher_view_version(trainer.teacher_view),
        views=views,
    )


def distillation_feed(trainer, teacher):
    """The `Feed` of the distilled phase of `trainer` (a `train.Trainer`)."""
    cfg = trainer.config
    aug = augmentation(cfg)
    own_view = trainer.teacher_view != trainer.view
    if aug is not None and cfg.teacher_views:
        table = batch_augment(cfg, trainer.data.num_classes, len(trainer.data.x_train))
        logger.info("distilled: view cache (--teacher_views %d): the teacher's logits on %d "
                    "fixed views of each image (%s) are computed once; each epoch the student "
                    "trains on one of them, the very view the teacher saw",
                    cfg.teacher_views, cfg.teacher_views, aug.describe())
        outputs = _outputs(trainer, teacher, views=table)
        table.attach(outputs)
        return Feed(trainer._train_ds(augment=table), True, False, table,
                    f"views: {outputs.source}", "view cache",
                    outputs.seconds + outputs.hash_seconds)
    if aug is not None:
        augment = batch_augment(cfg, trainer.data.num_classes, len(trainer.data.x_train))
        logger.info("distilled: the teacher runs on every training step, in %s, on the "
                    "student's augmented batch (%s); --teacher_views K would cache its logits "
                    "on K views per image instead", compute_dtype(teacher), aug.describe())
        return Feed(trainer._train_ds(augment=augment), False, False, augment, "off",
                    "per step")
    cached, why = teacher_cache.cache_decision(None)
    if cached and cfg.cache_teacher:
        logger.info("distilled: %s: teacher logits are computed once and cached", why)
        outputs = _outputs(trainer, teacher)
        train_ds = trainer._train_ds(extra=outputs.column(), lookup=outputs.lookup)
        return Feed(train_ds, True, own_view, None, outputs.source, "cached logits",
                    outputs.seconds + outputs.hash_seconds)
    logger.info("distilled: the teacher runs on every training step (%s)%s",
                why if cfg.cache_teacher else "--nocache_teacher",
                f"; it gets its own copy of each batch at {trainer.teacher_shape}"
                if own_view else "")
    if own_view and trainer.teacher_data is not trainer.data:
        logger.info("distilled: both copies are made from the image files (the "
                    "--cache_images copy is at the student's size only)")
    train_ds = trainer._train_ds(
        data=trainer.teacher_data, teacher_view=trainer.teacher_view if own_view else None)
    return Feed(train_ds, False, own_view, None, "off", "per step")
