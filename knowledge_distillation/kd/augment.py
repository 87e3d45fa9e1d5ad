"""Augmentation shared by teacher and student: one view per image and step, seen by both.

Function matching (Beyer et al. 2022, "Knowledge distillation: A good teacher
is patient and consistent") gives the teacher exactly the student's
augmented input. Here the augmentation is part of the training pipeline
(`data.make_dataset(augment=...)`), applied once per batch, so the teacher,
running inside the training step on the same `x`, cannot see another view;
and the scratch student gets the very same batches.

What it does, in this order:

1. **Shift** (`shift` pixels): pad every image by `shift` zero pixels on each
   side (black, in stored pixel values) and crop it back at a random offset,
   per image. Exact: no resampling.
2. **Horizontal flip** (`flip`): each image with probability 1/2. Off for
   data where left and right differ in meaning (digits, text).
3. **Mixing** (`mix`, `mix_alpha`), on the preprocessed batch: `mixup`
   blends each image with its neighbour in the batch (the batch rolled by
   one) at a weight `lam ~ Beta(alpha, alpha)` drawn per batch; `cutmix`
   pastes a box of the neighbour covering `1 - lam` of the image. Labels
   become the same mixture of one-hot vectors.

The random numbers are a function of `(seed, epoch, step)` only, drawn with
TensorFlow's stateless generators: two pipelines with the same seed and data
order give the same views, and a resumed run continues the random stream at
its epoch (and `callbacks.ResumeShuffle` its shuffle order). The
epoch comes from an `EpochCounter` the pipeline advances each time Keras
starts iterating it (once per epoch); `ResumeEpoch` sets it where
`BackupAndRestore` resumes.

**View cache** (`ViewTable`, `--teacher_views K`): K shift/flip views of each
image are fixed in advance from a seeded generator, the teacher's logits
for all of them are computed once (`teacher_cache.teacher_outputs(views=)`),
and each epoch the student trains on one view per image, chosen by a seeded
permutation of the K views, so that K epochs use every view once. Mixing
pairs images within a batch, so mixed views cannot be cached per image:
`--teacher_views` with mixing is an error.
"""

import dataclasses
import logging
import threading

import numpy as np
import tensorflow as tf

from knowledge_distillation.compat import keras
from knowledge_distillation.config import AUGMENT_MIXES as MIXES

logger = logging.getLogger(__name__)

# The seed streams of the separate random draws of one batch.
_SHIFT, _FLIP, _MIX, _BOX = 1, 2, 3, 4
# Steps per epoch are below this, so (epoch, step) maps to one stream id.
_STEP_STRIDE = 1 << 24


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The augmentation settings (see the module docstring).

    Args:
        shift: pixels of the random shift (pad and crop); 0 for none.
        flip: random horizontal flips.
        mix: "none", "mixup" or "cutmix".
        mix_alpha: the Beta(alpha, alpha) parameter of the mixing weight, > 0.
    """

    shift: int = 0
    flip: bool = False
    mix: str = "none"
    mix_alpha: float = 1.0

    def __post_init__(self):
        if int(self.shift) != self.shift or self.shift < 0:
            raise ValueError(f"--augment_shift must be a whole number of pixels >= 0, "
                             f"got {self.shift}")
        if self.mix not in MIXES:
            raise ValueError(f"--augment_mix must be one of {', '.join(MIXES)}, got {self.mix!r}")
        if not (np.isfinite(self.mix_alpha) and self.mix_alpha > 0):
            raise ValueError(f"--augment_mix_alpha must be a positive number, "
                             f"got {self.mix_alpha}")

    @property
    def mixes(self):
        return self.mix != "none"

    def describe(self):
        """A short text naming every setting, e.g. `shift 2 px, flip, mixup alpha 0.2`."""
        parts = []
        if self.shift:
            parts.append(f"shift {self.shift} px")
        if self.flip:
            parts.append("flip")
        if self.mixes:
            parts.append(f"{self.mix} alpha {self.mix_alpha:g}")
        return ", ".join(parts) or "none"


class EpochCounter:
    """The epoch a pipeline is in: advanced each time a new iteration of it starts.

    Keras iterates a dataset of unknown-to-it length anew every epoch, so
    the n-th iteration is epoch `start + n`. `start` is set by `ResumeEpoch`
    when a run resumes. Thread-safe: tf.data calls it from its own threads.
    """

    def __init__(self, start=0):
        self._next = int(start)
        self._lock = threading.Lock()

    def start_at(self, epoch):
        with self._lock:
            self._next = int(epoch)

    def _advance(self):
        with self._lock:
            epoch, self._next = self._next, self._next + 1
        return np.int64(epoch)

    def dataset(self):
        """An endless dataset repeating this iteration's epoch number (drawn once per iteration)."""
        epoch = tf.data.Dataset.range(1).map(
            lambda _: tf.reshape(tf.numpy_function(self._advance, [], tf.int64), []))
        return epoch.flat_map(lambda e: tf.data.Dataset.from_tensors(e).repeat())


class ResumeEpoch(keras.callbacks.Callback):
    """Sets an `EpochCounter` to the epoch `fit` starts at (after BackupAndRestore restored it).

    Put it after `BackupAndRestore` in the callback list.
    """

    def __init__(self, counter, restored_epoch):
        super().__init__()
        self.counter = counter
        self.restored_epoch = restored_epoch

    def on_train_begin(self, logs=None):
        self.counter.start_at(self.restored_epoch(self.model))


def shift_and_flip(images, dy, dx, flip, shift):
    """Each image of the uint8 batch `images` `(B, H, W, C)` shifted and maybe flipped.

    Args:
        images: `(B, H, W, C)` tensor.
        dy, dx: `(B,)` int32 offsets in `[0, 2 * shift]` of the crop in the
            padded image (`shift`: no shift).
        flip: `(B,)` bool, flip that image left to right.
        shift: the padding.
    """
    if shift:
        static = images.shape
        height = static[1] if static[1] is not None else tf.shape(images)[1]
        width = static[2] if static[2] is not None else tf.shape(images)[2]
        padded = tf.pad(images, [[0, 0], [shift, shift], [shift, shift], [0, 0]])
        rows = dy[:, None] + tf.range(height)[None, :]
        cols = dx[:, None] + tf.range(width)[None, :]
        images = tf.gather(padded, rows, axis=1, batch_dims=1)
        images = tf.gather(images, cols, axis=2, batch_dims=1)
        images = tf.ensure_shape(images, static)
    if flip is not None:
        images = tf.where(flip[:, None, None, None], images[:, :, ::-1], images)
    return images


def _seed(seed, stream, epoch, step):
    return tf.stack([tf.constant(int(seed) * 8 + stream, tf.int64),
                     tf.cast(epoch, tf.int64) * _STEP_STRIDE + tf.cast(step, tf.int64)])


def _beta(alpha, seed):
    """One draw of Beta(alpha, alpha) from two stateless Gamma draws."""
    gammas = tf.random.stateless_gamma([2], seed=seed, alpha=alpha, dtype=tf.float32)
    return gammas[0] / tf.maximum(gammas[0] + gammas[1], 1e-12)


def mix_batch(images, labels, num_classes, augmentation, seed, box_seed=None):
    """Mixup or cutmix of a preprocessed float batch with the batch rolled by one.

    Args:
        images: `(B, H, W, C)` float32.
        labels: `(B,)` integer labels.
        num_classes: classes of the one-hot labels.
        augmentation: the `Augmentation` (its `mix` and `mix_alpha`).
        seed: the `(2,)` stateless seed of this batch's mixing weight.
        box_seed: the `(2,)` stateless seed of the cutmix box (default: `seed` reversed).

    Returns:
        `(images, soft_labels)`: soft labels `(B, num_classes)` float32.
    """
    lam = _beta(augmentation.mix_alpha, seed)
    if box_seed is None:
        box_seed = tf.reverse(seed, [0])
    partner = tf.roll(images, 1, axis=0)
    one_hot = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
    if augmentation.mix == "mixup":
        mixed = lam * images + (1.0 - lam) * partner
    else:
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
        centre = tf.random.stateless_uniform([2], seed=box_seed)
        side = tf.sqrt(1.0 - lam)
        cy, cx = centre[0] * h, centre[1] * w
        top = tf.cast(tf.clip_by_value(tf.round(cy - side * h / 2), 0, h), tf.int32)
        bottom = tf.cast(tf.clip_by_value(tf.round(cy + side * h / 2), 0, h), tf.int32)
        left = tf.cast(tf.clip_by_value(tf.round(cx - side * w / 2), 0, w), tf.int32)
        right = tf.cast(tf.clip_by_value(tf.round(cx + side * w / 2), 0, w), tf.int32)
        inside_rows = (tf.range(height) >= top) & (tf.range(height) < bottom)
        inside_cols = (tf.range(width) >= left) & (tf.range(width) < right)
        box = inside_rows[:, None] & inside_cols[None, :]
        mixed = tf.where(box[None, :, :, None], partner, images)
        # The label weight is the area actually kept, after clipping at the border.
        lam = 1.0 - tf.cast((bottom - top) * (right - left), tf.float32) / (h * w)
    soft = lam * one_hot + (1.0 - lam) * tf.roll(one_hot, 1, axis=0)
    return mixed, soft


class BatchAugment:
    """Per-step augmentation of the training pipeline: a fresh view of each image every step.

    `data.make_dataset(augment=...)` calls `geometry` on the stored uint8
    batch (after resizing, before preprocessing) and `finish` on the
    preprocessed batch.

    Args:
        augmentation: the `Augmentation`.
        seed: the run's seed.
        num_classes: for mixed (soft) labels.
    """

    teacher_outputs = False

    def __init__(self, augmentation, seed, num_classes):
        self.augmentation = augmentation
        self.seed = int(seed)
        self.num_classes = int(num_classes)
        self.counter = EpochCounter()

    def _draws(self, batch, epoch, step):
        aug = self.augmentation
        dy = dx = flip = None
        if aug.shift:
            offsets = tf.random.stateless_uniform(
                [batch, 2], seed=_seed(self.seed, _SHIFT, epoch, step), minval=0,
                maxval=2 * aug.shift + 1, dtype=tf.int32)
            dy, dx = offsets[:, 0], offsets[:, 1]
        if aug.flip:
            flip = tf.random.stateless_uniform(
                [batch], seed=_seed(self.seed, _FLIP, epoch, step)) < 0.5
        return dy, dx, flip

    def geometry(self, images, indices, epoch, step):
        """Shift and flip of the uint8 batch `images` (one per view) of examples `indices`."""
        dy, dx, flip = self._draws(tf.shape(indices)[0], epoch, step)
        return tuple(shift_and_flip(x, dy, dx, flip, self.augmentation.shift) for x in images)

    def finish(self, images, labels, indices, epoch, step):
        """`(images, labels, extra)`: mixing of the preprocessed batch; extra is None here."""
        if self.augmentation.mixes:
            images, labels = mix_batch(images, labels, self.num_classes, self.augmentation,
                                       _seed(self.seed, _MIX, epoch, step),
                                       _seed(self.seed, _BOX, epoch, step))
        return images, labels, None

    def describe(self):
        return self.augmentation.describe()


class ViewTable(BatchAugment):
    """K fixed shift/flip views of every image, and which one each epoch uses (the view cache).

    Args:
        augmentation: the `Augmentation` (no mixing).
        seed: the run's seed: the views and the per-epoch choice derive from it.
        num_classes: classes of the labels.
        num_examples: N, the training images.
        views: K, views per image.
        epochs: epochs the student trains.
    """

    def __init__(self, augmentation, seed, num_classes, num_examples, views, epochs):
        if augmentation.mixes:
            raise ValueError(
                f"--teacher_views {views} with --augment_mix {augmentation.mix}: mixing pairs "
                "images within a batch, so its views cannot be cached per image; use the "
                "per-step teacher (--teacher_views 0) or no mixing")
        if not augmentation.shift and not augmentation.flip:
            raise ValueError("--teacher_views needs --augment_shift or --augment_flip: there "
                             "is nothing to draw views from")
        if int(views) < 1:
            raise ValueError(f"--teacher_views must be >= 1, got {views}")
        super().__init__(augmentation, seed, num_classes)
        self.views = int(views)
        self.num_examples = int(num_examples)
        rng = np.random.default_rng([int(seed), 15])
        shape = (self.views, self.num_examples)
        s = augmentation.shift
        # Per view and image: dy, dx in [0, 2s], flip in {0, 1}.
        self.params = np.zeros(shape + (3,), np.int32)
        if s:
            self.params[..., :2] = rng.integers(0, 2 * s + 1, size=shape + (2,))
        if augmentation.flip:
            self.params[..., 2] = rng.integers(0, 2, size=shape)
        # Epoch e uses view choice[e, i] of image i: a permutation of the K
        # views per image for every block of K epochs.
        blocks = -(-int(epochs) // self.views)
        # (NumPy 1.19, the 2.6 stack's, has no Generator.permuted.)
        order = np.argsort(rng.random((blocks, self.num_examples, self.views)),
                           axis=2).astype(np.int32)
        self.choice = order.transpose(0, 2, 1).reshape(blocks * self.views,
                                                       self.num_examples)[:int(epochs)]
        # Made here, eagerly, and captured by the pipeline's functions.
        self._params = tf.constant(self.params)
        self._choice = tf.constant(self.choice)
        self.outputs = None

    def key(self):
        """What identifies the views (for the teacher cache's key)."""
        return {"augmentation": dataclasses.asdict(self.augmentation), "views": self.views,
                "seed": self.seed, "generator": "numpy PCG64 [seed, 15]"}

    def view_geometry(self, k, begin, end):
        """`geometry(images, indices)` applying view `k` of images `begin:end`.

        `indices` count from `begin` (a pipeline over `x[begin:end]`), as
        `data.make_dataset(geometry=...)` passes them.
        """
        params = tf.constant(self.params[k, begin:end])
        return lambda images, indices: self._apply(images, tf.gather(params, indices))

    def _apply(self, images, p):
        """Shift and flip every image of the batch by its `(dy, dx, flip)` row of `p`."""
        flip = tf.cast(p[:, 2], tf.bool) if self.augmentation.flip else None
        return tuple(shift_and_flip(x, p[:, 0], p[:, 1], flip, self.augmentation.shift)
                     for x in images)

    def attach(self, outputs):
        """Uses the `(N, K, classes)` teacher outputs `outputs` (a `TeacherOutputs`).

        Without them (the scratch twin of a view-cache run) the pipeline gives
        the same views and no teacher outputs.
        """
        outputs.prepare_rows()
        self.outputs = outputs

    def _view_of(self, indices, epoch):
        epoch = tf.minimum(tf.cast(epoch, tf.int64), len(self.choice) - 1)
        return tf.gather(tf.gather(self._choice, epoch), indices)

    def geometry(self, images, indices, epoch, step):
        k = self._view_of(indices, epoch)
        return self._apply(images, tf.gather_nd(self._params, tf.stack(
            [tf.cast(k, tf.int64), tf.cast(indices, tf.int64)], axis=1)))

    @property
    def teacher_outputs(self):
        return self.outputs is not None

    def finish(self, images, labels, indices, epoch, step):
        if self.outputs is None:
            return images, labels, None
        k = tf.cast(self._view_of(indices, epoch), tf.int64)
        flat = tf.cast(indices, tf.int64) * self.views + k
        return images, labels, self.outputs.rows(flat)

    def describe(self):
        return f"{self.augmentation.describe()}; {self.views} cached views per image"
