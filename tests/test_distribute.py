"""Distributed training in process: flags, cluster plans, the context, the
npu_device contract and the scoped Keras patch. Runs in subprocesses (logical
devices, workers) are in test_distribute_runs.py.
"""

import json
import logging
import os
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from knowledge_distillation import cli, distribute
from knowledge_distillation import compat
from knowledge_distillation import flags as kd_flags
from knowledge_distillation.compat import keras
from knowledge_distillation.config import DistributeConfig
from knowledge_distillation.distribute.callbacks import NpuBroadcastVariables

from conftest import keras2_gap, keras3_only

NPU_STUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "npu_stub")


# -- flags and cluster plans (no TensorFlow runtime) ----------------------------


def _parse(argv):
    fv = flags.FlagValues()
    kd_flags.define_trainer_flags(fv)
    fv(["prog", *argv])
    return kd_flags.train_config(fv)


def test_flags_become_one_distribute_config():
    config = _parse(["--distributed", "--worker_hosts=127.0.0.1:2222,127.0.0.1:2223",
                     "--task_index=1", "--dist_url=tcp://127.0.0.1:2222"])
    assert config.distribute == DistributeConfig(
        distributed=True, worker_hosts=("127.0.0.1:2222", "127.0.0.1:2223"),
        task_index=1, dist_url="tcp://127.0.0.1:2222")
    assert _parse([]).distribute == DistributeConfig()


@pytest.mark.parametrize("flag", ["--num_cpu_devices=2", "--dist_url=tcp://127.0.0.1:1",
                                  "--worker_hosts=127.0.0.1:1", "--task_index=0"])
def test_distribute_flags_need_distributed(flag):
    with pytest.raises(ValueError, match="needs --distributed"):
        _parse([flag])


@pytest.mark.parametrize("kwargs, problem", [
    ({"worker_hosts": ["127.0.0.1:1", "127.0.0.1:2"]}, "go together"),
    ({"task_index": 0}, "go together"),
    ({"worker_hosts": ["127.0.0.1:1"], "task_index": 1}, r"must be in 0\.\.0"),
    ({"worker_hosts": ["127.0.0.1"], "task_index": 0}, "expected HOST:PORT, got '127.0.0.1'"),
    ({"worker_hosts": ["127.0.0.1:99999"], "task_index": 0}, "HOST:PORT"),
    ({"dist_url": "http://127.0.0.1:1"}, "tcp://HOST:PORT"),
    ({"num_cpu_devices": 0}, "must be positive"),
])
def test_bad_distribute_flags_are_one_clear_error(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        DistributeConfig(distributed=True, **kwargs)


def test_cli_distribute_flag_error_exits_2_before_training(capsys):
    assert cli.main(["prog", "--num_cpu_devices=2"]) == 2
    assert "--num_cpu_devices needs --distributed" in capsys.readouterr().err


def _tf_config(cluster, task_type, index):
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def test_plans_follow_flags_and_environment(caplog):
    on = DistributeConfig(distributed=True)
    assert distribute.plan_cluster(DistributeConfig(), {}, npu=False).kind == "single"
    assert distribute.plan_cluster(on, {}, npu=False).kind == "mirrored"
    hosts = DistributeConfig(distributed=True, worker_hosts=["127.0.0.1:1", "127.0.0.1:2"],
                             task_index=1, dist_url="tcp://127.0.0.1:1")
    plan = distribute.plan_cluster(hosts, {}, npu=False)
    assert (plan.kind, plan.task_index, plan.num_workers, plan.is_chief) == (
        "multi_worker", 1, 2, False)
    assert plan.cluster == {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    # A TF_CONFIG chief job makes worker 0 an ordinary worker.
    cluster = {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]}
    chief = distribute.plan_cluster(on, {"TF_CONFIG": _tf_config(cluster, "chief", 0)}, npu=False)
    worker = distribute.plan_cluster(on, {"TF_CONFIG": _tf_config(cluster, "worker", 0)}, npu=False)
    assert (chief.is_chief, worker.is_chief, worker.num_workers) == (True, False, 2)
    with caplog.at_level(logging.WARNING):
        assert distribute.plan_cluster(
            DistributeConfig(), {"TF_CONFIG": _tf_config(cluster, "chief", 0)}, npu=False
        ).kind == "single"
    assert "TF_CONFIG is set but --distributed is not" in caplog.text


@pytest.mark.parametrize("config, environ, problem", [
    (DistributeConfig(distributed=True, worker_hosts=["127.0.0.1:1"], task_index=0),
     {"TF_CONFIG": _tf_config({"worker": ["127.0.0.1:1"]}, "worker", 0)}, "both describe"),
    (DistributeConfig(distributed=True, worker_hosts=["127.0.0.1:1", "127.0.0.1:2"], task_index=0,
                      dist_url="tcp://127.0.0.1:2"), {}, "cluster's chief is 127.0.0.1:1"),
    (DistributeConfig(distributed=True, dist_url="tcp://127.0.0.1:9"),
     {"TF_CONFIG": _tf_config({"worker": ["127.0.0.1:1"]}, "worker", 0)}, "names the chief"),
    (DistributeConfig(distributed=True, num_cpu_devices=2, worker_hosts=["127.0.0.1:1"],
                      task_index=0), {}, "drop --num_cpu_devices"),
    (DistributeConfig(distributed=True),
     {"TF_CONFIG": _tf_config({"ps": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]}, "worker", 0)},
     "only 'chief' and 'worker'"),
    (DistributeConfig(distributed=True),
     {"TF_CONFIG": _tf_config({"worker": ["127.0.0.1:1"]}, "worker", 3)}, "not in its cluster"),
    (DistributeConfig(distributed=True), {"TF_CONFIG": "{not json"}, "is not of the form"),
])
def test_contradictory_cluster_descriptions_are_errors(config, environ, problem):
    with pytest.raises(ValueError, match=problem):
        distribute.plan_cluster(config, environ, npu=False)


def test_only_the_chief_writes_to_the_output_dir(tmp_path):
    hosts = ["127.0.0.1:1", "127.0.0.1:2"]
    for index, expected in ((0, tmp_path), (1, tmp_path / "workertemp_1")):
        config = DistributeConfig(distributed=True, worker_hosts=hosts, task_index=index)
        assert distribute.write_dir(config, str(tmp_path), {}, npu=False) == str(expected)
    assert distribute.write_dir(DistributeConfig(), str(tmp_path), {}, npu=False) == str(tmp_path)


def test_without_distributed_the_context_changes_nothing():
    context = distribute.setup(DistributeConfig(), batch_size=8, environ={})
    ds = tf.data.Dataset.range(4).batch(2)
    assert context.shard(ds, num_examples=4) is ds
    assert context.callbacks(None, None) == []
    assert context.strategy is tf.distribute.get_strategy()
    assert context.describe()["num_replicas"] == 1


def test_a_last_batch_smaller_than_the_replica_count_is_skipped_with_a_warning(caplog):
    # The hook alone, on a two-replica plan: no logical devices needed.
    context = distribute.DistributedContext(
        distribute.ClusterPlan("mirrored"), tf.distribute.get_strategy(), 2, 32)
    with caplog.at_level(logging.WARNING):
        kept = context.shard(tf.data.Dataset.range(33).batch(32), num_examples=33)
    assert [len(b) for b in kept] == [32] and int(kept.cardinality()) == 1
    assert "holds 1 example(s), fewer than the 2 replicas: skipped" in caplog.text
    two_left = context.shard(tf.data.Dataset.range(34).batch(32), num_examples=34)
    assert [len(b) for b in two_left] == [32, 2]


# -- npu_device contract (in process, the recording stand-in) ------------------


@pytest.fixture
def npu(monkeypatch):
    """The recording npu_device stand-in with its distribute module, as rank 1 of 2."""
    monkeypatch.syspath_prepend(NPU_STUB)
    for name in ("npu_device", "npu_device.distribute"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv("RANK_SIZE", "2")
    monkeypatch.setenv("RANK_ID", "1")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    import npu_device

    yield npu_device
    for name in ("npu_device", "npu_device.distribute"):
        sys.modules.pop(name, None)

def test_npu_ranks_slice_batches_broadcast_rank0_and_all_reduce_gradients(npu, tmp_path):
    context = distribute.setup(DistributeConfig(distributed=True), batch_size=8, full_batches=True)
    assert (context.plan.kind, context.num_replicas, context.per_replica_batch) == ("npu", 2, 4)
    assert not context.is_chief
    assert context.write_dir(str(tmp_path)) == str(tmp_path / "workertemp_1")
    # Rank 1 takes the second half of every global batch; evaluation stays whole.
    ds = tf.data.Dataset.range(16).batch(8)
    assert [b.numpy().tolist() for b in context.shard(ds)] == [[4, 5, 6, 7], [12, 13, 14, 15]]
    assert context.shard(ds, training=False) is ds

    compat.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")], name="ranked")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    context.prepare_fit(model)
    context.prepare_fit(model)  # a second fit does not wrap twice
    before = model.get_weights()
    x = np.ones((8, 3), np.float32)
    train = context.shard(tf.data.Dataset.from_tensor_slices((x, np.zeros((8, 2), np.float32))).batch(8))
    model.fit(train, epochs=1, verbose=0, callbacks=context.callbacks(model, model))
    names = [call[0] for call in npu.calls]
    assert names == ["broadcast", "all_reduce"]  # all_reduce once: traced into the step
    weights = ("ranked/dense/kernel", "ranked/dense/bias") if compat.KERAS3 else (
        "dense/kernel", "dense/bias")  # Keras 2.6 names variables without the model
    assert npu.calls[0][1:] == (weights, 0, "hccl_world_group")
    assert npu.calls[1][1:] == (2, "mean", "hccl_world_group")
    assert not np.allclose(model.get_weights()[0], before[0])  # the reduced gradients applied
    assert context.describe()["engine"] == "npu"
    npu.calls.clear()


def test_npu_single_rank_is_a_logged_one_replica_run(npu, monkeypatch, caplog):
    monkeypatch.setenv("RANK_SIZE", "1")
    monkeypatch.setenv("RANK_ID", "0")
    with caplog.at_level(logging.WARNING):
        context = distribute.setup(DistributeConfig(distributed=True), batch_size=8)
    assert "single device" in caplog.text
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    optimizer_apply = model.optimizer.apply_gradients
    context.prepare_fit(model)
    assert model.optimizer.apply_gradients == optimizer_apply
    assert not any(isinstance(c, NpuBroadcastVariables)
                   for c in context.callbacks(model, model))
    assert context.is_chief


@pytest.mark.parametrize("env, kwargs, problem", [
    ({"RANK_ID": None}, {}, "needs RANK_SIZE and RANK_ID"),
    ({"RANK_ID": "2"}, {}, "expected 0 <= RANK_ID < RANK_SIZE"),
    ({}, {"full_batches": False}, "needs --static"),
    ({}, {"config": DistributeConfig(distributed=True, num_cpu_devices=2)}, "rank table"),
    ({}, {"batch_size": 7}, "must divide by the 2 replicas"),
])
def test_npu_rank_misconfiguration_is_an_error(npu, monkeypatch, env, kwargs, problem):
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    args = {"config": DistributeConfig(distributed=True), "batch_size": 8, "full_batches": True,
            **kwargs}
    with pytest.raises(ValueError, match=problem):
        distribute.setup(args.pop("config"), **args)


# -- the scoped Keras patch ----------------------------------------------------


@keras3_only
def test_keras_patch_lives_only_inside_its_block():
    from keras.src.backend.tensorflow import trainer as tf_trainer

    from knowledge_distillation.distribute import keras_patch

    original = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    with keras_patch.patched_trainer():
        with keras_patch.patched_trainer():  # re-entrant
            assert tf_trainer.TensorFlowTrainer._maybe_symbolic_build is not original
        assert keras_patch.is_patched()
    assert tf_trainer.TensorFlowTrainer._maybe_symbolic_build is original
    assert not keras_patch.is_patched()


@keras3_only
def test_keras_patch_refuses_a_keras_outside_its_range(monkeypatch):
    from knowledge_distillation.distribute import keras_patch

    monkeypatch.setattr(keras, "__version__", "3.99.0")
    with pytest.raises(RuntimeError, match="Keras 3.99.0: outside the supported version range"):
        with keras_patch.patched_trainer():
            pass


@keras3_only
def test_keras_patch_refuses_an_iterator_without_its_data_adapter():
    from knowledge_distillation.distribute import keras_patch

    with pytest.raises(RuntimeError, match="no data_adapter.get_tf_dataset"):
        keras_patch._element_spec(object())
