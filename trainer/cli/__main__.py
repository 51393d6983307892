"""`python -m trainer.cli` is mdt-train (what the deepspeed launcher's --module runs)."""

import sys

from .train import main

sys.exit(main())
