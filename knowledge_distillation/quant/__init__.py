"""Block-distillation quantization of Keras models, in AMCT's formats.

Steps (each usable alone), as in AMCT's sample:

```python
from knowledge_distillation import quant

config = quant.create_distill_config(model, simple_config_text)  # or None
config.save("tmp/distill_config.json")
qmodel = quant.create_quant_model(model, config)
quant.distill(qmodel, calibration_images, epochs=1)
quant.save_quant_model(qmodel, "output", "my_model")
```

or all at once, with evaluation: `quant.quantize_model(model, data, "output")`.
Command line: `python -m knowledge_distillation.quant --model m.keras`.

Keras 3 only: on the Keras 2.6 (Ascend) stack, importing it is one clear
error. Quantize on a Keras 3 host; it loads the `.h5` models that stack writes.
"""

import os
import sys

from knowledge_distillation import compat

if not compat.KERAS3:
    _WHY = (f"knowledge_distillation.quant needs Keras 3 (TensorFlow 2.16+ on Python 3.10+); "
            f"this is {compat.STACK}. Quantize on a Keras 3 host: it loads the .h5 models "
            "this stack writes")
    # `python -m knowledge_distillation.quant` (argv[0] is "-m" while Python
    # imports the package) and the kd-quantize script: one line, exit 2.
    if os.path.basename(sys.argv[0]) in ("-m", "kd-quantize"):
        print(f"python -m knowledge_distillation.quant: error: {_WHY}", file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(_WHY)

from knowledge_distillation.quant.quantize import (
    compare_logits,
    keras_logits,
    onnx_logits,
    onnx_session,
    output_paths,
    quantize_model,
    save_quant_model,
    topk_accuracy,
)
from knowledge_distillation.quant.quantize_build import QuantizedModel, create_quant_model
from knowledge_distillation.quant.quantize_config import (
    DistillConfig,
    DistillSimpleConfig,
    LayerConfig,
    create_distill_config,
    load_simple_config,
    parse_simple_config,
)
from knowledge_distillation.quant.quantize_distill import distill
from knowledge_distillation.quant.quantize_layers import QuantizedLayer, QuantState
from knowledge_distillation.quant.quantize_onnx import build_onnx, deploy_activation_dtype, save_onnx
from knowledge_distillation.quant.quantize_record import (
    load_record,
    parse_record,
    record_to_text,
    save_record,
)

__all__ = [
    "DistillConfig",
    "DistillSimpleConfig",
    "LayerConfig",
    "QuantState",
    "QuantizedLayer",
    "QuantizedModel",
    "build_onnx",
    "compare_logits",
    "create_distill_config",
    "create_quant_model",
    "deploy_activation_dtype",
    "distill",
    "keras_logits",
    "load_record",
    "load_simple_config",
    "onnx_logits",
    "onnx_session",
    "output_paths",
    "parse_record",
    "parse_simple_config",
    "quantize_model",
    "record_to_text",
    "save_onnx",
    "save_quant_model",
    "save_record",
    "topk_accuracy",
]
