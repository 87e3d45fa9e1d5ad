"""Tests of `knowledge_distillation.data` on real Fashion-MNIST.

Malformed inputs are built from a real slice with `write_idx`, which writes
the MNIST IDX format (big-endian header: magic, then one uint32 per axis).
"""

import gzip
import os
import socket
import struct

import numpy as np
import pytest
import tensorflow as tf

from knowledge_distillation.compat import keras
from knowledge_distillation.data import (
    IDX_FILES,
    DataError,
    load_data,
    make_dataset,
    preprocess,
)


def write_idx(path, array, magic=None):
    """Writes `array` as a uint8 IDX file, gzipped when `path` ends in .gz."""
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    content = header + array.tobytes()
    if str(path).endswith(".gz"):
        content = gzip.compress(content, compresslevel=1)
    with open(path, "wb") as f:
        f.write(content)
    return str(path)


def write_mnist_folder(folder, x_train, y_train, x_test, y_test, gz=True):
    """Writes the four IDX files; returns their paths by npz key."""
    os.makedirs(folder, exist_ok=True)
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test,
              "y_test": y_test}
    suffix = ".gz" if gz else ""
    return {
        key: write_idx(os.path.join(folder, IDX_FILES[key] + suffix), array)
        for key, array in arrays.items()
    }


@pytest.fixture(scope="module")
def full(fashion_mnist_path):
    """All of real Fashion-MNIST."""
    return load_data(fashion_mnist_path)


@pytest.fixture(scope="module")
def real(fashion_mnist_path):
    """The first 200 train and 100 test images of real Fashion-MNIST."""
    return load_data(fashion_mnist_path, train_size=200, test_size=100)


@pytest.fixture
def idx_folder(tmp_path, real):
    """A gzipped IDX folder holding the real slice, (N, 28, 28) images."""
    paths = write_mnist_folder(
        tmp_path / "slice", real.x_train[..., 0], real.y_train,
        real.x_test[..., 0], real.y_test,
    )
    return tmp_path / "slice", paths


def assert_data_error(data_path, fragment, names_file, **kwargs):
    with pytest.raises(DataError) as info:
        load_data(str(data_path), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(names_file) in message, message
    assert fragment in message, message
    return message


# --- real data -------------------------------------------------------------


def test_full_fashion_mnist_loads_with_shapes_and_classes_from_the_files(full):
    data = full
    assert data.x_train.shape == (60000, 28, 28, 1)
    assert data.x_test.shape == (10000, 28, 28, 1)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int64
    assert data.y_train.shape == (60000,) and data.y_test.shape == (10000,)
    assert data.input_shape == (28, 28, 1)
    assert data.num_classes == 10
    assert data.name == "fashion-mnist"
    # Fashion-MNIST is balanced: 6000 / 1000 images per class.
    assert np.bincount(data.y_train).tolist() == [6000] * 10
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    assert data.x_train.max() == 255 and data.x_train.min() == 0


def test_sizes_take_the_first_examples_and_keep_the_class_count(real, full):
    assert real.x_train.shape == (200, 28, 28, 1)
    assert real.x_test.shape == (100, 28, 28, 1)
    np.testing.assert_array_equal(real.x_train, full.x_train[:200])
    np.testing.assert_array_equal(real.y_test, full.y_test[:100])
    assert real.num_classes == 10
    assert real.x_train.flags.writeable


def test_size_beyond_the_split_is_an_error_naming_the_file(idx_folder):
    folder, paths = idx_folder
    assert_data_error(folder, "train_size=201", paths["x_train"],
                      train_size=201)


def test_mnist_npz_round_trip(tmp_path, real):
    np.savez(tmp_path / "mnist.npz", x_train=real.x_train[..., 0],
             y_train=real.y_train.astype(np.uint8),
             x_test=real.x_test[..., 0], y_test=real.y_test.astype(np.uint8))
    data = load_data(str(tmp_path))
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(data, key), getattr(real, key))
    assert data.y_train.dtype == np.int64
    assert data.input_shape == (28, 28, 1)
    assert data.num_classes == 10


def test_mnist_npz_is_preferred_over_idx_files(idx_folder, real):
    folder, _ = idx_folder
    np.savez(folder / "mnist.npz", x_train=real.x_train[:50],
             y_train=real.y_train[:50], x_test=real.x_test[:20],
             y_test=real.y_test[:20])
    data = load_data(str(folder))
    assert len(data.x_train) == 50 and len(data.x_test) == 20


def test_uncompressed_idx_files_load_like_the_gzipped_ones(tmp_path, real):
    write_mnist_folder(tmp_path, real.x_train[..., 0], real.y_train,
                       real.x_test[..., 0], real.y_test, gz=False)
    data = load_data(str(tmp_path), train_size=150)
    np.testing.assert_array_equal(data.x_train, real.x_train[:150])
    np.testing.assert_array_equal(data.y_test, real.y_test)
    assert data.num_classes == 10


def test_channels_and_class_count_come_from_the_data(tmp_path, real):
    # Three-channel images and five classes, as stored in the npz.
    rgb = np.repeat(real.x_train[:40], 3, axis=-1)
    np.savez(tmp_path / "mnist.npz", x_train=rgb, y_train=real.y_train[:40] % 5,
             x_test=rgb[:10], y_test=real.y_train[:10] % 5)
    data = load_data(str(tmp_path))
    assert data.input_shape == (28, 28, 3)
    assert data.num_classes == 5


# --- missing and malformed data ---------------------------------------------


def test_missing_data_path_says_how_to_get_data(tmp_path):
    missing = tmp_path / "nowhere"
    message = assert_data_error(missing, "does not exist", missing)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data_path" in message


def test_folder_without_data_names_the_expected_files(tmp_path):
    message = assert_data_error(tmp_path, "neither mnist.npz", tmp_path)
    assert "train-images-idx3-ubyte" in message


def test_missing_idx_file_is_named(idx_folder):
    folder, paths = idx_folder
    os.remove(paths["y_test"])
    assert_data_error(folder, "missing", folder / "t10k-labels-idx1-ubyte")


def test_wrong_idx_magic_is_reported_with_both_numbers(idx_folder, real):
    folder, paths = idx_folder
    write_idx(paths["x_train"], real.y_train)  # a labels file in its place
    message = assert_data_error(folder, "magic number 2049", paths["x_train"])
    assert "expected 2051" in message


def test_little_endian_header_is_a_wrong_magic(idx_folder, real):
    folder, paths = idx_folder
    header = struct.pack("<II", 0x0801, len(real.y_test))
    with gzip.open(paths["y_test"], "wb") as f:
        f.write(header + real.y_test.astype(np.uint8).tobytes())
    assert_data_error(folder, "expected 2049", paths["y_test"])


def test_truncated_idx_file_is_reported(idx_folder):
    folder, paths = idx_folder
    with gzip.open(paths["x_test"], "rb") as f:
        content = f.read()
    with gzip.open(paths["x_test"], "wb") as f:
        f.write(content[:-100])
    message = assert_data_error(folder, "truncated", paths["x_test"])
    assert f"expected {len(content)}" in message


def test_trailing_bytes_after_the_idx_data_are_reported(idx_folder):
    folder, paths = idx_folder
    with gzip.open(paths["y_train"], "ab") as f:
        f.write(b"\x00\x01")
    assert_data_error(folder, "trailing bytes", paths["y_train"])


def test_image_label_count_mismatch_is_reported(idx_folder, real):
    folder, paths = idx_folder
    write_idx(paths["y_train"], real.y_train[:199])
    message = assert_data_error(folder, "199 labels", paths["y_train"])
    assert "expected 200" in message


def test_empty_split_is_reported(idx_folder):
    folder, paths = idx_folder
    write_idx(paths["x_test"], np.zeros((0, 28, 28)))
    write_idx(paths["y_test"], np.zeros((0,)))
    assert_data_error(folder, "empty split", paths["x_test"])


def test_test_images_of_another_shape_are_reported(idx_folder, real):
    folder, paths = idx_folder
    write_idx(paths["x_test"], real.x_test[:, :27, :27, 0])
    assert_data_error(folder, "(27, 27, 1)", paths["x_test"])


def test_corrupted_gzip_is_reported(idx_folder):
    folder, paths = idx_folder
    with open(paths["x_train"], "wb") as f:
        f.write(b"this is not gzip data at all")
    assert_data_error(folder, "cannot read", paths["x_train"])


def test_cut_gzip_stream_is_reported(idx_folder):
    folder, paths = idx_folder
    with open(paths["x_train"], "rb") as f:
        compressed = f.read()
    with open(paths["x_train"], "wb") as f:
        f.write(compressed[: len(compressed) // 2])
    assert_data_error(folder, "cannot read", paths["x_train"])


def _save_npz(folder, real, **overrides):
    arrays = {"x_train": real.x_train, "y_train": real.y_train,
              "x_test": real.x_test, "y_test": real.y_test}
    arrays.update(overrides)
    arrays = {key: value for key, value in arrays.items() if value is not None}
    path = folder / "mnist.npz"
    np.savez(path, **arrays)
    return path


def test_negative_labels_are_out_of_range(tmp_path, real):
    labels = real.y_train.copy()
    labels[7] = -1
    path = _save_npz(tmp_path, real, y_train=labels)
    assert_data_error(tmp_path, "label -1 out of range", path)


def test_float_labels_are_rejected(tmp_path, real):
    path = _save_npz(tmp_path, real, y_test=real.y_test.astype(np.float32))
    assert_data_error(tmp_path, "dtype float32", path)


def test_npz_missing_keys_are_listed(tmp_path, real):
    path = _save_npz(tmp_path, real, y_test=None)
    message = assert_data_error(tmp_path, "missing key(s) y_test", path)
    assert "found x_train, y_train, x_test" in message


def test_npz_object_arrays_are_refused(tmp_path, real):
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = real.x_test[0], real.x_test[1:3]
    path = _save_npz(tmp_path, real, x_test=ragged)
    message = assert_data_error(tmp_path, "cannot read key x_test", path)
    assert "allow_pickle=False" in message


def test_file_that_is_not_an_npz_archive_is_reported(tmp_path):
    path = tmp_path / "mnist.npz"
    path.write_bytes(b"garbage" * 20)
    assert_data_error(tmp_path, "cannot load", path)


def test_single_npy_array_named_mnist_npz_is_reported(tmp_path, real):
    path = tmp_path / "mnist.npz"
    with open(path, "wb") as f:
        np.save(f, real.x_train)
    assert_data_error(tmp_path, "found a single .npy array", path)


def test_unknown_dataset_kind_is_reported(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_data(str(tmp_path), dataset="mnist")


# --- tensorflow-datasets ------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Fails any socket connection, and records the attempts."""
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError(f"network disabled in tests: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_tfds_data_set_not_prepared_is_an_error_without_download(
    tmp_path, no_network
):
    message = assert_data_error(
        tmp_path, "is not prepared under data_path", tmp_path,
        dataset="tfds:fashion_mnist",
    )
    assert "downloads are disabled" in message
    assert not list(tmp_path.iterdir())  # nothing was downloaded or prepared
    assert no_network == []


def test_tfds_unknown_name_and_missing_data_dir_are_errors(
    tmp_path, no_network
):
    assert_data_error(tmp_path, "not prepared", tmp_path,
                      dataset="tfds:no_such_data_set_here")
    assert_data_error(tmp_path / "absent", "not prepared", tmp_path / "absent",
                      dataset="tfds:mnist")
    assert no_network == []


@pytest.fixture(scope="module")
def prepared_tfds(tmp_path_factory, real):
    """A tfds data set prepared from the real slice, its code unregistered.

    `load_data` then finds it from its files alone, as it would a data set
    prepared on another machine.
    """
    import tensorflow_datasets as tfds

    data_dir = tmp_path_factory.mktemp("tfds")
    with tfds.core.registered.skip_registration():

        class KdFashionSlice(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    features=tfds.features.FeaturesDict({
                        "image": tfds.features.Image(shape=(28, 28, 1)),
                        "label": tfds.features.ClassLabel(num_classes=10),
                    }),
                )

            def _split_generators(self, dl_manager):
                return {
                    "train": self._generate_examples(real.x_train, real.y_train),
                    "test": self._generate_examples(real.x_test, real.y_test),
                }

            def _generate_examples(self, images, labels):
                for i, (image, label) in enumerate(zip(images, labels)):
                    yield i, {"image": image, "label": int(label)}

    # Several shards: tfds interleaves shard files when it reads, and a
    # streamed split must still read example p at position p.
    KdFashionSlice(data_dir=str(data_dir)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=4))
    return data_dir


def test_prepared_tfds_data_set_loads_from_its_files(
    prepared_tfds, real, no_network
):
    data = load_data(str(prepared_tfds), dataset="tfds:kd_fashion_slice",
                     train_size=120)
    assert data.name == "kd_fashion_slice"
    assert data.num_classes == 10 and data.input_shape == (28, 28, 1)
    assert data.y_train.dtype == np.int64
    # tfds shuffles examples when it writes them: compare as sets of pairs.
    assert len(data.x_train) == 120 and len(data.x_test) == 100
    real_pairs = {(x.tobytes(), int(y)) for x, y in zip(real.x_test, real.y_test)}
    got_pairs = {(x.tobytes(), int(y)) for x, y in zip(data.x_test, data.y_test)}
    assert got_pairs == real_pairs
    assert no_network == []


def test_a_tfds_split_over_the_memory_budget_streams_from_its_files(prepared_tfds, real):
    from knowledge_distillation.data.tfds import TfdsImages
    from knowledge_distillation.kd.teacher_cache import cache_key

    streamed = load_data(str(prepared_tfds), dataset="tfds:kd_fashion_slice", memory_budget_bytes=9)
    whole = load_data(str(prepared_tfds), dataset="tfds:kd_fashion_slice")
    assert isinstance(streamed.x_train, TfdsImages) and isinstance(whole.x_train, np.ndarray)
    assert streamed.x_train.shape == whole.x_train.shape
    np.testing.assert_array_equal(streamed.y_train, whole.y_train)  # the same file order
    # Unshuffled: the same images in the same order; shuffled: every image once, labels aligned.
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in
                           make_dataset(streamed.x_train, streamed.y_train, 64)])
    np.testing.assert_array_equal(np.concatenate(images), preprocess(whole.x_train).numpy())
    order = {x.tobytes(): int(y) for x, y in zip(preprocess(whole.x_train).numpy(), whole.y_train)}
    shuffled = make_dataset(streamed.x_train, streamed.y_train, 50, shuffle=True, seed=2)
    pairs = [(x.tobytes(), int(y)) for xb, yb in shuffled for x, y in zip(xb.numpy(), yb.numpy())]
    assert len(pairs) == len(order) and all(order[x] == y for x, y in pairs)
    assert [y for _, y in pairs] != list(whole.y_train)
    # Slices (the teacher cache's chunks, the quantizer's sample) read just those examples.
    for index in ([3, 4, 10, 50, 120, 190], slice(0, 43), slice(57, 100), slice(150, 193)):
        part = streamed.x_train[np.array(index) if isinstance(index, list) else index]
        got = np.concatenate([x.numpy() for x, _ in make_dataset(part, np.zeros(len(part)), 8)])
        np.testing.assert_array_equal(got, preprocess(whole.x_train[index]).numpy())
    teacher = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Dense(3)])
    keys = [cache_key(teacher, x, preprocess)["images"]["files"] for x in (streamed.x_train,
                                                                           streamed.x_train[:10])]
    assert keys[0] != keys[1]


def test_tfds_size_beyond_the_split_is_an_error(prepared_tfds):
    with pytest.raises(DataError, match="split test holds 100 examples"):
        load_data(str(prepared_tfds), dataset="tfds:kd_fashion_slice",
                  test_size=101)


# --- preprocessing and pipelines --------------------------------------------


def test_preprocess_scales_uint8_to_unit_range_and_keeps_floats():
    pixels = np.array([[0, 51, 255]], dtype=np.uint8)
    out = preprocess(pixels)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), [[0.0, 0.2, 1.0]], rtol=1e-6)
    floats = np.array([0.25, 0.5], dtype=np.float64)
    np.testing.assert_array_equal(preprocess(floats).numpy(), [0.25, 0.5])
    with pytest.raises(ValueError, match="got int32"):
        preprocess(np.array([1, 2], dtype=np.int32))


def _epoch_labels(dataset):
    return np.concatenate([batch[1].numpy() for batch in dataset])


def test_unshuffled_pipeline_yields_the_data_in_order(real):
    dataset = make_dataset(real.x_train, real.y_train, 64)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
    assert [len(y) for y in labels] == [64, 64, 64, 8]
    np.testing.assert_array_equal(np.concatenate(labels), real.y_train)
    np.testing.assert_allclose(np.concatenate(images), real.x_train / 255.0,
                               rtol=1e-6)


def test_seeded_shuffle_is_reproducible_and_differs_between_seeds(real):
    # Labels alone can repeat; shuffle an index column carried as `extra`.
    index = np.arange(len(real.x_train))

    def order(seed, epochs=2):
        dataset = make_dataset(real.x_train, real.y_train, 32, shuffle=True,
                               seed=seed, extra=index)
        return [np.concatenate([b[2].numpy() for b in dataset])
                for _ in range(epochs)]

    first, again, other = order(1), order(1), order(2)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[0], first[1])  # reshuffled each epoch
    assert sorted(first[0].tolist()) == index.tolist()  # a permutation


def test_extra_stays_aligned_with_images_and_labels(real):
    index = np.arange(len(real.x_train))
    dataset = make_dataset(real.x_train, real.y_train, 50, shuffle=True,
                           seed=3, extra=index)
    for images, labels, rows in dataset:
        np.testing.assert_array_equal(labels.numpy(), real.y_train[rows])
        np.testing.assert_allclose(images.numpy(),
                                   real.x_train[rows] / 255.0, rtol=1e-6)


def test_drop_remainder_gives_only_full_static_batches(real):
    dataset = make_dataset(real.x_train, real.y_train, 64, shuffle=True,
                           seed=0, drop_remainder=True)
    assert dataset.element_spec[0].shape.as_list() == [64, 28, 28, 1]
    sizes = [len(y) for _, y in dataset]
    assert sizes == [64, 64, 64]
    with pytest.raises(ValueError, match="leaves no batch"):
        make_dataset(real.x_test, real.y_test, 128, drop_remainder=True)


def test_misaligned_arrays_are_refused(real):
    with pytest.raises(ValueError, match="y has 199"):
        make_dataset(real.x_train, real.y_train[:199], 32)
    with pytest.raises(ValueError, match="extra has 10"):
        make_dataset(real.x_train, real.y_train, 32, extra=np.zeros(10))
