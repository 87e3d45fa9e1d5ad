"""Distributed training: tf.distribute on GPU/CPU hosts, npu_device on Ascend ranks.

`setup(config, ...)` reads the `--distributed` flags and the environment,
creates the engine and returns a `DistributedContext`, which the trainer and
the quantizer use the same way on one device or many:

```python
context = setup(config.distribute, batch_size=32, full_batches=False)
with context.scope():
    model = build_model(...)              # variables mirrored on every replica
    model.compile(...)
    context.prepare_fit(model)            # NPU ranks: gradient all-reduce
    model.fit(context.shard(train_ds), callbacks=[*context.callbacks(model, model)])
context.finish()
```

The engines, by what the flags and environment say:

- `--distributed` on one host: `tf.distribute.MirroredStrategy` over every
  local GPU, or over `--num_cpu_devices` logical CPU devices on a CPU-only
  host (they share the same cores: this runs and tests the distributed path,
  it does not speed training up).
- `--distributed` with `TF_CONFIG`, or with `--worker_hosts` and
  `--task_index`: `tf.distribute.MultiWorkerMirroredStrategy`, one process
  per host. AMCT's `--dist_url tcp://HOST:PORT` names the chief and is
  checked against the cluster.
- `--distributed` where `npu_device` is installed: the TF2 multi-card pattern
  of Ascend ModelZoo, one process per NPU rank (`RANK_SIZE` / `RANK_ID` from
  the launch script). npu_device's distribute API broadcasts rank 0's
  initial variables and all-reduces the gradients.

Conventions:

- `--batch_size` is the global batch, split evenly across replicas, so the
  same flags follow the same optimisation path (steps per epoch, learning-
  rate schedule, loss) on one device or many. It must divide by the number
  of replicas.
- `--distributed` with a single device is a logged one-replica run, not an
  error: scripts that always pass it keep working on small machines.
- Only the chief (worker 0, NPU rank 0) writes to the output folder. Other
  workers write to `OUTPUT_DIR/workertemp_<task>` (TensorFlow's name for
  it), which they keep until the run ends so that a restarted run resumes
  there too, and remove when it succeeds.
"""

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from typing import Optional

import keras

logger = logging.getLogger(__name__)

SINGLE = "single"
MIRRORED = "mirrored"
MULTI_WORKER = "multi_worker"
NPU = "npu"

_TF_CONFIG_JOBS = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class ClusterPlan:
    """Which engine runs this process, and its place in the cluster.

    Attributes:
        kind: `"single"` (not distributed), `"mirrored"` (one host),
            `"multi_worker"` (several hosts) or `"npu"` (Ascend ranks).
        task_type: `"chief"` or `"worker"` (TF_CONFIG job names).
        task_index: this worker's index in its job, or the NPU rank.
        num_workers: processes in the cluster (hosts, or NPU ranks).
        cluster: the cluster spec (`{"worker": ["host:port", ...]}`) of a
            multi-worker run; None otherwise.
    """

    kind: str
    task_type: str = "worker"
    task_index: int = 0
    num_workers: int = 1
    cluster: Optional[dict] = None

    @property
    def is_chief(self):
        """True for the one process that writes outputs."""
        if self.task_type == "chief":
            return True
        if self.cluster is not None and self.cluster.get("chief"):
            return False
        return self.task_index == 0


def npu_available():
    """True when `npu_device` can be imported (Ascend hosts)."""
    return importlib.util.find_spec("npu_device") is not None


def plan_cluster(config, environ=None, npu=None):
    """Decides the engine from the flags and the environment; starts nothing.

    Args:
        config: a `DistributeConfig`.
        environ: the environment (TF_CONFIG, RANK_SIZE, RANK_ID). Defaults to
            `os.environ`.
        npu: whether `npu_device` is installed. Defaults to asking Python.

    Returns:
        A `ClusterPlan`.

    Raises:
        ValueError: flags and environment that contradict each other.
    """
    environ = os.environ if environ is None else environ
    npu = npu_available() if npu is None else npu
    if not config.distributed:
        if environ.get("TF_CONFIG"):
            logger.warning(
                "TF_CONFIG is set but --distributed is not: training on this "
                "host alone"
            )
        if npu and _int_env(environ, "RANK_SIZE", 1) > 1:
            logger.warning(
                "RANK_SIZE=%s but --distributed is not: training on this NPU alone",
                environ.get("RANK_SIZE"),
            )
        return ClusterPlan(SINGLE)
    if npu:
        return _plan_npu(config, environ)
    tf_config = environ.get("TF_CONFIG")
    if config.worker_hosts and tf_config:
        raise ValueError(
            "--worker_hosts and the TF_CONFIG environment variable both "
            "describe the cluster; give one (unset TF_CONFIG, or drop "
            "--worker_hosts and --task_index)"
        )
    if config.worker_hosts:
        plan = ClusterPlan(
            MULTI_WORKER,
            task_index=config.task_index,
            num_workers=len(config.worker_hosts),
            cluster={"worker": list(config.worker_hosts)},
        )
    elif tf_config:
        plan = _plan_from_tf_config(tf_config)
    else:
        if config.dist_url:
            logger.info(
                "--dist_url %s: not needed on one host (MirroredStrategy runs "
                "all local devices in this process)",
                config.dist_url,
            )
        return ClusterPlan(MIRRORED)
    if config.num_cpu_devices is not None:
        raise ValueError(
            "--num_cpu_devices splits one CPU-only host into logical devices; "
            "a multi-worker run uses one replica per CPU host (or every GPU "
            "of the host): drop --num_cpu_devices"
        )
    if config.dist_url:
        chief = _chief_address(plan.cluster)
        if config.dist_url.split("://", 1)[1] != chief:
            raise ValueError(
                f"--dist_url {config.dist_url} names the chief, but the "
                f"cluster's chief is {chief}; make them the same address"
            )
    return plan


def _int_env(environ, name, default):
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"{name}={value!r} is not an integer") from e


def _plan_npu(config, environ):
    if config.worker_hosts or config.num_cpu_devices is not None or environ.get(
        "TF_CONFIG"
    ):
        raise ValueError(
            "on Ascend the launch script's RANK_SIZE, RANK_ID and rank table "
            "describe the cluster: drop --worker_hosts, --task_index, "
            "--num_cpu_devices and TF_CONFIG"
        )
    if "RANK_SIZE" not in environ or "RANK_ID" not in environ:
        raise ValueError(
            "--distributed on Ascend needs RANK_SIZE and RANK_ID in the "
            "environment (set by the multi-card launch script with "
            "RANK_TABLE_FILE), got "
            f"RANK_SIZE={environ.get('RANK_SIZE')!r} RANK_ID={environ.get('RANK_ID')!r}"
        )
    size = _int_env(environ, "RANK_SIZE", 1)
    rank = _int_env(environ, "RANK_ID", 0)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(
            f"RANK_ID={rank} RANK_SIZE={size}: expected 0 <= RANK_ID < RANK_SIZE"
        )
    if config.dist_url:
        logger.info(
            "--dist_url %s: on Ascend the rank table names the hosts; not used",
            config.dist_url,
        )
    return ClusterPlan(NPU, task_index=rank, num_workers=size)


def _plan_from_tf_config(text):
    try:
        tf_config = json.loads(text)
        cluster = {job: list(tasks) for job, tasks in tf_config["cluster"].items()}
        task = tf_config["task"]
        task_type, task_index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"TF_CONFIG {text!r} is not of the form "
            '{"cluster": {"worker": ["host:port", ...]}, '
            '"task": {"type": "worker", "index": 0}}'
        ) from e
    unknown = sorted(set(cluster) - set(_TF_CONFIG_JOBS))
    if unknown or task_type not in _TF_CONFIG_JOBS:
        raise ValueError(
            f"TF_CONFIG has jobs {sorted(cluster)} and task type {task_type!r}; "
            "MultiWorkerMirroredStrategy takes only 'chief' and 'worker'"
        )
    if not 0 <= task_index < len(cluster.get(task_type, [])):
        raise ValueError(
            f"TF_CONFIG task {task_type}:{task_index} is not in its cluster {cluster}"
        )
    if len(cluster.get("chief", [])) > 1:
        raise ValueError(f"TF_CONFIG has {len(cluster['chief'])} chiefs; expected one")
    return ClusterPlan(
        MULTI_WORKER,
        task_type=task_type,
        task_index=task_index,
        num_workers=sum(len(tasks) for tasks in cluster.values()),
        cluster=cluster,
    )


def _chief_address(cluster):
    return (cluster.get("chief") or cluster["worker"])[0]


def write_dir(config, output_dir, environ=None, npu=None):
    """Where this process writes: `output_dir` on the chief, else a worker folder.

    Pure (it starts nothing), so the CLI can point its log file here before
    TensorFlow starts.

    Args:
        config: a `DistributeConfig`.
        output_dir: the run's output folder.
        environ: the environment. Defaults to `os.environ`.
        npu: whether `npu_device` is installed. Defaults to asking Python.

    Returns:
        A folder path.
    """
    return _write_dir(plan_cluster(config, environ, npu), output_dir)


def _write_dir(plan, output_dir):
    if plan.is_chief:
        return output_dir
    return os.path.join(output_dir, f"workertemp_{plan.task_index}")


def configure_cpu_devices(count):
    """Splits the CPU into `count` logical devices. Call before TensorFlow starts.

    Args:
        count: number of logical CPU devices, >= 1.

    Returns:
        The logical CPU device names.

    Raises:
        ValueError: TensorFlow already started with another device count.
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError as e:
        have = tf.config.list_logical_devices("CPU")
        if len(have) == count:
            return [d.name for d in have]
        raise ValueError(
            f"--num_cpu_devices {count}: TensorFlow already started with "
            f"{len(have)} CPU device(s) in this process; logical devices must "
            "be set before anything runs on TensorFlow (start a new process)"
        ) from e
    return [d.name for d in tf.config.list_logical_devices("CPU")]


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
            return self.strategy.scope()
        return contextlib.nullcontext()

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


class NpuBroadcastVariables(keras.callbacks.Callback):
    """Copies rank 0's weights to every NPU rank when training begins.

    Runs after `BackupAndRestore` has restored a resumed run, so every rank
    starts from rank 0's state.

    Args:
        npu_distribute: the `npu_device.distribute` module.
    """

    def __init__(self, npu_distribute):
        super().__init__()
        self.npu_distribute = npu_distribute

    def on_train_begin(self, logs=None):
        self.npu_distribute.broadcast(list(self.model.weights), root_rank=0)


class AgreeOnRestoredEpoch(keras.callbacks.Callback):
    """Checks that every worker resumes from the same epoch.

    Each worker restores its own backup; a worker killed while the others
    were saving an epoch's backup would start one epoch behind them and the
    cluster would hang on mismatched collectives. This turns that into an
    error naming the epochs.

    Args:
        strategy: the `MultiWorkerMirroredStrategy`.
    """

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy

    def on_train_begin(self, logs=None):
        import tensorflow as tf

        # Keras' BackupAndRestore hands the restored epoch to fit this way.
        epoch = int(getattr(self.model, "_initial_epoch", None) or 0)
        values = self.strategy.experimental_distribute_values_from_function(
            lambda _: tf.constant([epoch], tf.int64)
        )
        epochs = sorted(set(self.strategy.gather(values, axis=0).numpy().tolist()))
        if len(epochs) > 1:
            raise RuntimeError(
                f"workers restored different epochs {epochs} from their backups "
                "(a worker died while the others saved); delete the phase's "
                "backup folders (OUTPUT_DIR/backup/<phase> and "
                "OUTPUT_DIR/workertemp_*/backup/<phase>) to restart that phase"
            )
        if epoch:
            logger.info("distribute: every worker resumes at epoch %d", epoch + 1)


class WeightsDigest(keras.callbacks.Callback):
    """Logs a SHA-256 of `target`'s weights when training ends.

    Replicas apply the same all-reduced gradients, so every worker or rank
    logs the same digest; a different one means they drifted apart.

    Args:
        target: the model whose weights are digested.
        label: this process in the log (e.g. `worker:1`).
    """

    def __init__(self, target, label):
        super().__init__()
        self.target = target
        self.label = label
        self.digest = None

    def on_train_end(self, logs=None):
        self.digest = weights_digest(self.target)
        logger.info(
            "distribute: %s final weights of %s: sha256 %s",
            self.label,
            self.target.name,
            self.digest,
        )


def weights_digest(model):
    """SHA-256 over a model's weights, in order, as float32 bytes."""
    sha = hashlib.sha256()
    for weight in model.get_weights():
        sha.update(weight.astype("float32", copy=False).tobytes())
    return sha.hexdigest()


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
        _patch_keras_trainer()
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


_keras_patched = False


def _patch_keras_trainer():
    """Fixes how Keras 3's TensorFlow trainer starts `fit` under tf.distribute.

    Before `fit`, `evaluate` and `predict`, Keras 3.15 builds a model created
    in a strategy scope from a real input batch, which it pulls from the
    input pipeline and reduces across replicas:

    1. pulling it advances seeded or generator pipelines by a batch (and
       more, through prefetching), so a distributed run does not see the
       batches a single-device run sees;
    2. `MultiWorkerMirroredStrategy` cannot reduce a nested batch with
       integer labels at all (keras-team/keras#20585);
    3. under `MultiWorkerMirroredStrategy` the per-step logs are reduced
       with `axis=0`, which fails on scalar losses and metrics.

    Only shapes and dtypes matter to that build, so the patch builds from
    the pipeline's element spec and pulls nothing (1, 2), and averages
    scalar logs over all replicas, as `MirroredStrategy` already does (3).
    Runs without a strategy are left to Keras.
    """
    global _keras_patched
    if _keras_patched:
        return
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    needed = ("_collective_all_reduce_multi_worker", "reduce_per_replica", "TensorFlowTrainer")
    if not all(hasattr(tf_trainer, name) for name in needed) or not hasattr(
        tf_trainer.TensorFlowTrainer, "_maybe_symbolic_build"
    ):
        raise RuntimeError(
            f"Keras {keras.__version__} changed the TensorFlow trainer internals "
            "this project patches for tf.distribute (keras-team/keras#20585); "
            "check whether Keras fixed them and update "
            "knowledge_distillation/distribute.py"
        )
    is_multi_worker = tf_trainer._collective_all_reduce_multi_worker
    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = tf_trainer.reduce_per_replica

    def local_value(strategy, value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None:
            return original_build(self, iterator=iterator, data_batch=data_batch)
        if iterator is not None:
            # TensorSpecs have the .shape and .dtype the build reads.
            data_batch = iterator.data_adapter.get_tf_dataset().element_spec
        else:
            data_batch = keras.tree.map_structure(
                lambda v: local_value(strategy, v), data_batch
            )
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and is_multi_worker(strategy):
            return keras.tree.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None)
                if isinstance(v, tf.distribute.DistributedValues)
                else v,
                values,
            )
        return original_reduce(values, strategy, reduction)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    _keras_patched = True
    logger.info(
        "distribute: Keras %s trainer patched for tf.distribute (builds from the "
        "input spec; keras-team/keras#20585)",
        keras.__version__,
    )
