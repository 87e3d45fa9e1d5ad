"""Image folders on disk: layouts, headers, decoding, resizing, colour modes, caches, bad files.

Every image is a real Fashion-MNIST picture written out as PNG, JPEG, BMP or
GIF at mixed sizes and colour modes (`image_helpers.py`).
"""

import os
import time

import numpy as np
import pytest
import tensorflow as tf

from knowledge_distillation import data as data_lib
from knowledge_distillation.data import DataError, ImageView, load_data, make_dataset
from knowledge_distillation.data.images import read_header
from knowledge_distillation.util.files import read_model_metadata, save_model_atomic

from conftest import keras3_only
from image_helpers import encode, mode, resized, write_class_folders, write_image


@pytest.fixture(scope="module")
def folder(tmp_path_factory, small_data):
    """train/ and test/ class folders: 120 + 60 images, three sizes, three modes, four formats."""
    root = tmp_path_factory.mktemp("images")
    written = write_class_folders(
        str(root), [("train", small_data.x_train[:120], small_data.y_train[:120]),
                    ("test", small_data.x_test[:60], small_data.y_test[:60])],
        formats=("png", "bmp", "gif", "png"))
    return root, written


def _batches(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def test_headers_give_size_and_channels_of_every_format(tmp_path, small_data):
    image = small_data.x_train[0]
    for kind, channels in (("gray", 1), ("rgb", 3), ("rgba", 3)):
        for fmt in ("png", "jpg", "bmp", "gif"):
            path = str(tmp_path / f"{kind}.{fmt}")
            write_image(path, mode(resized(image, (30, 41)), kind), fmt)
            # 24-bit BMP and palette GIF are colour, as TensorFlow decodes them.
            expected = 3 if fmt in ("bmp", "gif") else channels
            assert read_header(path) == (30, 41, expected), (kind, fmt)
            decoded = tf.io.decode_image(open(path, "rb").read(), expand_animations=False)
            assert decoded.shape[:2] == (30, 41)


def test_class_folders_load_sorted_classes_and_their_labels(folder, small_data):
    root, written = folder
    data = load_data(str(root))
    assert isinstance(data.x_train, data_lib.ImageFiles)
    assert data.class_names == tuple(sorted({f"class_{int(v)}" for v in small_data.y_train[:120]}))
    assert data.num_classes == len(data.class_names)
    assert len(data.x_train) == 120 and len(data.x_test) == 60
    assert data.x_train.shape == (120, None, None, 3)  # mixed sizes, colour present
    by_path = {path: label for path, label, _, _ in written["train"]}
    for path, label in zip(data.x_train.paths, data.y_train):
        assert data.class_names[label] == f"class_{by_path[path]}"


def test_mixed_sizes_need_image_size_and_the_error_names_a_file(folder):
    root, _ = folder
    data = load_data(str(root))
    with pytest.raises(DataError, match=r"\.(png|bmp|gif): image of size \d+x\d+, but .* is "
                                        r"\d+x\d+; .*--image_size"):
        data_lib.model_input_shape(data, ImageView())
    assert data_lib.model_input_shape(data, ImageView((32, 32))) == (32, 32, 3)
    assert data_lib.model_input_shape(data, ImageView((32, 32), channels=1)) == (32, 32, 1)


def test_streamed_pixels_are_the_files_resized_and_colour_converted(folder, small_data):
    """Every streamed image equals the written picture, resized by tf.image.resize (lossless formats)."""
    root, written = folder
    data = load_data(str(root))
    view = ImageView((32, 32), channels=3, preprocessing="none")
    x, y = _batches(make_dataset(data.x_train, data.y_train, 50, view=view))
    assert x.shape == (120, 32, 32, 3) and x.dtype == np.float32
    originals = {path: (i, size, kind) for i, (path, _, size, kind) in enumerate(written["train"])}
    for row, path in enumerate(data.x_train.paths):
        i, size, kind = originals[path]
        stored = resized(small_data.x_train[i], (size, size))
        if path.endswith(".gif") and kind != "gray":
            stored = mode(stored, "gray")  # the GIF palette is gray
        expected = resized(stored[..., :1], (32, 32)).astype(np.float32)
        # Gray to RGB copies the channel; RGB(A) of a gray picture has three equal channels.
        np.testing.assert_allclose(x[row], np.repeat(expected, 3, -1), atol=1.0, err_msg=path)
    gray, _ = _batches(make_dataset(data.x_train, data.y_train, 50,
                                    view=ImageView((32, 32), channels=1, preprocessing="none")))
    assert gray.shape == (120, 32, 32, 1)
    np.testing.assert_allclose(gray[..., 0], x[..., 0], atol=1.0)


@pytest.mark.parametrize("method", ["nearest", "bicubic", "area"])
def test_interpolation_is_the_named_tf_resize_method(folder, method):
    root, _ = folder
    data = load_data(str(root))
    files = data.x_train[:8]
    view = ImageView((20, 24), channels=3, interpolation=method, preprocessing="none")
    x, _ = _batches(make_dataset(files, np.zeros(8, np.int64), 8, view=view))
    for row, path in enumerate(files.paths):
        image = tf.io.decode_image(open(path, "rb").read(), channels=3, expand_animations=False)
        expected = np.clip(np.round(tf.image.resize(image, (20, 24), method=method).numpy()), 0, 255)
        np.testing.assert_array_equal(x[row], expected)


def test_preprocessing_modes_against_hand_computation():
    pixels = np.array([[[[0, 128, 255]]]], np.uint8)
    values = pixels.astype(np.float64)
    expected = {
        "unit": values / 255,
        "symmetric": values / 127.5 - 1,
        "none": values,
        "caffe": values[..., ::-1] - [103.939, 116.779, 123.68],
        "torch": (values / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
    }
    for name, want in expected.items():
        np.testing.assert_allclose(data_lib.preprocess(pixels, name).numpy(), want, rtol=1e-6,
                                   atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="3-channel RGB.*--channels 3"):
        data_lib.preprocess(np.zeros((1, 2, 2, 1), np.uint8), "caffe")


def test_label_list_layout_and_its_bad_input(tmp_path, small_data):
    for i in range(12):
        write_image(str(tmp_path / "flat" / f"img_{i}.png"), small_data.x_train[i])
    lines = [f"img_{i}.png {int(small_data.y_train[i])}" for i in range(12)]
    (tmp_path / "train.txt").write_text("\n".join(lines[:8]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(lines[8:]) + "\n\n")
    data = load_data(str(tmp_path / "flat"), labels_file=str(tmp_path / "train.txt"),
                     test_labels_file=str(tmp_path / "test.txt"))
    assert len(data.x_train) == 8 and len(data.x_test) == 4
    np.testing.assert_array_equal(data.y_test, small_data.y_train[8:12])
    assert data.x_train.shape == (8, 28, 28, 1)

    def fails(text, match, which="test"):
        bad = tmp_path / f"bad_{abs(hash(text))}.txt"
        bad.write_text(text)
        files = {"labels_file": str(tmp_path / "train.txt"),
                 "test_labels_file": str(tmp_path / "test.txt")}
        files[f"{'test_' if which == 'test' else ''}labels_file"] = str(bad)
        with pytest.raises(DataError, match=match):
            load_data(str(tmp_path / "flat"), **files)

    fails("img_0.png 1\nmissing.png 2\n", r"bad_\d+\.txt line 2: names missing\.png, which is not")
    high = int(small_data.y_train[:8].max()) + 1
    fails(f"img_0.png {high}\n", rf"label {high} \(entry 1\) out of range; expected 0\.\.{high - 1}")
    fails("img_0.png -1\n", r"line 1: label -1 out of range")
    fails("img_0.png\n", r"line 1: 'img_0\.png'; expected '<file name> <class index>'")
    fails("", r"no '<file name> <class index>' lines", which="train")
    with pytest.raises(DataError, match="--labels_file is given without --test_labels_file"):
        load_data(str(tmp_path / "flat"), labels_file=str(tmp_path / "train.txt"))


def test_bad_folders_and_files_are_one_error_naming_them(tmp_path, small_data):
    def layout(name):
        root = tmp_path / name
        for split, count in (("train", 6), ("test", 3)):
            for i in range(count):
                write_image(str(root / split / f"c{i % 2}" / f"{i}.png"), small_data.x_train[i])
        return root

    root = layout("empty_class")
    os.makedirs(root / "train" / "c2")
    (root / "train" / "c2" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"train/c2: empty class folder"):
        load_data(str(root))
    root = layout("extra_test_class")
    write_image(str(root / "test" / "c9" / "x.png"), small_data.x_train[0])
    with pytest.raises(DataError, match=r"test/c9: class 'c9' is not in .*train"):
        load_data(str(root))
    root = layout("empty_file")
    (root / "train" / "c0" / "0.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"train/c0/0\.png: empty file"):
        load_data(str(root))
    root = layout("garbage")
    (root / "train" / "c1" / "1.png").write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match=r"train/c1/1\.png: not an image"):
        load_data(str(root))
    root = layout("no_test")
    import shutil
    shutil.rmtree(root / "test")
    with pytest.raises(DataError, match="neither test/ nor val/"):
        load_data(str(root))


def test_a_corrupt_image_body_is_found_and_named(tmp_path, small_data):
    good = encode(resized(small_data.x_train[0], (40, 40)), "png")
    files = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        path.write_bytes(good if i != 2 else good[:60] + b"\0" * 40)  # header intact, data not
        files.append(str(path))
    images = data_lib.ImageFiles(files, str(tmp_path))
    assert images.shape == (4, 40, 40, 1)
    with pytest.raises(tf.errors.InvalidArgumentError):
        _batches(make_dataset(images, np.zeros(4, np.int64), 4))
    with pytest.raises(DataError, match=r"2\.png: cannot be decoded"):
        data_lib.locate_undecodable(images)


def test_image_caches_give_the_streamed_batches(folder, tmp_path, monkeypatch):
    from knowledge_distillation.data import pipeline

    root, _ = folder
    data = load_data(str(root))
    view = ImageView((24, 24), channels=1)
    streamed = _batches(make_dataset(data.x_train, data.y_train, 32, shuffle=True, seed=3,
                                     view=view))
    in_memory = data_lib.cached_images(data.x_train, view, "memory")
    assert in_memory.shape == (120, 24, 24, 1) and in_memory.dtype == np.uint8
    on_disk = data_lib.cached_images(data.x_train, view, "disk", str(tmp_path), "train")
    assert isinstance(on_disk, np.memmap)
    def same(cached):
        got = _batches(make_dataset(cached, data.y_train, 32, shuffle=True, seed=3, view=view))
        np.testing.assert_array_equal(got[0], streamed[0])
        np.testing.assert_array_equal(got[1], streamed[1])

    same(in_memory)  # a tensor copy (small)
    same(on_disk)  # read per batch from the memory map
    monkeypatch.setattr(pipeline, "NUMPY_READ_BYTES", 0)
    same(in_memory)  # read per batch by NumPy (large arrays)
    stamp = os.path.getmtime(tmp_path / "train.npy")
    time.sleep(0.01)
    again = data_lib.cached_images(data.x_train, view, "disk", str(tmp_path), "train")
    assert os.path.getmtime(tmp_path / "train.npy") == stamp  # reused, not rewritten
    np.testing.assert_array_equal(np.asarray(again), np.asarray(on_disk))
    other = data_lib.cached_images(data.x_train, ImageView((20, 20), 1), "disk", str(tmp_path),
                                   "train")
    assert other.shape == (120, 20, 20, 1)  # another size: decoded again


def test_a_runs_colour_mode_is_the_whole_folders_and_cached_chunks_stay_aligned(tmp_path,
                                                                                small_data):
    """Gray files first, colour later: a chunk of gray files is still fed as colour."""
    from knowledge_distillation import models
    from knowledge_distillation.config import TrainConfig
    from knowledge_distillation.inputs import prepare_inputs
    from knowledge_distillation.kd.teacher_cache import teacher_outputs

    root = tmp_path / "mixed"
    for split, count in (("train", 30), ("test", 6)):
        for i in range(count):
            kind = "gray" if i < 20 else "rgb"
            write_image(str(root / split / f"c{i % 3}" / f"{i:03d}.png"),
                        mode(small_data.x_train[i], kind))
    inputs = prepare_inputs(TrainConfig(data_path=str(root), image_size=(24, 24),
                                        output_dir=str(tmp_path / "out")))
    assert inputs.input_shape == (24, 24, 3) and inputs.view.channels == 3
    assert inputs.teacher_view.channels == 3
    files = inputs.data.x_train
    teacher = models.build_model("seed_student", (24, 24, 3), 3, seed=0)

    def predict(x):
        ds = make_dataset(x, np.zeros(len(x), np.int64), 8, view=inputs.view)
        return np.concatenate([teacher(images).numpy() for images, _ in ds])

    whole = predict(files)
    chunked = teacher_outputs(teacher, files, predict, chunk_examples=7)
    np.testing.assert_allclose(chunked.array, whole, rtol=1e-5, atol=1e-5)


def test_teacher_view_is_a_second_copy_of_the_same_images(folder):
    root, _ = folder
    data = load_data(str(root))
    ds = make_dataset(data.x_train, data.y_train, 16, shuffle=True, seed=1,
                      view=ImageView((24, 24), 3), teacher_view=ImageView((40, 40), 3, "bilinear",
                                                                          "symmetric"))
    (student, teacher), labels = next(iter(ds))
    assert student.shape == (16, 24, 24, 3) and teacher.shape == (16, 40, 40, 3)
    assert float(tf.reduce_min(teacher)) >= -1.0 and float(tf.reduce_min(student)) >= 0.0
    # Same images: the teacher's copy, shrunk to the student's size, is the student's.
    back = tf.image.resize((teacher + 1.0) * 127.5, (24, 24)).numpy() / 255.0
    assert np.mean(np.abs(back - student.numpy())) < 0.03


def test_model_files_carry_their_metadata(tmp_path):
    from knowledge_distillation import compat, models

    model = models.build_model("seed_student", (28, 28, 1), 10, seed=0)
    meta = {"preprocessing": "symmetric", "interpolation": "area", "class_names": ["a", "b"]}
    path = str(tmp_path / f"m{compat.MODEL_EXT}")
    save_model_atomic(model, path, meta)
    assert read_model_metadata(path) == meta
    loaded = models.load_model(path)
    np.testing.assert_array_equal(loaded.get_weights()[0], model.get_weights()[0])
    plain = str(tmp_path / f"plain{compat.MODEL_EXT}")
    save_model_atomic(model, plain)
    assert read_model_metadata(plain) == {}


@keras3_only
def test_keras3_h5_files_carry_metadata_too(tmp_path):
    from knowledge_distillation import models

    model = models.build_model("seed_student", (28, 28, 1), 10, seed=0)
    path = str(tmp_path / "m.h5")
    save_model_atomic(model, path, {"preprocessing": "torch"})
    assert read_model_metadata(path) == {"preprocessing": "torch"}
    assert models.load_model(path).count_params() == model.count_params()
