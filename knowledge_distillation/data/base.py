"""`ImageData`, `DataError`, and the checks of loaded arrays.

Every failure is one `DataError` line naming the file.
"""

import dataclasses
import logging
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
    """An image classification data set: in-memory arrays or image files.

    Attributes:
        x_train: training images, `(N, H, W, C)`, channels-last, in the dtype
            they were stored in (uint8 for MNIST files), or `ImageFiles`
            (decoded batch by batch; H and W are None when sizes differ).
        y_train: training labels, `(N,)` int64.
        x_test: test images, like `x_train`.
        y_test: test labels, like `y_train`.
        num_classes: number of classes, read from the data.
        name: the data set's name (the folder name, or the tfds name).
        class_names: the class folder names, when the data has them.
        labelled: False for a folder of images without labels (the
            quantizer calibrates on it, and nothing is evaluated).
        test_is_train: the test split is (a sample of) the training split.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: Optional[int]
    name: str
    class_names: Optional[tuple] = None
    labelled: bool = True
    test_is_train: bool = False

    @property
    def input_shape(self) -> tuple:
        """The shape of one image, `(H, W, C)`."""
        return tuple(self.x_train.shape[1:])


class DataError(ValueError):
    """Bad or missing data.

    `str(e)` is one line naming the file, what was found and what was
    expected; any line breaks in the message are folded into spaces.
    """

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


def _check_images(x, source):
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4:
        raise DataError(
            f"{source}: images of shape {x.shape}; expected (N, H, W) or "
            "(N, H, W, C)"
        )
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(
            f"{source}: images of dtype {x.dtype}; expected uint8 (0..255) or "
            "floating point (already scaled)"
        )
    if len(x) == 0:
        raise DataError(f"{source}: empty split, 0 images; expected at least 1")
    if np.issubdtype(x.dtype, np.floating):
        finite = np.isfinite(x)
        if not finite.all():
            index = np.unravel_index(int(np.argmin(finite)), x.shape)
            raise DataError(
                f"{source}: image {index[0]} holds {x[index]} at {tuple(int(i) for i in index[1:])}; "
                "expected finite pixel values")
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            logger.warning(
                "%s: floating-point images range over [%g, %g]; they are used as they are, "
                "taken as already scaled (uint8 images are divided by 255). If they are "
                "0-255 pixel values, save them as uint8 or divide them by 255", source, low, high)
    return x


def _check_labels(y, source, num_images, images_source):
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{source}: labels of shape {y.shape}; expected (N,)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{source}: labels of dtype {y.dtype}; expected integer class ids"
        )
    if len(y) != num_images:
        raise DataError(
            f"{source}: {len(y)} labels; expected {num_images}, one per image "
            f"in {images_source}"
        )
    if len(y) and y.min() < 0:
        raise DataError(
            f"{source}: label {int(y.min())} out of range; expected class ids "
            ">= 0"
        )
    return y.astype(np.int64)


def check_label_range(labels, num_classes, source):
    """Warns when the class count the labels imply looks wrong: one class, or unused ids."""
    present = np.unique(np.concatenate([np.asarray(y) for y in labels]))
    if len(present) == 1:
        logger.warning("%s: every label is %d: a single class; a classifier learns nothing "
                       "from it", source, int(present[0]))
    elif num_classes > 2 * len(present):
        logger.warning(
            "%s: labels go up to %d, so the model gets %d outputs, but only %d distinct "
            "labels occur (%s); check the label ids", source, num_classes - 1, num_classes,
            len(present), ", ".join(str(int(v)) for v in present[:10])
            + (", ..." if len(present) > 10 else ""))


def _check_same_image_shape(images, sources):
    train_shape, test_shape = images["train"].shape[1:], images["test"].shape[1:]
    if train_shape != test_shape:
        raise DataError(
            f"{sources['x_test']}: images of shape {test_shape}; expected "
            f"{train_shape} like {sources['x_train']}"
        )


def _take(array, size, arg, source):
    if size is not None and size > len(array):
        raise DataError(
            f"{source}: holds {len(array)} examples; {arg}={size} asks for more"
        )
    # A copy: writable, and a slice does not pin the whole file's buffer.
    return array[:size].copy()
