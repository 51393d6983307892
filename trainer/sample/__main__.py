"""`python -m trainer.sample` = `mdt-sample`, for launchers that run modules:
`deepspeed --num_gpus 8 --module trainer.sample CHECKPOINT --num-images 50000 --out DIR`."""

import sys

from trainer.cli import sample_main

sys.exit(sample_main())
