"""The knowledge-distillation run: teacher, scratch student, distilled student.

It reads like the keras-io example, top to bottom: load the data, train (or
load) the teacher, train a student from scratch as the baseline, distil a
fresh student of the same architecture and initial weights, evaluate all three
on the test split, write `summary.json`.

Each phase resumes where a killed run stopped: a finished phase is reloaded
from its saved model, an unfinished one restarts from its last finished epoch
through `keras.callbacks.BackupAndRestore`.
"""

import dataclasses
import json
import logging
import os
import sys
import time

import numpy as np
import tensorflow as tf

from knowledge_distillation import compat
from knowledge_distillation import data as data_lib
from knowledge_distillation import distribute
from knowledge_distillation import models, rundir, teacher_feed
from knowledge_distillation.compat import keras
from knowledge_distillation.inputs import model_metadata, prepare_inputs, streams
from knowledge_distillation.kd import augment as augment_lib
from knowledge_distillation.kd.losses import LabelCrossentropy, accuracy_metric, distillation_loss
from knowledge_distillation.phase import Phase, check_backup, check_finite_weights, finite_or_null
from knowledge_distillation.ascend.device import setup_device
from knowledge_distillation.ascend.precision import run_compute
from knowledge_distillation.kd.distiller import Distiller
from knowledge_distillation.util.files import save_model_atomic, write_json_atomic
from knowledge_distillation.util.inference import batched_predict

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


def _verbose():
    return 1 if sys.stdout.isatty() else 2


def _optimizer(config, steps_per_epoch, epochs, session):
    # Cosine decay to zero over the phase: the same schedule for every model,
    # so the scratch and distilled students are compared on equal terms.
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=max(1, steps_per_epoch * epochs)
    )
    return session.wrap_optimizer(keras.optimizers.Adam(schedule))


def _classifier_compile(model, optimizer, session, steps_per_execution=1, soft_labels=False):
    model.compile(
        optimizer=optimizer,
        loss=LabelCrossentropy() if soft_labels else compat.classification_loss(),
        metrics=[accuracy_metric(soft_labels)],
        steps_per_execution=steps_per_execution,
        **session.compile_kwargs(),
    )


def _evaluate(model, test_ds, session):
    if not compat.is_compiled(model) or getattr(model, "loss", None) is None:
        _classifier_compile(model, "adam", session)
    result = model.evaluate(test_ds, verbose=0, return_dict=True)
    return {"accuracy": float(result["accuracy"]), "loss": float(result["loss"])}


def _zeros_like_spec(spec):
    """A one-example batch of zeros for each `tf.TensorSpec` in `spec`."""
    return tf.nest.map_structure(
        lambda s: np.zeros([1] + [d or 1 for d in s.shape[1:]], s.dtype.as_numpy_dtype), spec
    )


def _last_epoch_metrics(history):
    if history is None or not history.history:
        return {}
    return {k: float(v[-1]) for k, v in history.history.items()}


class Trainer:
    """Runs the three phases of one configuration.

    Args:
        config: a `TrainConfig`.
    """

    def __init__(self, config):
        self.config = config
        self.session = None
        self.data = None
        self.steps_per_epoch = None
        self.steps_per_execution = 1

    # -- data ------------------------------------------------------------
    @property
    def augmentation(self):
        """The `--augment` settings (`kd.augment.Augmentation`), or None."""
        return teacher_feed.augmentation(self.config)

    @property
    def soft_labels(self):
        return self.augmentation is not None and self.augmentation.mixes

    def _batch_augment(self):
        """A fresh per-step augmentation (its own epoch counter) for one phase, or None."""
        return teacher_feed.batch_augment(self.config, self.data.num_classes,
                                          len(self.data.x_train))

    def _train_ds(self, extra=None, lookup=None, data=None, view=None, teacher_view=None,
                  augment=None):
        """The shuffled training batches (the same order for every phase: same seed, same indices).

        With `augment` every phase also gets the same views of them (see `kd.augment`).
        """
        cfg = self.config
        data = data or self.data
        ds = data_lib.make_dataset(
            data.x_train,
            data.y_train,
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            drop_remainder=cfg.device.static,
            extra=extra,
            view=view or self.view,
            teacher_view=teacher_view,
            augment=augment,
        )
        if augment is not None and augment.teacher_outputs:
            ds = ds.map(lambda x, y, t: ((x, t), y))
        if extra is not None:
            ds = ds.map(lookup or (lambda x, y, t: ((x, t), y)))
        if cfg.max_steps is not None:
            ds = ds.take(cfg.max_steps)
        return self.dist.shard(ds, training=True, num_examples=len(data.x_train))

    def _test_ds(self, data=None, view=None):
        data = data or self.data
        ds = data_lib.make_dataset(
            data.x_test,
            data.y_test,
            self.config.batch_size,
            drop_remainder=self.config.device.static,
            view=view or self.view,
        )
        return self.dist.shard(ds, training=False)

    def _count_steps(self):
        n = len(self.data.x_train)
        bs = self.config.batch_size
        steps = n // bs if self.config.device.static else -(-n // bs)
        if self.config.max_steps is not None:
            steps = min(steps, self.config.max_steps)
        if steps == 0:
            raise ValueError(
                f"--batch_size {bs} is larger than the {n} training examples "
                "and --static drops partial batches: nothing to train on"
            )
        return steps

    # -- models ----------------------------------------------------------
    def _build(self, name, user_path, flag, shape, size_flag="--image_size"):
        cfg = self.config
        if user_path:
            model = models.load_model(user_path, flag)
            models.check_compatible(model, shape, self.data.num_classes, flag, size_flag)
            return model
        return models.build_model(name, shape, self.data.num_classes, seed=cfg.seed,
                                  alpha_width=cfg.alpha_width)

    def _fresh_student(self):
        """The student architecture with the run's seeded initial weights."""
        cfg = self.config
        if cfg.student_model:
            user = models.load_model(cfg.student_model, "--student_model")
            models.check_compatible(
                user, self.input_shape, self.data.num_classes, "--student_model"
            )
            compat.set_random_seed(cfg.seed)
            model = keras.models.clone_model(user)
        else:
            model = self._build(cfg.student, None, "--student", self.input_shape)
        return self.session.prepare_model(model)

    def _fit(self, phase, model, target, train_ds, epochs, augment=None):
        logger.info(
            "%s: training %s (%d parameters) for %d epochs of %d steps",
            phase.name,
            target.name,
            target.count_params(),
            epochs,
            self.steps_per_epoch,
        )
        check_backup(phase)
        start = time.perf_counter()
        self.dist.prepare_fit(model)
        callbacks = (phase.callbacks(target, self.session, train_ds, augment)
                     + self.dist.callbacks(model, target))
        history = model.fit(
            train_ds,
            epochs=epochs,
            callbacks=callbacks,
            verbose=_verbose(),
        )
        seconds = time.perf_counter() - start
        check_finite_weights(target, phase.name)
        view = self.teacher_view if phase.name == "teacher" else self.view
        save_model_atomic(target, phase.model_path,
                          model_metadata(target, view, self.data.class_names))
        metrics = _last_epoch_metrics(history)
        return {
            "training_time_sec": seconds,
            "examples_per_sec": phase.throughput.examples_per_sec,
            "train_accuracy": metrics.get("accuracy"),
            "train_loss": metrics.get("loss"),
        }

    def _phase(self, name):
        return Phase(self.config, name, self.dist.backup_root(self.config.output_dir))

    def _resume_or_none(self, phase):
        if not phase.finished:
            return None
        logger.info("%s: finished in an earlier run, loading %s", phase.name, phase.model_path)
        return models.load_model(phase.model_path, f"{phase.name} model")

    # -- phases ----------------------------------------------------------
    def teacher(self):
        cfg = self.config
        if cfg.teacher_model:
            logger.info("teacher: loading %s (evaluated, not retrained)", cfg.teacher_model)
            model = self._build(None, cfg.teacher_model, "--teacher_model", self.teacher_shape,
                                "--teacher_image_size")
            return model, {"trained": False}
        phase = self._phase("teacher")
        model = self._resume_or_none(phase)
        if model is not None:
            return model, {"trained": True, "resumed": True}
        model = self.session.prepare_model(
            self._build(cfg.teacher, None, "--teacher", self.teacher_shape))
        if cfg.teacher_epochs == 0:
            raise ValueError(
                "--teacher_epoch 0 trains no teacher: give --teacher_model PATH "
                "or a positive --teacher_epoch"
            )
        _classifier_compile(
            model, _optimizer(cfg, self.steps_per_epoch, cfg.teacher_epochs, self.session),
            self.session, self.steps_per_execution, self.soft_labels,
        )
        # Per step even with --teacher_views: the teacher's own epochs are not the student's.
        augment = (augment_lib.BatchAugment(self.augmentation, cfg.seed, self.data.num_classes)
                   if self.augmentation else None)
        train_ds = self._train_ds(data=self.teacher_data, view=self.teacher_view, augment=augment)
        stats = self._fit(phase, model, model, train_ds, cfg.teacher_epochs, augment)
        return model, {"trained": True, **stats}

    def scratch(self):
        cfg = self.config
        phase = self._phase("scratch")
        model = self._resume_or_none(phase)
        if model is not None:
            return model, {"resumed": True}
        model = self._fresh_student()
        _classifier_compile(model, _optimizer(cfg, self.steps_per_epoch, cfg.epoch, self.session),
                            self.session, self.steps_per_execution, self.soft_labels)
        augment = self._batch_augment()
        if augment is not None:
            logger.info("scratch: training batches augmented (%s), as the distilled student's",
                        augment.describe())
        stats = self._fit(phase, model, model, self._train_ds(augment=augment), cfg.epoch,
                          augment)
        return model, stats

    def distill(self, teacher):
        cfg = self.config
        phase = self._phase("distilled")
        model = self._resume_or_none(phase)
        if model is not None:
            return model, {"resumed": True}
        student = self._fresh_student()
        feed = teacher_feed.distillation_feed(self, teacher)
        train_ds = feed.train_ds
        distiller = Distiller(
            teacher=teacher, student=student, teacher_outputs_in_data=feed.cached,
            teacher_input_in_data=feed.own_view and not feed.cached,
        )
        distiller.compile(
            optimizer=_optimizer(cfg, self.steps_per_epoch, cfg.epoch, self.session),
            metrics=[accuracy_metric(self.soft_labels)],
            student_loss_fn=LabelCrossentropy() if self.soft_labels else None,
            distillation_loss_fn=distillation_loss(cfg.distillation_loss,
                                                   cfg.distill_temperature),
            alpha=cfg.alpha,
            steps_per_execution=self.steps_per_execution,
            **self.session.compile_kwargs(),
        )
        # BackupAndRestore needs a built model. Build it from the dataset's
        # element spec, not from a batch: pulling a batch would use up one
        # seeded shuffle order, and the distilled student would then see the
        # scratch student's epoch k+1 order in its epoch k.
        distiller(_zeros_like_spec(train_ds.element_spec[0]))
        stats = self._fit(phase, distiller, student, train_ds, cfg.epoch, feed.augment)
        return student, {**stats, "teacher_cache": feed.cache_state, "teacher_feed": feed.kind,
                         "teacher_cache_sec": feed.cache_seconds}

    def teacher_logits(self, teacher, x=None, view=None, geometry=None):
        """Teacher logits of `x` (default: the training split), batched, inference mode.

        `geometry`: a fixed shift/flip per image (a cached view, `ViewTable.view_geometry`).
        """
        x = self.teacher_data.x_train if x is None else x
        ds = data_lib.make_dataset(x, np.zeros(len(x), np.int64), 512,
                                   view=view or self.teacher_view, geometry=geometry)
        inputs = self.dist.shard(ds.map(lambda x, y: x), training=False)
        return batched_predict(teacher, inputs, compiled=True).astype(np.float32)

    def _steps_per_execution(self):
        requested = self.config.steps_per_execution
        if self.config.distribute.distributed:
            # Keras 3.15's multi-step loop under a tf.distribute strategy
            # fails at run time (an unfed placeholder in its while loop).
            if requested is not None and requested > 1:
                raise ValueError(
                    f"--steps_per_execution {requested}: Keras cannot run several steps "
                    "per call under --distributed; use --steps_per_execution 1")
            return 1, "--distributed"
        return self.session.steps_per_execution(requested)

    # -- the run ---------------------------------------------------------
    def run(self):
        """Runs the three phases under `--distributed`'s engine (see the distribute package)."""
        cfg = self.config
        if cfg.quantize:
            compat.require_keras3("--quantize")
        # First: logical devices and multi-worker collectives need TensorFlow unstarted.
        self.dist = distribute.setup(
            cfg.distribute, batch_size=cfg.batch_size, full_batches=cfg.device.static
        )
        self.config = dataclasses.replace(cfg, output_dir=self.dist.write_dir(cfg.output_dir))
        self._check_model_names()
        self.folder = rundir.RunFolder(self.config.output_dir, rundir.deciding_settings(cfg),
                                       overwrite=cfg.overwrite)
        self.folder.claim()
        try:
            with self.dist.scope():
                summary = self._run()
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError):
            # A corrupt image body fails where TensorFlow decodes it, without
            # the file's name: find the file and name it.
            if getattr(self, "raw_data", None) is not None:
                data_lib.locate_undecodable_in(self.raw_data)
            raise
        finally:
            self.folder.release()
        self.dist.finish()
        return summary

    def _check_model_names(self):
        cfg = self.config
        for flag, name, user in (("--teacher", cfg.teacher, cfg.teacher_model),
                                 ("--student", cfg.student, cfg.student_model)):
            if not user and name not in models.MODELS:
                raise ValueError(f"{flag}: unknown model {name!r}; choose one of "
                                 f"{', '.join(sorted(models.MODELS))}")

    def _check_student_model(self):
        """A user's student file, checked against the data before the teacher trains."""
        cfg = self.config
        if cfg.student_model:
            user = models.load_model(cfg.student_model, "--student_model")
            models.check_compatible(
                user, self.input_shape, self.data.num_classes, "--student_model")

    def _previous_summary(self):
        try:
            with open(os.path.join(self.config.output_dir, SUMMARY_FILE), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _finished_summary(self):
        """The recorded summary of a run whose every phase finished, else None."""
        cfg = self.config
        phases = ([] if cfg.teacher_model else ["teacher"]) + ["scratch", "distilled"]
        path = os.path.join(cfg.output_dir, SUMMARY_FILE)
        if not os.path.isfile(path) or not all(self._phase(p).finished for p in phases):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                summary = json.load(f)
        except (OSError, ValueError):
            return None
        logger.info("every phase finished in an earlier run with these settings: re-reporting "
                    "%s; nothing trains (--overwrite starts over)", path)
        return summary

    def _run(self):
        cfg = self.config
        wall_start = time.perf_counter()
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.session = setup_device(cfg.device, cfg.output_dir)
        self.steps_per_execution, why = self._steps_per_execution()
        logger.info("training: %d steps per compiled call (%s)", self.steps_per_execution, why)
        inputs = prepare_inputs(cfg)
        for name in ("raw_data", "data", "teacher_data", "view", "teacher_view", "input_shape",
                     "teacher_shape"):
            setattr(self, name, getattr(inputs, name))
        self.folder.check_data(rundir.data_fingerprint(self.raw_data))
        finished = self._finished_summary()
        if finished is not None:
            return finished
        self.folder.check_compute(run_compute(self.session, cfg.device.precision_mode),
                                  cfg.device.precision_mode)
        self._check_student_model()
        self.steps_per_epoch = self._count_steps()
        test_ds = self._test_ds()

        teacher, teacher_stats = self.teacher()
        teacher_test_ds = (test_ds if self.teacher_view == self.view
                           else self._test_ds(self.teacher_data, self.teacher_view))
        teacher_eval = _evaluate(teacher, teacher_test_ds, self.session)
        logger.info("teacher: test accuracy %.4f, loss %.4f", teacher_eval["accuracy"], teacher_eval["loss"])

        scratch, scratch_stats = self.scratch()
        scratch_eval = _evaluate(scratch, test_ds, self.session)
        logger.info("scratch student: test accuracy %.4f, loss %.4f", scratch_eval["accuracy"], scratch_eval["loss"])

        distilled, distill_stats = self.distill(teacher)
        distilled_eval = _evaluate(distilled, test_ds, self.session)
        logger.info("distilled student: test accuracy %.4f, loss %.4f", distilled_eval["accuracy"], distilled_eval["loss"])

        previous = self._previous_summary()

        def phase_entry(phase, model, evaluation, stats):
            # A phase reloaded from an earlier start keeps the figures that start recorded.
            earlier = previous.get(phase, {}) if stats.get("resumed") else {}
            return {**earlier, **evaluation, "parameters": int(model.count_params()), **stats}

        summary = {
            "teacher": phase_entry("teacher", teacher, teacher_eval, teacher_stats),
            "scratch": phase_entry("scratch", scratch, scratch_eval, scratch_stats),
            "distilled": phase_entry("distilled", distilled, distilled_eval, distill_stats),
            **{key: phase_entry("distilled", distilled, {}, distill_stats).get(key)
               for key in ("examples_per_sec", "train_accuracy", "train_loss",
                           "training_time_sec")},
            "data": {
                "name": self.data.name,
                "train_examples": len(self.data.x_train),
                "test_examples": len(self.data.x_test),
                "input_shape": list(self.input_shape),
                "teacher_input_shape": list(self.teacher_shape),
                "num_classes": self.data.num_classes,
                "class_names": list(self.data.class_names or []) or None,
                "source": "image files" if streams(self.raw_data) else "arrays",
                "cache_images": cfg.cache_images if streams(self.raw_data) else "none",
                "preprocessing": self.view.preprocessing,
                "interpolation": self.view.interpolation,
            },
            "recipe": {
                "augmentation": self.augmentation.describe() if self.augmentation else "none",
                "teacher": distill_stats.get("teacher_feed"),
                "teacher_views": cfg.teacher_views,
                "distillation_loss": cfg.distillation_loss,
                "temperature": cfg.distill_temperature,
                "alpha": cfg.alpha,
            },
            "dtype_policy": keras.mixed_precision.global_policy().name,
            "stack": compat.environment(),
            "distribute": self.dist.describe(),
            "config": dataclasses.asdict(cfg),
        }
        if cfg.quantize:
            summary["quantization"] = self.quantize(distilled)
        summary["wall_time_sec"] = time.perf_counter() - wall_start
        write_json_atomic(os.path.join(cfg.output_dir, SUMMARY_FILE), finite_or_null(summary))
        return summary

    def quantize(self, student):
        from knowledge_distillation.quant.quantize import quantize_into

        return quantize_into(
            os.path.join(self.config.output_dir, "quant"),
            student,
            self.data,
            name="distilled_student",
            batch_size=self.config.batch_size,
            view=self.view,
        )


def run(config):
    """Runs one knowledge-distillation configuration; returns the summary dict."""
    return Trainer(config).run()
