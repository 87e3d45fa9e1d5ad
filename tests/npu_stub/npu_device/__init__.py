"""Recording stand-in for Huawei's `npu_device`, used by tests/test_device.py.

It implements only the surface ModelZoo's `npu_config()` touches:
`global_options()` (with `dump_config` and `profiling_config`) and
`open().as_default()`. Every attribute assignment and call is appended to
`calls`, in order, so tests can assert the exact configuration. Assigning an
option name the real package does not have raises AttributeError, as a typo
would go unnoticed otherwise.
"""

calls = []

_OPTIONS = {
    "": {"precision_mode", "modify_mixlist", "fusion_switch_file"},
    "dump_config.": {
        "enable_dump",
        "dump_path",
        "dump_step",
        "dump_mode",
        "enable_dump_debug",
        "dump_debug_mode",
    },
    "profiling_config.": {"enable_profiling", "profiling_options"},
}


class _Options:
    def __init__(self, prefix):
        object.__setattr__(self, "_prefix", prefix)

    def __setattr__(self, name, value):
        if name not in _OPTIONS[self._prefix]:
            raise AttributeError(f"npu_device option {self._prefix}{name} does not exist")
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


def open():  # noqa: A001 - the real package's name
    calls.append(("open",))
    return _Device()
