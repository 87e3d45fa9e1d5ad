"""Real images on disk for the tests: Fashion-MNIST written out as PNG, JPEG, BMP and GIF.

PNG and JPEG come from TensorFlow's encoders; BMP (uncompressed 24-bit) and
GIF (a 256-gray palette, LZW with a clear code often enough that codes stay
9 bits wide) are written by hand, as TensorFlow has no encoder for them.
"""

import os
import struct

import numpy as np
import tensorflow as tf

FORMATS = ("png", "jpg", "bmp", "gif")


def resized(image, size):
    """uint8 `(H, W, C)` resized to `size` (bilinear, rounded)."""
    out = tf.image.resize(image, size).numpy()
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def encode(image, fmt):
    """The file bytes of uint8 `(H, W, C)` (C = 1, 3 or 4) in format `fmt`."""
    if fmt == "png":
        return tf.io.encode_png(image).numpy()
    if fmt == "jpg":
        return tf.io.encode_jpeg(image[..., :3] if image.shape[-1] == 4 else image,
                                 quality=95).numpy()
    if fmt == "bmp":
        return _bmp(image[..., :3] if image.shape[-1] >= 3 else np.repeat(image, 3, -1))
    if fmt == "gif":
        return _gif(image[..., 0] if image.shape[-1] == 1 else
                    np.round(image[..., :3].astype(np.float32) @ [0.2989, 0.587, 0.114])
                    .clip(0, 255).astype(np.uint8))
    raise ValueError(fmt)


def _bmp(rgb):
    height, width, _ = rgb.shape
    row = (width * 3 + 3) // 4 * 4
    pixels = bytearray()
    for y in range(height - 1, -1, -1):  # bottom-up
        line = rgb[y, :, ::-1].tobytes()  # BGR
        pixels += line + b"\0" * (row - len(line))
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + info + bytes(pixels)


def _gif(gray):
    height, width = gray.shape
    palette = bytes(v for g in range(256) for v in (g, g, g))
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", width, height, 0xF7, 0, 0) + palette)
    out += b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + bytes([8])
    clear, end = 256, 257
    codes = [clear]
    for i, value in enumerate(gray.reshape(-1)):
        if i and i % 250 == 0:
            codes.append(clear)
        codes.append(int(value))
    codes.append(end)
    bits, nbits, data = 0, 0, bytearray()
    for code in codes:
        bits |= code << nbits
        nbits += 9
        while nbits >= 8:
            data.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8
    if nbits:
        data.append(bits & 0xFF)
    for start in range(0, len(data), 255):
        chunk = data[start:start + 255]
        out += bytes([len(chunk)]) + chunk
    out += b"\0;"
    return bytes(out)


def write_image(path, image, fmt=None):
    fmt = fmt or os.path.splitext(path)[1][1:]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(encode(image, fmt))


def mode(image, kind):
    """Fashion-MNIST's gray `(H, W, 1)` as gray, rgb or rgba."""
    if kind == "gray":
        return image
    rgb = np.concatenate([image] * 3, -1)
    return rgb if kind == "rgb" else np.concatenate([rgb, np.full_like(image, 200)], -1)


def write_class_folders(root, splits, sizes=(28, 36, 44), kinds=("gray", "rgb", "rgba"),
                        formats=("png",)):
    """Writes `root/<split>/class_<label>/<i>.<fmt>` for each `(split, x, y)`.

    Image i gets size `sizes[i % len(sizes)]`, colour mode `kinds[i % ...]`
    and format `formats[i % ...]` (JPEG only for lossless-insensitive tests).
    Returns `{split: [(path, label, size, kind), ...]}`.
    """
    written = {}
    for split, x, y in splits:
        entries = []
        for i, (image, label) in enumerate(zip(x, y)):
            size = sizes[i % len(sizes)]
            kind = kinds[i % len(kinds)]
            fmt = formats[i % len(formats)]
            path = os.path.join(root, split, f"class_{int(label)}", f"{i:05d}.{fmt}")
            write_image(path, mode(resized(image, (size, size)), kind), fmt)
            entries.append((path, int(label), size, kind))
        written[split] = entries
    return written
