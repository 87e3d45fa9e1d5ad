"""Distributed training: tf.distribute on GPU/CPU hosts, npu_device on Ascend ranks.

`setup(config, ...)` (context.py) reads the `--distributed` flags and the environment,
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

Modules: `plan` decides the engine from flags and environment (starts
nothing), `context` creates it and holds the per-engine hooks, `callbacks`
are the hooks that run inside `fit`, and `keras_patch` is the one scoped
change to Keras' TensorFlow trainer that tf.distribute needs.
"""

from knowledge_distillation.distribute.context import DistributedContext, setup
from knowledge_distillation.distribute.plan import (
    MIRRORED,
    MULTI_WORKER,
    NPU,
    SINGLE,
    ClusterPlan,
    configure_cpu_devices,
    npu_available,
    plan_cluster,
    write_dir,
)

__all__ = [
    "MIRRORED", "MULTI_WORKER", "NPU", "SINGLE", "ClusterPlan", "DistributedContext",
    "configure_cpu_devices", "npu_available", "plan_cluster", "setup", "write_dir",
]
