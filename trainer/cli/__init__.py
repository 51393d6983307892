"""Every console entry point of the trainer package, thin, one module per command family (`train`,
`export`, `sample`, `evaluate`): parse, validate before any process group starts (one-line errors,
exit 2), call the package that does the work, report.

    deepspeed --num_gpus 8 -m trainer.cli --config launch_configs/maskdit_xl2_256.yaml    # mdt-train
    mdt-train --config launch_configs/digits_demo.yaml --set optim.lr=5e-4 --dry-run
    mdt-export runs/NAME/checkpoints/step00010000 --out maskdit_ema.safetensors
    mdt-convert DiT-XL-2-256x256.pt --out dit_xl2.safetensors   # a published release -> our export
    mdt-universal runs/NAME/checkpoints/step00010000   # then resume on another number of ranks
    mdt-sample runs/NAME --per-class 10 --out samples/   (deepspeed ... --module trainer.sample ...)
    mdt-eval samples/samples.npz ref.npz --inception pt_inception-2015-12-05-6726825d.pth
    mdt-eval --history runs/NAME                        # the run's in-loop evaluations as a table
    mdt-study launch_configs/studies/digits.yaml         # variants x seeds under one budget -> study.md

Exit statuses: 0 done, 2 bad input, 3 a training run stopped on a problem a rerun meets again,
4 a stalled rank (the watchdog), 5 a training run stopped on request, 6 a rank that failed on any
other exception (its cause in one line after the traceback).
"""

from .common import OneLineParser
from .evaluate import eval_main, study_main
from .export import convert_main, export_main, universal_main
from .sample import sample_main
from .train import main

__all__ = ["OneLineParser", "eval_main", "study_main", "convert_main", "export_main", "universal_main", "sample_main",
           "main"]
