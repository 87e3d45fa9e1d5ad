"""Image classification data: MNIST-format files, image folders, or a prepared tfds set.

`load_data` reads a folder holding either `mnist.npz` (the Keras layout) or the
four MNIST IDX files, gzipped or not, a folder of class subfolders or a flat
image folder with label lists (`data/folders.py`), or a tensorflow-datasets
data set that is already prepared in a `data_dir`. It never downloads.
Everything about the data (image size, channels, class count) is read from
the data itself; image files stay on disk and stream batch by batch.

`make_dataset` turns arrays or image files into a `tf.data` pipeline through
an `ImageView` (resize, colour mode, scaling); `preprocess` is the single
image preprocessing shared by training, evaluation and the quantizer's ONNX
checks.

Bad data raises `DataError`, whose message is one line naming the file, what
was found and what was expected.

Example:

```python
data = load_data("/usr/share/datasets/fashion-mnist", train_size=1000)
train = make_dataset(data.x_train, data.y_train, 32, shuffle=True, seed=1)
```
"""

from knowledge_distillation.data.base import DataError, ImageData
from knowledge_distillation.data.cache import cached_images
from knowledge_distillation.data.folders import (
    check_labels_below, is_flat_image_folder, load_flat_folder)
from knowledge_distillation.data.images import (
    ImageFiles, conversion_digest, locate_undecodable, locate_undecodable_in, naming_undecodable)
from knowledge_distillation.data.loading import has_mnist_files, load_data, model_input_shape
from knowledge_distillation.data.mnist import IDX_FILES, NPZ_FILE, TFDS_PREFIX
from knowledge_distillation.data.pipeline import (
    INTERPOLATIONS, PREPROCESSINGS, ImageView, convert_images, make_dataset, preprocess)

__all__ = ["cached_images", "check_labels_below", "conversion_digest", "DataError",
           "has_mnist_files", "is_flat_image_folder", "locate_undecodable_in",
           "naming_undecodable", "IDX_FILES", "INTERPOLATIONS", "ImageData", "ImageFiles", "ImageView",
           "NPZ_FILE", "PREPROCESSINGS", "TFDS_PREFIX", "convert_images", "load_data",
           "load_flat_folder", "locate_undecodable", "make_dataset", "model_input_shape",
           "preprocess"]
