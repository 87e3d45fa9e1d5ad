"""Recording stand-in for Huawei's `npu_device` (Ascend TF Adapter 2.x), for the tests.

It implements the surface ModelZoo's `npu_config()` touches:
`global_options()` (with `dump_config` and `profiling_config`) and
`open().as_default()`. Every option assignment and call is appended to
`calls`, in order, so tests can assert the exact configuration.

It is as strict as the real package (`npu_device/configs/option_base.py`:
`NpuBaseConfig.__setattr__` and `OptionValue.value`): assigning an option
name the package does not have, or a value outside an option's allowed
list, raises `ValueError`. Options whose value is free (paths, JSON
strings, step lists) take anything.
"""

calls = []

FREE = None  # any value, as OptionValue(default, None)
PRECISION_MODES = [
    "force_fp32", "allow_fp32_to_fp16", "force_fp16", "must_keep_origin_dtype",
    "allow_mix_precision", "cube_fp16in_fp32out", "allow_mix_precision_fp16",
    "allow_mix_precision_bf16", "allow_fp32_to_bf16",
]
BOOL = [True, False]
_OPTIONS = {
    "": {
        "precision_mode": PRECISION_MODES,
        "modify_mixlist": FREE,
        "fusion_switch_file": FREE,
        "graph_run_mode": [0, 1],
        "op_compiler_cache_mode": FREE,
        "deterministic": [0, 1],
        "jit_compile": BOOL,
        "hcom_parallel": BOOL,
    },
    "dump_config.": {
        "enable_dump": BOOL,
        "dump_path": FREE,
        "dump_step": FREE,
        "dump_mode": ["input", "output", "all"],
        "enable_dump_debug": BOOL,
        "dump_debug_mode": FREE,
    },
    "profiling_config.": {"enable_profiling": BOOL, "profiling_options": FREE},
}


class _Options:
    def __init__(self, prefix):
        object.__setattr__(self, "_prefix", prefix)

    def __setattr__(self, name, value):
        options = _OPTIONS[self._prefix]
        if name not in options:
            raise ValueError(f"{type(self).__name__} has no option {self._prefix}{name}")
        allowed = options[name]
        # The real OptionValue compares with `in`: True == 1, so booleans and
        # 0/1 options accept each other, as there.
        if allowed is not FREE and value not in allowed:
            raise ValueError(f"'{value}' not in optional list {allowed}")
        calls.append(("set", self._prefix + name, value))
        object.__setattr__(self, name, value)


class _GlobalOptions(_Options):
    def __init__(self):
        super().__init__("")
        object.__setattr__(self, "dump_config", _Options("dump_config."))
        object.__setattr__(self, "profiling_config", _Options("profiling_config."))


_global_options = _GlobalOptions()


def global_options():
    return _global_options


class _Device:
    def as_default(self):
        calls.append(("as_default",))
        return self


def open(ctx=None, device_id=None):  # noqa: A001 - the real package's name
    calls.append(("open",))
    return _Device()
