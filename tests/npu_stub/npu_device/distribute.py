"""Recording stand-in for `npu_device.distribute`, used by tests/test_distribute.py.

The real module runs HCCL collectives across NPU ranks. This one is a
cluster of one: `all_reduce` and `broadcast` return or keep the values as
they are (the mean, or rank 0's copy, of identical values), and append what
they were given to the package's shared `calls` list, in order, with the
real signatures and defaults (npu_device/distribute/hccl.py).
"""

import npu_device

calls = npu_device.calls


def all_reduce(values, reduction="mean", fusion=1, fusion_id=-1, group="hccl_world_group"):
    calls.append(("all_reduce", len(values) if isinstance(values, (list, tuple)) else 1,
                  reduction, group))
    return values


def broadcast(values, root_rank=0, fusion=2, fusion_id=0, group="hccl_world_group"):
    values = values if isinstance(values, (list, tuple)) else [values]
    names = tuple(getattr(v, "path", None) or v.name.split(":")[0] for v in values)
    calls.append(("broadcast", names, root_rank, group))
