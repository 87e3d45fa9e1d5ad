"""`python -m knowledge_distillation`: the knowledge-distillation trainer."""

import sys

from knowledge_distillation.cli import main

if __name__ == "__main__":
    sys.exit(main())
