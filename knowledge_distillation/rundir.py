"""One run per output folder: checked before anything trains, locked while it runs.

A run's `--output_dir` records what it was asked (`run.json`: the settings
that decide the models, a fingerprint of the data, and the dtype policy the
host resolved `--precision_mode` to) from its first start:

- a restart with the same settings resumes (finished phases reload, the
  unfinished one restarts from its last epoch), and a finished run
  re-reports its recorded figures;
- a restart with different settings, or on a host that would compute in
  another dtype policy, ends at once with one error naming what differs;
  `--overwrite` starts over in that folder instead.

One process writes a folder at a time: `.lock` holds the owner's PID and
host, a second run into a busy folder ends at once naming the other run,
and a lock left by a dead process on this host is taken over with a warning.
"""

import dataclasses
import datetime
import json
import logging
import os
import shutil
import socket

from knowledge_distillation import compat
from knowledge_distillation.util.digest import hash_array
from knowledge_distillation.util.files import pid_alive, write_json_atomic

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
# TrainConfig fields that do not change the models a run produces (what it
# logs, dumps or profiles, how it batches calls, where it runs): a restart
# may change them.
NOT_DECIDING = frozenset({
    "output_dir", "overwrite", "log_steps", "steps_per_execution", "cache_teacher", "quantize",
    "cache_images",
    "device.data_dump_flag", "device.data_dump_step", "device.data_dump_path",
    "device.over_dump", "device.over_dump_path", "device.profiling",
    "device.profiling_dump_path",
})
# What a run writes; `--overwrite` removes exactly these.
# (train.log stays: the new run's log is already open and appends to it.)
# Both stacks' model files, so that --overwrite clears a folder either one wrote.
RUN_OUTPUTS = tuple(f"{phase}{ext}" for phase in ("teacher", "scratch", "distilled")
                    for ext in (".keras", ".h5")) + (
    "summary.json", RUN_FILE, "checkpoints", "backup", "logs", "teacher_cache", "image_cache",
    "quant")


def check_writable_dir(path, flag):
    """Creates `path` if needed and test-writes it; one `ValueError` naming `flag` otherwise."""
    if not path:
        raise ValueError(f"{flag} is empty; expected a folder to write to")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag}={path} is a file; expected a folder to write to")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag}={path} cannot be written: {e.strerror or e}") from None


def _flatten(config, prefix=""):
    out = {}
    for key, value in (dataclasses.asdict(config) if dataclasses.is_dataclass(config)
                       else config).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _file_digest(path):
    if not path or not os.path.isfile(path):
        return None
    import numpy as np

    return hash_array(np.fromfile(path, dtype=np.uint8))


def deciding_settings(config):
    """The settings of a `TrainConfig` that decide its models, flattened (`device.static`).

    User model files count by content, not by path.
    """
    settings = {k: v for k, v in _flatten(config).items()
                if k not in NOT_DECIDING and not k.startswith("distribute.")}
    for key in ("teacher_model", "student_model", "device.mixlist_file"):
        if settings.get(key):
            settings[f"{key}:content"] = _file_digest(settings[key])
    # The stack decides the model files' format and the numerics.
    settings["stack"] = compat.STACK
    return settings


def _images_digest(images):
    # Image files count by their list (paths, sizes, modification times).
    return images.fingerprint() if hasattr(images, "fingerprint") else hash_array(images)


def data_fingerprint(data):
    """A digest of every array of an `ImageData` (the images, the labels)."""
    return {
        "name": data.name,
        "train": _images_digest(data.x_train) + hash_array(data.y_train),
        "test": _images_digest(data.x_test) + hash_array(data.y_test),
    }


def differences(old, new):
    """`key: old -> new` for each setting that differs between two flat dicts."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class RunFolder:
    """The output folder of one run: its lock and its record.

    Args:
        path: the folder (created and test-written by `claim`).
        settings: `deciding_settings(config)`.
        overwrite: start over when the folder holds a run with other
            settings (`--overwrite`).
        flag: the flag that named the folder, for errors.
    """

    def __init__(self, path, settings, overwrite=False, flag="--output_dir"):
        self.path = path
        self.settings = settings
        self.overwrite = overwrite
        self.flag = flag
        self._locked = False

    @property
    def lock_path(self):
        return os.path.join(self.path, LOCK_FILE)

    @property
    def record_path(self):
        return os.path.join(self.path, RUN_FILE)

    # -- lock ------------------------------------------------------------------
    def _lock(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = _read_json(self.lock_path) or {}
                pid = other.get("pid")
                if other.get("host") == me["host"] and not (isinstance(pid, int) and pid_alive(pid)):
                    logger.warning("%s: taking over the lock of pid %s, which is no longer "
                                   "running (started %s)", self.path, other.get("pid"),
                                   other.get("started"))
                    _remove(self.lock_path)
                    continue
                raise ValueError(
                    f"{self.flag}={self.path} is in use by another run (pid {other.get('pid')} "
                    f"on {other.get('host')}, started {other.get('started')}); wait for it to "
                    f"end or use another {self.flag} (if that run is dead, delete "
                    f"{self.lock_path})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._locked = True
            return
        raise ValueError(f"{self.flag}={self.path}: cannot take the lock {self.lock_path}")

    def release(self):
        """Removes the lock (call when the run ends, however it ends)."""
        if self._locked:
            _remove(self.lock_path)
            self._locked = False

    # -- record ----------------------------------------------------------------
    def claim(self):
        """Locks the folder and checks or writes its record of the settings.

        Raises:
            ValueError: the folder cannot be written, is busy, or holds a run
                with other settings (without `overwrite`).
        """
        check_writable_dir(self.path, self.flag)
        self._lock()
        try:
            self._check_settings()
        except BaseException:
            self.release()
            raise

    def _leftovers(self):
        return [n for n in RUN_OUTPUTS if n != RUN_FILE and os.path.exists(os.path.join(self.path, n))]

    def _check_settings(self):
        record = _read_json(self.record_path)
        leftovers = self._leftovers()
        if self.overwrite and leftovers:
            self.clear()
            leftovers = []
        elif record is not None and record.get("settings") == self.settings:
            return
        if not leftovers:  # nothing trained here (any more): nothing to protect
            self._write({"settings": self.settings, "data": None})
            return
        if record is None:
            found = f"run outputs ({', '.join(leftovers)}) but no {RUN_FILE}"
        else:
            found = "a run with other settings: " + "; ".join(
                differences(record.get("settings") or {}, self.settings))
        raise ValueError(
            f"{self.flag}={self.path} holds {found}. Restart with the same settings to "
            f"resume, or pass --overwrite to start over there, or use another {self.flag}")

    def check_data(self, fingerprint):
        """Records the data's fingerprint on the first start; later it must match."""
        record = _read_json(self.record_path) or {"settings": self.settings}
        if record.get("data") is None or (record["data"] != fingerprint and not self._leftovers()):
            record["data"] = fingerprint
            self._write(record)
            return
        if record["data"] != fingerprint:
            raise ValueError(
                f"{self.flag}={self.path} holds a run on other data ("
                + "; ".join(differences(record["data"], fingerprint))
                + "). Pass --overwrite to start over there, or use another " + self.flag)

    def check_compute(self, dtype_policy, precision_mode):
        """Records the dtype policy of the first start; a resume must train in the same one.

        `--precision_mode` resolves per host (bfloat16 on a CPU with AMX or
        AVX-512 BF16, float32 on one without, float16 on a GPU; on Ascend
        `npu_device` applies the mode itself), so the same settings can
        compute differently on another machine. A run resumed there would
        train its remaining epochs, or its remaining phases, in other numerics
        than its first ones (the scratch twin in one, the distilled student in
        another): refused, naming both.

        Args:
            dtype_policy: what this process trains in
                (`ascend.precision.run_compute`: `"float32"`, `"mixed_bfloat16"`,
                `"float32 with mixed_float16 layers"`, ..., `"npu_device"`).
            precision_mode: `--precision_mode`, for the error.
        """
        record = _read_json(self.record_path) or {"settings": self.settings}
        earlier = record.get("compute")
        earlier = earlier if isinstance(earlier, dict) and earlier.get("dtype_policy") else {}
        if earlier.get("dtype_policy") == dtype_policy:
            return
        leftovers = self._leftovers()
        if not earlier or not leftovers:  # the first start, or nothing trained yet
            if leftovers:
                logger.warning("%s: %s does not say what the earlier start trained in (an older "
                               "version wrote it), so this resume cannot check it: recording %s",
                               self.path, RUN_FILE, dtype_policy)
            record["compute"] = {"dtype_policy": dtype_policy, "host": socket.gethostname()}
            self._write(record)
            return
        raise ValueError(
            f"{self.flag}={self.path} holds a run that trained in {earlier['dtype_policy']} "
            f"(on {earlier.get('host')}); --precision_mode={precision_mode} computes in "
            f"{dtype_policy} here. Resume it where it computes in {earlier['dtype_policy']}, "
            f"or pass --overwrite to start over here, or use another {self.flag}")

    def clear(self):
        """Removes what a run writes (`RUN_OUTPUTS`), nothing else."""
        logger.warning("%s: --overwrite: removing the earlier run's outputs", self.path)
        for name in RUN_OUTPUTS:
            target = os.path.join(self.path, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.remove(target)

    def _write(self, record):
        write_json_atomic(self.record_path, record)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
