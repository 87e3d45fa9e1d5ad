"""ModelZoo entry point: `python knowledge_distillation.py --epoch 5` (the package wins the import)."""
import sys
from knowledge_distillation.cli import main
sys.exit(main())
