"""The shared helpers: atomic writes, CPU flags, digests, batched prediction."""

import os
import stat

import numpy as np
import pytest

from knowledge_distillation import compat
from knowledge_distillation.compat import keras
from knowledge_distillation.util import cpu, digest, files, inference


def test_atomic_write_leaves_the_old_file_whole_when_writing_fails(tmp_path):
    path = tmp_path / "out.json"
    files.write_json_atomic(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with files.atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_atomic_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        files.atomic_write(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644


def test_read_json_file_errors_name_the_flag_and_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match=f"--mixlist_file={bad}: not valid JSON"):
        files.read_json_file(str(bad), "mixlist_file")
    with pytest.raises(ValueError, match="file not found"):
        files.read_json_file(str(tmp_path / "missing.json"), "mixlist_file")


def test_cpu_flags_are_read_from_cpuinfo_and_unknown_when_unreadable(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 amx_bf16 avx_vnni\n")
    flags = cpu.read_cpu_flags(str(info))
    assert flags == {"fpu", "avx2", "amx_bf16", "avx_vnni"}
    assert cpu.cpu_model(str(info)) == "Test CPU"
    assert cpu.has_bf16(flags) is True and cpu.has_bf16(frozenset({"avx2"})) is False
    assert cpu.vnni_flags(flags) == ["avx_vnni"]
    arm = tmp_path / "cpuinfo_arm"  # aarch64 lists "Features", BF16 as plain "bf16"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert cpu.has_bf16(cpu.read_cpu_flags(str(arm))) is True
    assert cpu.read_cpu_flags(str(tmp_path / "missing")) is None


def test_weights_digest_follows_values_not_names():
    def model(seed, name):
        compat.set_random_seed(seed)
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name=name)

    a, b, c = model(0, "a"), model(0, "b"), model(1, "a")
    assert digest.weights_digest(a) == digest.weights_digest(b)
    assert digest.weights_digest(a) != digest.weights_digest(c)
    assert digest.hash_array(np.zeros(4, np.float32)) != digest.hash_array(np.zeros(4, np.float64))


def test_batched_predict_eager_and_compiled_agree_with_one_call():
    compat.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x = np.random.default_rng(0).normal(size=(70, 3)).astype("float32")
    whole = model(x).numpy()
    eager = inference.batched_predict(model, inference.array_batches(x, 32))
    import tensorflow as tf

    compiled = inference.batched_predict(model, tf.data.Dataset.from_tensor_slices(x).batch(32),
                                         compiled=True)
    np.testing.assert_allclose(eager, whole, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(compiled, whole, rtol=1e-5, atol=1e-6)
