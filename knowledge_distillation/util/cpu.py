"""What the running CPU can do, read from Linux's `/proc/cpuinfo`.

CPU-dependent defaults (bfloat16 mixed precision, the deploy model's uint8
activations) are decided from the machine that runs, never from a past one.
"""

import os
import platform

CPUINFO = "/proc/cpuinfo"
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16, AMX; Arm BF16 (Features)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")  # Linux names of AVX512-VNNI and AVX-VNNI
X86_64_MACHINES = ("x86_64", "amd64", "x64")


def read_cpu_flags(path=None):
    """The CPU's feature flags (a frozenset), or None when they cannot be read."""
    try:
        with open(path or CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def cpu_model(path=None):
    """The CPU's model name (e.g. "Intel(R) Xeon(R) Processor"), or `platform.processor()`."""
    try:
        with open(path or CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def has_bf16(flags=None):
    """True/False: bfloat16 instructions; None when the flags cannot be read."""
    flags = read_cpu_flags() if flags is None else flags
    if flags is None:
        return None
    return any(f in flags for f in BF16_FLAGS)


def vnni_flags(flags):
    """The VNNI flags among `flags`, sorted (empty when none or unknown)."""
    return sorted(f for f in VNNI_FLAGS if f in (flags or ()))


def is_x86_64(machine=None):
    machine = platform.machine() if machine is None else machine
    return machine.lower() in X86_64_MACHINES


def describe(isa=("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")):
    """CPU model, core count, the ISA flags that matter, and the 1-minute load."""
    flags = read_cpu_flags() or frozenset()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "isa": [f for f in isa if f in flags],
        "load_avg_1m": os.getloadavg()[0],
    }
