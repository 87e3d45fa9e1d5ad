"""`python -m knowledge_distillation.quant`: block-distillation quantization."""

import sys

from knowledge_distillation.quant.quantize_cli import main

if __name__ == "__main__":
    sys.exit(main())
