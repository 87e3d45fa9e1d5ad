"""Image classification data: MNIST-format files or a prepared tfds data set.

`load_data` reads a folder holding either `mnist.npz` (the Keras layout) or the
four MNIST IDX files, gzipped or not, or a tensorflow-datasets data set that
is already prepared in a `data_dir`. It never downloads. Everything about the
data (image size, channels, class count) is read from the data itself.

`make_dataset` turns the raw arrays into a `tf.data` pipeline; `preprocess`
is the single image preprocessing shared by training, evaluation and the
quantizer's ONNX checks.

Bad data raises `DataError`, whose message is one line naming the file, what
was found and what was expected.

Example:

```python
data = load_data("/usr/share/datasets/fashion-mnist", train_size=1000)
train = make_dataset(data.x_train, data.y_train, 32, shuffle=True, seed=1)
```
"""

from knowledge_distillation.data.base import DataError, ImageData
from knowledge_distillation.data.loading import load_data
from knowledge_distillation.data.mnist import IDX_FILES, NPZ_FILE, TFDS_PREFIX
from knowledge_distillation.data.pipeline import make_dataset, preprocess

__all__ = ["DataError", "IDX_FILES", "ImageData", "NPZ_FILE", "TFDS_PREFIX", "load_data",
           "make_dataset", "preprocess"]
