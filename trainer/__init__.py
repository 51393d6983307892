"""The trainer: diffusion maths, the launch config, checkpoints, the training run, sampling and
evaluation, one package each (docs/ARCHITECTURE.md); console entry points in trainer.cli."""
