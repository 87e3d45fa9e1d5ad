"""Atomic file writes: a reader never sees a half-written output.

Every output goes to a temporary file in the same folder, then is renamed
over the target (`os.replace` is atomic on one file system). Temporary files
get the mode a plain `open()` would give (0666 minus the umask), not
`mkstemp`'s 0600.
"""

import contextlib
import json
import os
import tempfile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`, renamed over it when the block succeeds.

    The temporary name ends with `path`'s own name, so writers that look at
    the suffix (`model.save` wants `.keras`, `save_weights` wants
    `.weights.h5`) accept it. On error it is removed and `path` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path, data):
    """Writes `data` (str or bytes) to `path` through a temporary file and a rename."""
    mode = "wb" if isinstance(data, (bytes, bytearray)) else "w"
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            f.write(data)


def write_json_atomic(path, payload):
    """Writes `payload` as indented, key-sorted JSON to `path`, atomically."""
    atomic_write(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def save_model_atomic(model, path):
    """`model.save(path)` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        model.save(tmp)


def save_weights_atomic(model, path):
    """`model.save_weights(path)` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        model.save_weights(tmp)


def read_json_file(path, flag):
    """Parses a JSON file; any failure is one ValueError naming flag and file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--{flag}={path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--{flag}={path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--{flag}={path}: cannot be read ({e})") from None
