"""The distributed engine of one run: strategy, scope, data sharding and hooks."""

import contextlib
import importlib
import json
import logging
import os
import shutil

from knowledge_distillation import compat
from knowledge_distillation.distribute import keras_patch
from knowledge_distillation.distribute.callbacks import (
    AgreeOnRestoredEpoch,
    NpuBroadcastVariables,
    WeightsDigest,
)
from knowledge_distillation.distribute.plan import (
    MIRRORED,
    MULTI_WORKER,
    NPU,
    SINGLE,
    _write_dir,
    configure_cpu_devices,
    plan_cluster,
)

logger = logging.getLogger(__name__)


class DistributedContext:
    """What `setup` decided: the strategy and the per-engine hooks.

    Every hook is safe to call in every mode; it does nothing where nothing
    is needed, so callers never branch on the engine.

    Attributes:
        plan: the `ClusterPlan`.
        strategy: the `tf.distribute.Strategy` (the default strategy for
            single runs and NPU ranks, where npu_device does the collectives).
        num_replicas: replicas over the whole cluster (NPU: RANK_SIZE).
        global_batch: examples per training step over all replicas.
        npu_distribute: the `npu_device.distribute` module on NPU ranks.
        devices: this process's replica devices (tf.distribute engines).
    """

    def __init__(
        self, plan, strategy, num_replicas, global_batch, npu_distribute=None, devices=()
    ):
        self.plan = plan
        self.strategy = strategy
        self.num_replicas = num_replicas
        self.global_batch = global_batch
        self.npu_distribute = npu_distribute
        self.devices = tuple(devices)
        self._output_dir = None

    @property
    def is_chief(self):
        return self.plan.is_chief

    @property
    def per_replica_batch(self):
        return self.global_batch // self.num_replicas

    def scope(self):
        """The strategy scope: build, load and compile models inside it."""
        if self.plan.kind in (MIRRORED, MULTI_WORKER):
            stack = contextlib.ExitStack()
            stack.enter_context(keras_patch.patched_trainer())
            stack.enter_context(self.strategy.scope())
            return stack
        return contextlib.nullcontext()

    def backup_root(self, write_dir):
        """The folder this process's BackupAndRestore backs up under.

        Its own write folder, except on Keras 2.6, where every worker restores
        from the chief's checkpoint and so is given the chief's folder.
        """
        if compat.WORKERS_SHARE_BACKUP and self._output_dir is not None:
            return self._output_dir
        return write_dir

    def write_dir(self, output_dir):
        """This process's output folder (see `write_dir`); remembered for `finish`."""
        self._output_dir = output_dir
        path = _write_dir(self.plan, output_dir)
        if path != output_dir:
            os.makedirs(path, exist_ok=True)
            logger.info(
                "distribute: %s:%d is not the chief; it writes to %s, removed "
                "when the run succeeds",
                self.plan.task_type,
                self.plan.task_index,
                path,
            )
        return path

    def shard(self, dataset, training=True, num_examples=None):
        """Prepares a batched dataset of global batches for this engine.

        One host: Keras splits every global batch over the local replicas.
        Multi-worker: every worker reads the same seeded pipeline and
        tf.distribute keeps each worker's slice of every global batch
        (`AutoShardPolicy.DATA`; FILE sharding has no files to split in an
        in-memory pipeline). NPU ranks: rank r keeps rows
        `[r * b, (r + 1) * b)` of every global training batch,
        `b = batch / RANK_SIZE`. Evaluation data stays whole on every NPU
        rank, so every rank reports the same figures.

        Args:
            dataset: batches of `--batch_size` (the global batch).
            training: whether `fit` reads it.
            num_examples: examples behind a training dataset. When its last
                batch holds fewer examples than there are replicas, some
                replica would get none and report a NaN mean: that batch is
                skipped, with a warning.

        Returns:
            The dataset to hand to Keras.
        """
        import tensorflow as tf

        distributed = self.plan.kind in (MIRRORED, MULTI_WORKER)
        if training and distributed and num_examples and self.num_replicas > 1:
            dataset = self._skip_tiny_last_batch(dataset, num_examples)
        if self.plan.kind == MULTI_WORKER:
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = (
                tf.data.experimental.AutoShardPolicy.DATA
            )
            return dataset.with_options(options)
        if self.plan.kind == NPU and training and self.num_replicas > 1:
            size = self.per_replica_batch
            start = self.plan.task_index * size

            def rank_slice(*element):
                rows = tf.nest.map_structure(lambda t: t[start : start + size], element)
                return rows if len(rows) > 1 else rows[0]

            return dataset.map(rank_slice)
        return dataset

    def _skip_tiny_last_batch(self, dataset, num_examples):
        import tensorflow as tf

        full, left = divmod(num_examples, self.global_batch)
        if not 0 < left < self.num_replicas or int(dataset.cardinality()) != full + 1:
            return dataset
        logger.warning(
            "distribute: the last batch of each epoch holds %d example(s), fewer "
            "than the %d replicas: skipped",
            left,
            self.num_replicas,
        )
        replicas = self.num_replicas
        dataset = dataset.filter(
            lambda *element: tf.shape(tf.nest.flatten(element)[0])[0] >= replicas
        )
        # Keep the epoch length known to Keras.
        return dataset.apply(tf.data.experimental.assert_cardinality(full))

    def prepare_fit(self, model):
        """NPU ranks: all-reduce (mean) the gradients before `model`'s optimizer applies them.

        npu_device's `npu_distributed_keras_optimizer_wrapper` patches Keras 2
        optimizer internals (`get_gradients`, `_compute_gradients`) that
        Keras 3 optimizers do not have; it is the same `all_reduce` of the
        gradients in `apply_gradients`, done here on the Keras 3 API.
        """
        if self.plan.kind != NPU or self.num_replicas < 2:
            return model
        optimizer = model.optimizer
        if getattr(optimizer, "_kd_npu_all_reduce", False):
            return model
        # Slots first, so the step traces once around the wrapper (Keras 2.6
        # would otherwise trace it again after creating them).
        compat.build_optimizer(optimizer, model.trainable_variables)
        apply_gradients = optimizer.apply_gradients
        all_reduce = self.npu_distribute.all_reduce

        def all_reduced_apply_gradients(grads_and_vars, *args, **kwargs):
            grads, variables = zip(*grads_and_vars)
            grads = all_reduce(list(grads), reduction="mean")
            return apply_gradients(zip(grads, variables), *args, **kwargs)

        optimizer.apply_gradients = all_reduced_apply_gradients
        optimizer._kd_npu_all_reduce = True
        return model

    def callbacks(self, model, target):
        """Callbacks for one `fit` of `model` that trains `target`.

        Put them after `BackupAndRestore` so they see the restored state.
        """
        if self.plan.kind == SINGLE:
            return []
        callbacks = []
        if self.plan.kind == NPU and self.num_replicas > 1:
            callbacks.append(NpuBroadcastVariables(self.npu_distribute))
        if self.plan.kind == MULTI_WORKER:
            callbacks.append(AgreeOnRestoredEpoch(self.strategy))
        callbacks.append(WeightsDigest(target, self._label()))
        return callbacks

    def describe(self):
        """The distribution facts, for `summary.json`."""
        return {
            "engine": self.plan.kind,
            "num_replicas": self.num_replicas,
            "num_workers": self.plan.num_workers,
            "global_batch": self.global_batch,
            "per_replica_batch": self.per_replica_batch,
            "devices": list(self.devices),
        }

    def finish(self):
        """After a successful run: a non-chief worker removes its folder."""
        if self._output_dir is None:
            return
        path = _write_dir(self.plan, self._output_dir)
        if path != self._output_dir and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)

    def _label(self):
        if self.plan.kind == NPU:
            return f"rank {self.plan.task_index}"
        return f"{self.plan.task_type}:{self.plan.task_index}"


def setup(config, batch_size, full_batches=False, environ=None):
    """Creates the engine the flags and environment ask for. Call once, first.

    Logical CPU devices and MultiWorkerMirroredStrategy must be set up before
    TensorFlow runs anything in the process, so call this before building
    data sets or models.

    Args:
        config: a `DistributeConfig`.
        batch_size: the global batch (`--batch_size`).
        full_batches: every batch is full (`--static`). NPU ranks need it.
        environ: the environment. Defaults to `os.environ`.

    Returns:
        A `DistributedContext`.

    Raises:
        ValueError: contradictory flags, a cluster this host cannot join, or a
            batch that does not divide across the replicas.
    """
    import tensorflow as tf

    environ = os.environ if environ is None else environ
    plan = plan_cluster(config, environ)
    npu_distribute = None
    devices = ()
    if plan.kind == SINGLE:
        return DistributedContext(plan, tf.distribute.get_strategy(), 1, batch_size)
    if plan.kind in (MIRRORED, MULTI_WORKER):
        keras_patch.check_supported()
    if plan.kind == MIRRORED:
        strategy, devices = _mirrored_strategy(config)
        replicas = strategy.num_replicas_in_sync
    elif plan.kind == MULTI_WORKER:
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(plan.cluster),
            task_type=plan.task_type,
            task_id=plan.task_index,
            rpc_layer="grpc",
        )
        logger.info(
            "distribute: %s:%d joining cluster %s (waits for every worker)",
            plan.task_type,
            plan.task_index,
            json.dumps(plan.cluster),
        )
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        devices = strategy.extended.worker_devices
        replicas = strategy.num_replicas_in_sync
    else:
        npu_distribute = importlib.import_module("npu_device.distribute")
        strategy = tf.distribute.get_strategy()
        replicas = plan.num_workers
        if replicas > 1 and not full_batches:
            raise ValueError(
                "--distributed on Ascend NPU ranks needs --static: every rank "
                "takes an equal slice of every global batch, so no batch may "
                "be partial"
            )
    if batch_size % replicas:
        raise ValueError(
            f"--batch_size {batch_size} is the global batch and must divide by "
            f"the {replicas} replicas; use a multiple of {replicas}"
        )
    context = DistributedContext(
        plan, strategy, replicas, batch_size, npu_distribute=npu_distribute, devices=devices
    )
    _log_context(context)
    return context


def _mirrored_strategy(config):
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus and config.num_cpu_devices is not None:
        raise ValueError(
            f"--num_cpu_devices is for CPU-only hosts; this host has {len(gpus)} "
            "GPU(s), which --distributed uses (hide them with "
            "CUDA_VISIBLE_DEVICES= to test on CPU devices)"
        )
    if gpus:
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    else:
        devices = configure_cpu_devices(config.num_cpu_devices or 1)
    return tf.distribute.MirroredStrategy(devices), devices


def _log_context(context):
    plan = context.plan
    if plan.kind == MIRRORED:
        engine = f"MirroredStrategy over {', '.join(context.devices)}"
    elif plan.kind == MULTI_WORKER:
        engine = (
            f"MultiWorkerMirroredStrategy, {plan.num_workers} workers, this is "
            f"{plan.task_type}:{plan.task_index}"
            f"{' (chief)' if plan.is_chief else ''}, local devices "
            f"{', '.join(context.devices)}"
        )
    else:
        engine = (
            f"npu_device ranks, RANK_ID {plan.task_index} of RANK_SIZE "
            f"{plan.num_workers}"
        )
    logger.info(
        "distribute: %s; global batch %d = %d replicas x %d",
        engine,
        context.global_batch,
        context.num_replicas,
        context.per_replica_batch,
    )
    if context.num_replicas == 1:
        logger.warning(
            "--distributed with a single device: running one replica. More "
            "replicas need more GPUs, more hosts or NPU ranks, or "
            "--num_cpu_devices N on a CPU-only host"
        )

