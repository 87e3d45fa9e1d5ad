import json
import logging
import os

import numpy as np
import pytest

from knowledge_distillation import compat
from knowledge_distillation import data as data_lib
from knowledge_distillation.compat import keras
from knowledge_distillation.config import DeviceConfig, TrainConfig
from knowledge_distillation.kd import teacher_cache
from knowledge_distillation.kd.distiller import Distiller
from knowledge_distillation.models import build_model
from knowledge_distillation.train import Trainer


class CountingPredict:
    """Batched inference-mode predict that counts the images it saw."""

    def __init__(self, model):
        self.model = model
        self.images = 0

    def __call__(self, x):
        self.images += len(x)
        return self.model.predict(data_lib.preprocess(x), batch_size=128, verbose=0)


@pytest.fixture
def teacher(small_data):
    return build_model("seed_student", small_data.input_shape, small_data.num_classes, seed=3)


def _outputs(teacher, x, tmp_path, **kw):
    predict = CountingPredict(teacher)
    out = teacher_cache.teacher_outputs(teacher, x, predict, cache_dir=str(tmp_path), **kw)
    return out, predict


def test_outputs_are_computed_once_then_reused_from_the_stored_key(teacher, small_data, tmp_path):
    x = small_data.x_train
    first, predict = _outputs(teacher, x, tmp_path)
    assert first.source == "computed" and first.in_memory and predict.images == len(x)
    expected = teacher.predict(data_lib.preprocess(x), verbose=0)
    np.testing.assert_allclose(first.array, expected, rtol=1e-5, atol=1e-5)
    with open(os.path.join(tmp_path, teacher_cache.KEY_FILE)) as f:
        assert json.load(f) == first.key

    second, predict = _outputs(teacher, x, tmp_path)
    assert second.source == "reused" and predict.images == 0
    np.testing.assert_array_equal(second.array, first.array)


def _perturb_weights(model):
    weights = model.get_weights()
    weights[0] = weights[0] + 0.5
    model.set_weights(weights)


def _other_preprocess(x):
    return data_lib.preprocess(x) * 2.0


@pytest.mark.parametrize(
    "change, field",
    [
        ("weights", "teacher_weights"),
        ("data", "images"),
        ("preprocessing", "preprocessing"),
        ("version", "preprocessing"),
        ("dtype", "dtype_policy"),
    ],
)
def test_any_change_to_the_key_recomputes_and_logs_what_changed(
    change, field, teacher, small_data, tmp_path, caplog
):
    x = small_data.x_train
    _outputs(teacher, x, tmp_path)
    kw = {}
    if change == "weights":
        _perturb_weights(teacher)
    elif change == "data":
        x = x.copy()
        x[-1, 0, 0, 0] ^= 1  # one byte of one image
    elif change == "preprocessing":
        kw["preprocess"] = _other_preprocess
    elif change == "version":
        kw["preprocessing_version"] = "2"
    elif change == "dtype":
        compat.set_dtype_policy(teacher.layers[-1], "mixed_bfloat16")
    with caplog.at_level(logging.INFO, logger="knowledge_distillation.kd.teacher_cache"):
        out, predict = _outputs(teacher, x, tmp_path, **kw)
    assert out.source == "computed" and predict.images == len(x)
    stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert stale and field in stale[0]


def test_over_the_memory_budget_outputs_are_memory_mapped_and_looked_up_per_batch(
    teacher, small_data, tmp_path
):
    x, y = small_data.x_train, small_data.y_train
    out, predict = _outputs(teacher, x, tmp_path, memory_budget_bytes=1024, chunk_examples=100)
    assert isinstance(out.array, np.memmap) and not out.in_memory
    assert predict.images == len(x)
    expected = teacher.predict(data_lib.preprocess(x), verbose=0)
    np.testing.assert_allclose(out.array, expected, rtol=1e-5, atol=1e-5)
    assert out.column().shape == (len(x),)

    ds = data_lib.make_dataset(x, y, 32, shuffle=True, seed=0, extra=out.column())
    ds = ds.map(out.lookup)
    seen = 0
    for (images, logits), labels in ds:
        assert logits.shape == (len(labels), small_data.num_classes)
        # Rows must follow the shuffled images: recompute them from the batch.
        np.testing.assert_allclose(logits.numpy(), teacher(images, training=False).numpy(),
                                   rtol=1e-4, atol=1e-4)
        seen += len(labels)
    assert seen == len(x)

    reused, predict = _outputs(teacher, x, tmp_path, memory_budget_bytes=1024)
    assert reused.source == "reused" and isinstance(reused.array, np.memmap)


def test_over_budget_without_a_cache_dir_is_a_clear_error(teacher, small_data):
    with pytest.raises(ValueError, match="memory budget"):
        teacher_cache.teacher_outputs(teacher, small_data.x_train, CountingPredict(teacher),
                                      memory_budget_bytes=16)


def test_a_corrupt_cache_file_is_recomputed(teacher, small_data, tmp_path):
    x = small_data.x_train
    _outputs(teacher, x, tmp_path)
    with open(os.path.join(tmp_path, teacher_cache.ARRAY_FILE), "wb") as f:
        f.write(b"not an npy file")
    out, predict = _outputs(teacher, x, tmp_path)
    assert out.source == "computed" and predict.images == len(x)


def test_a_teacher_reloaded_from_its_file_and_recompiled_keeps_its_key(
        teacher, small_data, tmp_path):
    teacher.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    path = tmp_path / f"teacher{compat.MODEL_EXT}"
    teacher.save(path)
    reloaded = compat.load_model_file(str(path))
    reloaded.compile(optimizer="sgd", loss="mae", metrics=["accuracy"])
    x = small_data.x_train[:64]
    key = teacher_cache.cache_key(teacher, x, data_lib.preprocess)
    assert teacher_cache.cache_key(reloaded, x, data_lib.preprocess) == key


def test_an_unreadable_key_file_is_logged_and_recomputed(teacher, small_data, tmp_path, caplog):
    x = small_data.x_train[:64]
    _outputs(teacher, x, tmp_path)
    with open(os.path.join(tmp_path, teacher_cache.KEY_FILE), "w") as f:
        f.write("{not json")
    with caplog.at_level(logging.WARNING, logger="knowledge_distillation"):
        again, predict = _outputs(teacher, x, tmp_path)
    assert again.source == "computed" and predict.images == len(x)
    assert "cannot read the key file" in caplog.text


def test_preprocessing_fingerprint_is_stable_and_never_a_memory_address():
    class Scale:
        def __call__(self, x):
            return x / 255.0

    first = teacher_cache.preprocessing_fingerprint(data_lib.preprocess)
    assert first == teacher_cache.preprocessing_fingerprint(data_lib.preprocess)
    assert "0x" not in first
    with pytest.raises(ValueError, match="cannot fingerprint the preprocessing Scale"):
        teacher_cache.preprocessing_fingerprint(Scale())


def test_random_augmentation_disables_the_cache_and_says_why():
    use, why = teacher_cache.cache_decision("random flip")
    assert not use and "random flip" in why and "every step" in why
    use, why = teacher_cache.cache_decision(None)
    assert use and "deterministic" in why


def test_full_hash_sees_a_single_byte_change_anywhere():
    a = np.zeros((1000, 28, 28, 1), np.uint8)
    b = a.copy()
    b[517, 13, 7, 0] = 1
    assert teacher_cache.hash_array(a) != teacher_cache.hash_array(b)
    assert teacher_cache.hash_array(a) != teacher_cache.hash_array(a.reshape(1000, 784))


def _train_student(small_data, teacher, cached, seed=7, epochs=2):
    student = build_model("seed_student", small_data.input_shape, small_data.num_classes,
                          seed=seed)
    x, y = small_data.x_train, small_data.y_train
    if cached:
        logits = teacher.predict(data_lib.preprocess(x), batch_size=256, verbose=0)
        ds = data_lib.make_dataset(x, y, 32, shuffle=True, seed=seed, extra=logits)
        ds = ds.map(lambda a, b, t: ((a, t), b))
    else:
        ds = data_lib.make_dataset(x, y, 32, shuffle=True, seed=seed)
    distiller = Distiller(teacher=teacher, student=student, teacher_outputs_in_data=cached)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3), alpha=0.1, temperature=10.0)
    compat.set_random_seed(seed)
    history = distiller.fit(ds, epochs=epochs, verbose=0)
    return student, history.history["loss"]


def test_cached_and_per_step_teacher_train_the_same_student(small_data, teacher):
    cached_student, cached_loss = _train_student(small_data, teacher, cached=True)
    step_student, step_loss = _train_student(small_data, teacher, cached=False)
    np.testing.assert_allclose(cached_loss, step_loss, rtol=1e-3)
    x = data_lib.preprocess(small_data.x_test).numpy()
    np.testing.assert_allclose(cached_student.predict(x, verbose=0),
                               step_student.predict(x, verbose=0), rtol=1e-2, atol=1e-2)


def _tiny_run_config(data_path, output_dir, **kwargs):
    """A whole trainer run in seconds: 256 images, seed convnets, float32."""
    return TrainConfig(
        data_path=data_path, epoch=1, train_size=256, test_size=64,
        output_dir=str(output_dir), teacher="seed_student", student="seed_student",
        device=DeviceConfig(precision_mode="must_keep_origin_dtype"), **kwargs,
    )


def test_trainer_without_augmentation_stores_the_cache(fashion_mnist_path, tmp_path, caplog):
    config = _tiny_run_config(fashion_mnist_path, tmp_path)
    with caplog.at_level(logging.INFO):
        summary = Trainer(config).run()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "no random augmentation" in messages
    assert "teacher cache: computing 256 teacher outputs" in messages
    assert os.path.isfile(os.path.join(tmp_path, "teacher_cache", teacher_cache.KEY_FILE))
    assert summary["recipe"]["teacher"] == "cached logits"


def test_trainer_with_augmentation_runs_the_teacher_every_step(
    fashion_mnist_path, tmp_path, caplog
):
    config = _tiny_run_config(fashion_mnist_path, tmp_path, augment=True, augment_mix="cutmix")
    with caplog.at_level(logging.INFO):
        summary = Trainer(config).run()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "teacher runs on every training step, in float32" in messages
    assert "shift 2 px, flip, cutmix alpha 1" in messages
    assert summary["recipe"]["teacher"] == "per step"
    assert not os.path.exists(os.path.join(tmp_path, "teacher_cache"))
