"""Image files on disk, read lazily: headers at load time, pixels batch by batch.

`ImageFiles` is a list of image files that stands in for an `(N, H, W, C)`
uint8 array wherever the package takes images: it has `len`, `shape`,
`dtype` and indexing (which returns another `ImageFiles`), and
`data.make_dataset` streams it, decoding and resizing in a parallel
`tf.data` map. Memory holds the paths, each file's size and modification
time, and the height, width and colour channels read from its header, never
the pixels (`read` decodes on request, e.g. for `--cache_images`).

Headers are parsed here, without decoding, for JPEG, PNG, BMP and GIF: an
empty file, a file that is not one of those formats, or a header cut short
is one `DataError` naming the file, before anything trains. A file whose
header is sound but whose pixel data is corrupt fails only when TensorFlow
decodes it; `locate_undecodable` then finds and names it.
"""

import contextlib
import hashlib
import logging
import os
import struct

import numpy as np

from knowledge_distillation.data.base import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types -> channels once alpha is dropped (0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}
# JPEG start-of-frame markers (baseline, progressive, lossless, ...); C4, C8, CC are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_EXPECTED = "expected a JPEG, PNG, BMP or GIF image"


def is_image_file(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def read_header(path):
    """`(height, width, channels)` of an image file from its header (alpha not counted).

    Raises:
        DataError: the file is empty, unreadable, not a JPEG/PNG/BMP/GIF, or
            its header is cut short or names a zero size.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if not head:
                raise DataError(f"{path}: empty file (0 bytes); {_EXPECTED}")
            if head.startswith(_PNG_SIGNATURE):
                shape = _png(head, path)
            elif head[:6] in (b"GIF87a", b"GIF89a"):
                shape = _gif(head, path)
            elif head[:2] == b"BM":
                shape = _bmp(head, path)
            elif head[:2] == b"\xff\xd8":
                shape = _jpeg(f, path)
            else:
                raise DataError(f"{path}: not an image (starts with bytes {head[:8].hex()}); "
                                f"{_EXPECTED}")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); {_EXPECTED}") from None
    if shape[0] <= 0 or shape[1] <= 0:
        raise DataError(f"{path}: header gives size {shape[0]}x{shape[1]}; {_EXPECTED} "
                        "of at least 1x1 pixels")
    return shape


def _short(path, kind):
    return DataError(f"{path}: truncated {kind} header; {_EXPECTED}")


def _png(head, path):
    if len(head) < 26 or head[12:16] != b"IHDR":
        raise _short(path, "PNG")
    width, height = struct.unpack(">II", head[16:24])
    return height, width, _PNG_CHANNELS.get(head[25], 3)


def _gif(head, path):
    if len(head) < 10:
        raise _short(path, "GIF")
    width, height = struct.unpack("<HH", head[6:10])
    return height, width, 3


def _bmp(head, path):
    if len(head) < 30:
        raise _short(path, "BMP")
    width, height = struct.unpack("<ii", head[18:26])
    (bits,) = struct.unpack("<H", head[28:30])
    # TensorFlow decodes 8-bit BMPs as one channel, 24/32-bit as colour.
    return abs(height), width, 1 if bits <= 8 else 3


def _jpeg(f, path):
    f.seek(2)
    while True:
        marker = f.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            raise _short(path, "JPEG")
        kind = marker[1]
        if kind == 0xFF:  # fill byte
            f.seek(-1, os.SEEK_CUR)
            continue
        if kind in (0xD8, 0x01) or 0xD0 <= kind <= 0xD7:  # markers without a length
            continue
        length = f.read(2)
        if len(length) < 2:
            raise _short(path, "JPEG")
        (size,) = struct.unpack(">H", length)
        if kind in _JPEG_SOF:
            frame = f.read(6)
            if len(frame) < 6:
                raise _short(path, "JPEG")
            height, width = struct.unpack(">HH", frame[1:5])
            return height, width, 1 if frame[5] == 1 else 3
        if kind == 0xD9 or size < 2:
            raise _short(path, "JPEG")
        f.seek(size - 2, os.SEEK_CUR)


class ImageFiles:
    """Image files that stand in for an `(N, H, W, C)` uint8 array.

    Args:
        paths: the files, in example order.
        root: the folder they were found under (for messages).
        headers: `(N, 3)` int array of each file's height, width and channels;
            read with `read_header` when not given.
        stats: `(N, 2)` int array of each file's size and modification time
            in nanoseconds; read with `os.stat` when not given.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, paths, root, headers=None, stats=None):
        self.paths = np.asarray(paths, dtype=object)
        self.root = root
        if headers is None:
            headers = [read_header(p) for p in self.paths]
        self.headers = np.asarray(headers, dtype=np.int64).reshape(-1, 3)
        if stats is None:
            stats = [_stat(p) for p in self.paths]
        self.stats = np.asarray(stats, dtype=np.int64).reshape(-1, 2)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            index = [index]
        return ImageFiles(self.paths[index], self.root, self.headers[index], self.stats[index])

    @property
    def sizes(self):
        """`(N, 2)` heights and widths."""
        return self.headers[:, :2]

    @property
    def fixed_size(self):
        """`(H, W)` when every image has that size, else None."""
        if len(self) and (self.sizes == self.sizes[0]).all():
            return tuple(int(v) for v in self.sizes[0])
        return None

    @property
    def channels(self):
        """1 when every image is grayscale, else 3 (colour; alpha is dropped)."""
        return 1 if len(self) and (self.headers[:, 2] == 1).all() else 3

    @property
    def shape(self):
        height, width = self.fixed_size or (None, None)
        return (len(self), height, width, self.channels)

    def first_differing(self):
        """`(path, (h, w), first_path, (h, w))`: the first file whose size differs from the first's."""
        differs = np.flatnonzero((self.sizes != self.sizes[0]).any(axis=1))
        i = int(differs[0])
        return (self.paths[i], tuple(int(v) for v in self.sizes[i]),
                self.paths[0], tuple(int(v) for v in self.sizes[0]))

    def fingerprint(self):
        """Hex digest of the file list: every path, size and modification time, in order."""
        h = hashlib.blake2b(digest_size=16)
        for path, (size, mtime) in zip(self.paths, self.stats):
            h.update(f"{path}\0{size}\0{mtime}\n".encode())
        return h.hexdigest()

    def __repr__(self):
        return f"ImageFiles({len(self)} files under {self.root})"


def _stat(path):
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); {_EXPECTED}") from None
    return st.st_size, st.st_mtime_ns


def decode_file(path):
    """TensorFlow op: the file's first frame as `(H, W, C)` uint8, C as stored (1-4)."""
    import tensorflow as tf

    image = tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False,
                               dtype=tf.uint8)
    image.set_shape([None, None, None])
    return image


def locate_undecodable_in(data):
    """`locate_undecodable` on each split of an `ImageData` that is image files."""
    for split in (data.x_train, data.x_test):
        if isinstance(split, ImageFiles):
            locate_undecodable(split)


@contextlib.contextmanager
def naming_undecodable(data):
    """Turns TensorFlow's decode error inside the block into a `DataError` naming the file."""
    import tensorflow as tf

    try:
        yield
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError):
        locate_undecodable_in(data)
        raise


def conversion_digest():
    """Digest of the code that turns files into pixels (this module and the pipeline's).

    Part of the image and teacher cache keys: editing the decoding, colour
    conversion or resizing invalidates them.
    """
    from knowledge_distillation.data import pipeline

    h = hashlib.blake2b(digest_size=8)
    for module in (__file__, pipeline.__file__):
        with open(module, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def locate_undecodable(files):
    """Decodes each file eagerly; a `DataError` naming the first one TensorFlow cannot decode."""
    import tensorflow as tf

    for path in files.paths:
        try:
            decode_file(tf.constant(path)).numpy()
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
            reason = str(e.message if hasattr(e, "message") else e).strip().splitlines()[0]
            raise DataError(f"{path}: cannot be decoded ({reason}); {_EXPECTED} with intact "
                            "pixel data") from None
    return None
