"""Which engine runs this process, decided from the flags and the environment.

Nothing here starts TensorFlow, except `configure_cpu_devices`, which must
run before anything else does.
"""

import dataclasses
import importlib.util
import json
import logging
import os
from typing import Optional

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

