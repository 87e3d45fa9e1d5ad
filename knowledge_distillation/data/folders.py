"""Image folders: class subfolders, or a flat folder with a label list.

Two layouts, as Keras' `image_dataset_from_directory`, torchvision's
`ImageFolder` and ImageNet's `val.txt` tooling use them:

1. class subfolders: `DIR/train/<class>/...` and `DIR/test/<class>/...`
   (`val/` accepted in place of `test/`). Classes are the subfolder names of
   `train/` in sorted order; files are found recursively, in sorted order.
2. a flat folder of images plus a label list: one `<file name> <class index>`
   per line, file names relative to `DIR`.

Files are JPEG, PNG, BMP or GIF (by extension, any case); other files are
ignored. Only headers are read here (see `images.py`).
"""

import logging
import os

import numpy as np

from knowledge_distillation.data.base import DataError, ImageData
from knowledge_distillation.data.images import ImageFiles, is_image_file, read_header

logger = logging.getLogger(__name__)

TEST_SPLITS = ("test", "val")
_PROGRESS_EVERY = 20000
# train_size/test_size on image folders take this fixed sample (the same every
# run), not the first N files, which would be the first classes only.
SAMPLE_SEED = 0


def has_class_folders(data_path):
    return os.path.isdir(os.path.join(data_path, "train"))


def is_flat_image_folder(data_path):
    """A folder holding image files itself (and no train/ split)."""
    return not has_class_folders(data_path) and any(
        is_image_file(entry) and os.path.isfile(os.path.join(data_path, entry))
        for entry in os.listdir(data_path))


def _headers(paths, root):
    headers = []
    for i, path in enumerate(paths):
        headers.append(read_header(path))
        if (i + 1) % _PROGRESS_EVERY == 0:
            logger.info("%s: read %d of %d image headers", root, i + 1, len(paths))
    return headers


def _files(paths, root):
    return ImageFiles(paths, root, headers=_headers(paths, root))


def _walk_images(folder):
    found = []
    for current, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        found.extend(os.path.join(current, name) for name in sorted(names) if is_image_file(name))
    return found


def _class_split(split_dir, classes=None):
    names = sorted(entry for entry in os.listdir(split_dir)
                   if os.path.isdir(os.path.join(split_dir, entry)))
    if not names:
        raise DataError(f"{split_dir}: holds no class subfolders; expected {split_dir}/<class>/ "
                        "folders of images")
    loose = [name for name in os.listdir(split_dir)
             if is_image_file(name) and os.path.isfile(os.path.join(split_dir, name))]
    if loose:
        logger.warning("%s: %d image file(s) outside the class subfolders are ignored (e.g. %s)",
                       split_dir, len(loose), sorted(loose)[0])
    if classes is None:
        classes = names
    else:
        unknown = [name for name in names if name not in classes]
        if unknown:
            raise DataError(
                f"{os.path.join(split_dir, unknown[0])}: class {unknown[0]!r} is not in "
                f"{os.path.join(os.path.dirname(split_dir), 'train')} (which has "
                f"{', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); expected "
                "the test classes to be training classes")
    paths, labels = [], []
    for name in names:
        found = _walk_images(os.path.join(split_dir, name))
        if not found:
            raise DataError(f"{os.path.join(split_dir, name)}: empty class folder, no JPEG, PNG, "
                            "BMP or GIF files; expected at least one image per class")
        paths.extend(found)
        labels.extend([classes.index(name)] * len(found))
    return paths, np.asarray(labels, np.int64), classes


def _sample(files, labels, size, flag, source):
    if size is None:
        return files, labels
    if size > len(files):
        raise DataError(f"{source}: holds {len(files)} images; {flag}={size} asks for more")
    index = np.sort(np.random.default_rng(SAMPLE_SEED).choice(len(files), size, replace=False))
    return files[index], labels[index]


def load_class_folders(data_path, train_size=None, test_size=None):
    """`ImageData` of `DIR/train/<class>/*` and `DIR/test/<class>/*` (or `DIR/val/`)."""
    train_dir = os.path.join(data_path, "train")
    test_dirs = [os.path.join(data_path, s) for s in TEST_SPLITS
                 if os.path.isdir(os.path.join(data_path, s))]
    if not test_dirs:
        raise DataError(f"{data_path}: has train/ but neither test/ nor val/; expected "
                        f"{data_path}/test/<class>/ (or val/) folders of test images")
    if len(test_dirs) > 1:
        logger.info("%s: has both test/ and val/: testing on test/", data_path)
    train_paths, train_labels, classes = _class_split(train_dir)
    test_paths, test_labels, _ = _class_split(test_dirs[0], classes)
    train, train_labels = _sample(_files(train_paths, train_dir), train_labels, train_size,
                                  "train_size", train_dir)
    test, test_labels = _sample(_files(test_paths, test_dirs[0]), test_labels, test_size,
                                "test_size", test_dirs[0])
    name = os.path.basename(os.path.normpath(os.path.abspath(data_path)))
    _log_loaded(name, data_path, train, test, len(classes))
    return ImageData(x_train=train, y_train=train_labels, x_test=test, y_test=test_labels,
                     num_classes=len(classes), name=name, class_names=tuple(classes))


def find_labels_file(labels_file, data_path, flag):
    """The label list's path: as given, else relative to `data_path`."""
    if os.path.isfile(labels_file):
        return labels_file
    inside = os.path.join(data_path, labels_file)
    if not os.path.isabs(labels_file) and os.path.isfile(inside):
        return inside
    raise DataError(f"{flag}={labels_file}: no such file (looked in the working folder and in "
                    f"{data_path}); expected a list of '<file name> <class index>' lines")


def read_label_list(labels_file, data_path, flag="--labels_file"):
    """`(paths, labels)` from a `<file name> <class index>` list; names relative to `data_path`."""
    path = find_labels_file(labels_file, data_path, flag)
    paths, labels = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(None, 1)
            where = f"{path} line {number}"
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{where}: {text!r}; expected '<file name> <class index>'")
            name, label = parts[0], int(parts[1])
            if label < 0:
                raise DataError(f"{where}: label {label} out of range; expected class "
                                "indices >= 0")
            image = os.path.join(data_path, name)
            if not os.path.isfile(image):
                raise DataError(f"{where}: names {name}, which is not a file in {data_path}; "
                                "expected file names relative to --data_path")
            paths.append(image)
            labels.append(label)
    if not paths:
        raise DataError(f"{path}: no '<file name> <class index>' lines; expected at least one")
    return path, paths, np.asarray(labels, np.int64)


def check_labels_below(labels, num_classes, source, what):
    """A `DataError` naming the first label >= `num_classes`."""
    high = np.flatnonzero(labels >= num_classes)
    if len(high):
        raise DataError(f"{source}: label {int(labels[high[0]])} (entry {int(high[0]) + 1}) out "
                        f"of range; expected 0..{num_classes - 1} ({what})")


def load_label_lists(data_path, labels_file, test_labels_file, train_size=None, test_size=None):
    """`ImageData` of a flat folder: the training list and the test list."""
    if not os.path.isdir(data_path):
        raise DataError(f"--data_path={data_path}: not a folder; expected the folder the label "
                        "lists name files in")
    train_list, train_paths, train_labels = read_label_list(labels_file, data_path)
    test_list, test_paths, test_labels = read_label_list(test_labels_file, data_path,
                                                         "--test_labels_file")
    num_classes = int(train_labels.max()) + 1
    check_labels_below(test_labels, num_classes, test_list,
                       f"the {num_classes} classes of {train_list}")
    train, train_labels = _sample(_files(train_paths, data_path), train_labels, train_size,
                                  "train_size", train_list)
    test, test_labels = _sample(_files(test_paths, data_path), test_labels, test_size,
                                "test_size", test_list)
    name = os.path.basename(os.path.normpath(os.path.abspath(data_path)))
    _log_loaded(name, data_path, train, test, num_classes)
    return ImageData(x_train=train, y_train=train_labels, x_test=test, y_test=test_labels,
                     num_classes=num_classes, name=name)


def load_flat_folder(data_path, labels_file=None, test_size=None):
    """One folder for the quantizer: calibration and test on the same images.

    With a label list, both splits are its files (the log says they
    overlap). Without one, every image directly in `data_path` calibrates
    and there are no labels: `ImageData.labelled` is False.
    """
    if not os.path.isdir(data_path):
        raise DataError(f"--data_path={data_path}: not a folder; expected a folder of images")
    name = os.path.basename(os.path.normpath(os.path.abspath(data_path)))
    if labels_file:
        source, paths, labels = read_label_list(labels_file, data_path)
        num_classes, labelled = int(labels.max()) + 1, True
    else:
        paths = sorted(os.path.join(data_path, entry) for entry in os.listdir(data_path)
                       if is_image_file(entry) and os.path.isfile(os.path.join(data_path, entry)))
        if not paths:
            raise DataError(f"--data_path={data_path}: no JPEG, PNG, BMP or GIF files, no "
                            "train/ class folders and no MNIST files; expected images")
        source, labels, num_classes, labelled = data_path, np.zeros(len(paths), np.int64), None, False
    files = _files(paths, data_path)
    test, test_labels = _sample(files, labels, test_size, "test_size", source)
    logger.info("loaded %s from %s: %d images%s; the same images calibrate and test", name,
                source, len(files), f", {num_classes} classes" if labelled else ", no labels")
    return ImageData(x_train=files, y_train=labels, x_test=test, y_test=test_labels,
                     num_classes=num_classes, name=name, labelled=labelled, test_is_train=True)


def _log_loaded(name, origin, train, test, num_classes):
    def sizes(files):
        fixed = files.fixed_size
        return f"{fixed[0]}x{fixed[1]}" if fixed else "mixed sizes"

    logger.info("loaded %s from %s: %d train (%s) / %d test (%s) images, %s, %d classes", name,
                origin, len(train), sizes(train), len(test), sizes(test),
                "grayscale" if train.channels == 1 else "colour", num_classes)
