"""Atomic file writes: a reader never sees a half-written output.

Every output goes to a temporary file in the same folder, then is renamed
over the target (`os.replace` is atomic on one file system). Temporary files
get the mode a plain `open()` would give (0666 minus the umask), not
`mkstemp`'s 0600.
"""

import contextlib
import json
import os
import shutil
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
    """Writes `payload` as indented, key-sorted, strict JSON (no NaN) to `path`, atomically."""
    atomic_write(path, json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")


# What the trainer knows about a model's input (its preprocessing, image
# size, colour channels, interpolation, class names) travels inside the model
# file: a member of the .keras zip archive, an attribute of the HDF5 root.
# Keras ignores both when it loads the model.
METADATA_MEMBER = "knowledge_distillation.json"
METADATA_ATTR = "knowledge_distillation"


def save_model_atomic(model, path, metadata=None):
    """`compat.save_model(model, path)` through a temporary file and a rename.

    Args:
        model: the model.
        path: `.keras` or `.h5` file.
        metadata: a JSON-serialisable dict stored inside the file (see
            `read_model_metadata`). Defaults to None (nothing stored).
    """
    from knowledge_distillation import compat

    with atomic_path(path) as tmp:
        compat.save_model(model, tmp)
        if metadata is not None:
            _embed_metadata(tmp, json.dumps(metadata, sort_keys=True, allow_nan=False))


def _embed_metadata(path, text):
    if path.endswith(".keras"):
        import zipfile

        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr(METADATA_MEMBER, text)
    else:
        import h5py

        with h5py.File(path, "a") as f:
            f.attrs[METADATA_ATTR] = text


def read_model_metadata(path):
    """The metadata `save_model_atomic` stored in a model file; {} when there is none."""
    try:
        if path.endswith(".keras"):
            import zipfile

            with zipfile.ZipFile(path) as archive:
                if METADATA_MEMBER not in archive.namelist():
                    return {}
                text = archive.read(METADATA_MEMBER).decode("utf-8")
        else:
            import h5py

            with h5py.File(path, "r") as f:
                if METADATA_ATTR not in f.attrs:
                    return {}
                text = f.attrs[METADATA_ATTR]
                text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        value = json.loads(text)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot read its knowledge_distillation metadata ({e})") from e
    return value if isinstance(value, dict) else {}


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


def make_staging_dir(parent, prefix=".staging-"):
    """A new empty folder inside `parent` (mode 0777 minus the umask), for `replace_entries`."""
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    os.chmod(path, 0o777 & ~_umask())
    return path


def replace_entries(staging, target, names):
    """Moves `names` (files or folders) from `staging` into `target`, replacing a set as one.

    The earlier entries are first moved aside into a `.previous-*` folder,
    then the new ones are renamed in and the earlier ones deleted: the
    outputs in `target` are never a mix of two runs except during the few
    renames in between. `staging` is removed.
    """
    previous = make_staging_dir(target, prefix=".previous-")
    try:
        for name in names:
            if os.path.lexists(os.path.join(target, name)):
                os.replace(os.path.join(target, name), os.path.join(previous, name))
        for name in names:
            if os.path.lexists(os.path.join(staging, name)):
                os.replace(os.path.join(staging, name), os.path.join(target, name))
    except BaseException:
        # Put the earlier set back where the new one did not land.
        for name in names:
            old = os.path.join(previous, name)
            if os.path.lexists(old) and not os.path.lexists(os.path.join(target, name)):
                os.replace(old, os.path.join(target, name))
        raise
    finally:
        shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(parent):
    """Removes `.staging-PID-*` and `.previous-PID-*` folders whose process is gone."""
    if not os.path.isdir(parent):
        return []
    removed = []
    for entry in os.listdir(parent):
        prefix = next((p for p in (".staging-", ".previous-") if entry.startswith(p)), None)
        if prefix is None:
            continue
        pid = entry[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
    return removed


def pid_alive(pid):
    """Whether process `pid` runs on this host (a PID of 0 or less: no)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
