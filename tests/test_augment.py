"""Augmentation shared by teacher and student, the view cache, and the new losses."""

import numpy as np
import pytest
import tensorflow as tf

from knowledge_distillation import config as config_lib
from knowledge_distillation.compat import keras
from knowledge_distillation.data import make_dataset, preprocess
from knowledge_distillation.kd import augment, losses, teacher_cache


def _images(small_data, n=64):
    return small_data.x_train[:n], small_data.y_train[:n]


def test_shift_and_flip_match_pad_crop_by_hand(small_data):
    x, _ = _images(small_data, 8)
    dy = np.array([0, 1, 2, 3, 4, 0, 4, 2], np.int32)
    dx = np.array([4, 3, 2, 1, 0, 0, 4, 2], np.int32)
    flip = np.array([0, 1, 0, 1, 0, 1, 0, 1], bool)
    out = augment.shift_and_flip(tf.constant(x), tf.constant(dy), tf.constant(dx),
                                 tf.constant(flip), 2).numpy()
    padded = np.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)])
    for i in range(len(x)):
        expected = padded[i, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28]
        if flip[i]:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(out[i], expected)
    assert out.dtype == np.uint8
    # Offset (2, 2) is the identity.
    np.testing.assert_array_equal(out[7][:, ::-1], x[7])


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixing_images_and_labels_agree(small_data, mix):
    x, y = _images(small_data, 16)
    images = tf.constant(x, tf.float32) / 255.0
    aug = augment.Augmentation(mix=mix, mix_alpha=1.0)
    mixed, soft = augment.mix_batch(images, tf.constant(y), 10, aug,
                                    tf.constant([3, 7], tf.int64))
    mixed, soft, images = mixed.numpy(), soft.numpy(), images.numpy()
    partner = np.roll(images, 1, axis=0)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
    one_hot, rolled = np.eye(10)[y], np.eye(10)[np.roll(y, 1)]
    # The label weight of an image's own class, where it differs from its partner's.
    own = next(i for i in range(16) if y[i] != np.roll(y, 1)[i])
    lam = soft[own, y[own]]
    np.testing.assert_allclose(soft, lam * one_hot + (1 - lam) * rolled, atol=1e-6)
    if mix == "mixup":
        np.testing.assert_allclose(mixed, lam * images + (1 - lam) * partner, atol=1e-6)
    else:
        from_partner = np.all(mixed == partner, axis=(0, 3)) & ~np.all(mixed == images,
                                                                        axis=(0, 3))
        kept = 1.0 - from_partner.mean()
        # Pixels where the two images agree count as kept; the box is exact otherwise.
        assert kept == pytest.approx(lam, abs=0.05)
        np.testing.assert_array_equal(np.where(from_partner[None, :, :, None], partner, images),
                                      mixed)


def _batches(ds, epochs):
    out = []
    for _ in range(epochs):
        out.append([tuple(np.asarray(t) for t in tf.nest.flatten(b)) for b in ds])
    return out


def test_pipeline_views_are_seeded_per_epoch_and_resume(small_data):
    x, y = _images(small_data)
    aug = augment.Augmentation(shift=2, flip=True, mix="mixup")

    def pipeline(seed=5):
        return make_dataset(x, y, 16, shuffle=True, seed=1,
                            augment=augment.BatchAugment(aug, seed, 10))

    first = pipeline()
    run_a, run_b = _batches(first, 3), _batches(pipeline(), 3)
    for a, b in zip(run_a, run_b):  # same seed: the same views
        for (xa, ya), (xb, yb) in zip(a, b):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(run_a[0][0][0], run_a[1][0][0])  # a new view each epoch
    assert run_a[0][0][1].shape == (16, 10)  # mixed soft labels
    other = _batches(pipeline(seed=6), 1)
    assert not np.array_equal(other[0][0][0], run_a[0][0][0])
    # Resuming at epoch 2 (ResumeEpoch's start_at) continues the stream: with
    # the order fixed, its first iteration is a fresh pipeline's third.
    def fixed(start):
        batch_augment = augment.BatchAugment(aug, 5, 10)
        batch_augment.counter.start_at(start)
        return make_dataset(x, y, 16, augment=batch_augment)

    third = _batches(fixed(0), 3)[2]
    resumed = _batches(fixed(2), 1)[0]
    for (xa, ya), (xb, yb) in zip(third, resumed):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert len(resumed) == int(fixed(0).cardinality()) == 4


def test_view_table_cycles_views_and_feeds_the_teachers_own_logits(small_data, tmp_path):
    x, y = _images(small_data, 48)
    teacher = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(10, kernel_initializer="glorot_uniform")])
    aug = augment.Augmentation(shift=2, flip=True)
    table = augment.ViewTable(aug, seed=3, num_classes=10, num_examples=len(x), views=3,
                              epochs=6)
    # Every block of 3 epochs uses each of the 3 views of every image once.
    for block in (table.choice[:3], table.choice[3:6]):
        np.testing.assert_array_equal(np.sort(block, axis=0),
                                      np.tile(np.arange(3)[:, None], (1, len(x))))

    def predict(images, geometry):
        ds = make_dataset(images, np.zeros(len(images), np.int64), 20, geometry=geometry)
        return np.concatenate([teacher(b, training=False).numpy() for b, _ in ds])

    outputs = teacher_cache.teacher_outputs(teacher, x, predict, cache_dir=str(tmp_path),
                                            views=table, chunk_examples=20)
    assert outputs.array.shape == (48, 3, 10)
    table.attach(outputs)
    ds = make_dataset(x, y, 16, shuffle=True, seed=1, augment=table)
    for epoch in range(4):
        for images, labels, logits in ds:
            np.testing.assert_allclose(teacher(images, training=False).numpy(), logits.numpy(),
                                       rtol=1e-5, atol=1e-5)
    # The key covers the views: another K or seed is another cache.
    other = augment.ViewTable(aug, seed=4, num_classes=10, num_examples=len(x), views=3,
                              epochs=6)
    assert (teacher_cache.cache_key(teacher, x, preprocess, views=other)
            != teacher_cache.cache_key(teacher, x, preprocess, views=table) == outputs.key)
    again = teacher_cache.teacher_outputs(teacher, x, predict, cache_dir=str(tmp_path),
                                          views=table, chunk_examples=20)
    assert again.source == "reused"
    with pytest.raises(ValueError, match="mixing pairs images"):
        augment.ViewTable(augment.Augmentation(flip=True, mix="cutmix"), 1, 10, 8, 2, 2)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _pearson_rows(a, b):
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def test_dist_and_kl_losses_match_hand_computation():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(8, 10)) * 3, rng.normal(size=(8, 10)) * 3
    for temperature in (1.0, 4.0):
        pt, ps = _softmax(t / temperature), _softmax(s / temperature)
        inter = 1 - _pearson_rows(ps, pt).mean()
        intra = 1 - _pearson_rows(ps.T, pt.T).mean()
        value = losses.DISTLoss(temperature, beta=2.0, gamma=0.5).compute_loss(
            tf.constant(t, tf.float32), tf.constant(s, tf.float32))
        assert float(value) == pytest.approx(temperature ** 2 * (2.0 * inter + 0.5 * intra),
                                             rel=1e-4)
    # A student that orders classes and examples as the teacher does costs nothing.
    assert float(losses.DISTLoss().compute_loss(tf.constant(t), tf.constant(t))) == \
        pytest.approx(0.0, abs=1e-5)
    pt, ps = _softmax(t), _softmax(s)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(axis=1).mean()
    value = losses.distillation_loss("kl").compute_loss(tf.constant(t), tf.constant(s))
    assert float(value) == pytest.approx(kl, rel=1e-5)
    assert losses.distillation_loss("kd").temperature == 10.0
    assert losses.distillation_loss("dist").temperature == 1.0
    with pytest.raises(ValueError, match="KL at T=1"):
        losses.distillation_loss("kl", 4.0)
    restored = losses.DISTLoss.from_config(losses.DISTLoss(2.0, 1.5, 0.5).get_config())
    assert (restored.temperature, restored.beta, restored.gamma) == (2.0, 1.5, 0.5)


def test_label_crossentropy_takes_soft_and_integer_labels():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], np.float32)
    soft = np.array([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]], np.float32)
    log_p = np.log(_softmax(logits))
    loss = losses.LabelCrossentropy()
    assert float(loss(soft, logits)) == pytest.approx(-(soft * log_p).sum(1).mean(), rel=1e-6)
    assert float(loss(np.array([0, 2]), logits)) == pytest.approx(
        -(log_p[0, 0] + log_p[1, 2]) / 2, rel=1e-6)
    acc = losses.label_accuracy(tf.constant(soft), tf.constant(logits[::-1].copy())).numpy()
    np.testing.assert_array_equal(acc, [0.0, 0.0])


@pytest.mark.parametrize("kwargs, message", [
    ({"augment_mix": "mixup"}, "--augment_mix set without --augment"),
    ({"teacher_views": 4}, "--teacher_views set without --augment"),
    ({"augment": True, "teacher_views": 4, "augment_mix": "cutmix"}, "cannot be cached"),
    ({"augment": True, "teacher_views": 2, "cache_teacher": False}, "--nocache_teacher"),
    ({"augment": True, "teacher_image_size": (32, 32)}, "--teacher_image_size"),
    ({"distillation_loss": "kl", "temperature": 4.0}, "KL at T=1"),
    ({"distillation_loss": "dist2"}, "--distillation_loss must be one of"),
])
def test_augment_and_loss_flags_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        config_lib.TrainConfig(**kwargs)


def test_a_shift_as_large_as_the_image_is_refused(fashion_mnist_path, tmp_path):
    from knowledge_distillation.inputs import prepare_inputs

    def inputs(shift, size=None):
        return prepare_inputs(config_lib.TrainConfig(
            data_path=fashion_mnist_path, train_size=64, test_size=32, augment=True,
            augment_shift=shift, image_size=size, output_dir=str(tmp_path)))

    assert inputs(27).input_shape == (28, 28, 1)
    with pytest.raises(ValueError, match=r"--augment_shift 28: the model input is 28x28; a "
                                         r"shift must be smaller than the image, at most 27"):
        inputs(28)
    with pytest.raises(ValueError, match=r"--augment_shift 20: the model input is 20x20"):
        inputs(20, (20, 20))


def test_keras_fit_iterates_the_pipeline_once_per_epoch(small_data):
    # The epoch counter relies on it: a resumed run's views depend on it.
    x, y = _images(small_data, 128)
    batch_augment = augment.BatchAugment(augment.Augmentation(shift=2, flip=True), 1, 10)
    ds = make_dataset(x, y, 32, shuffle=True, seed=1, augment=batch_augment)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=2)
    model.fit(ds, epochs=3, verbose=0,
              callbacks=[augment.ResumeEpoch(batch_augment.counter, lambda model: 1)])
    assert batch_augment.counter._next == 4  # started at epoch 1 (as if resumed), ran 3
