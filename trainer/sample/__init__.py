"""Sampling from trained weights: the one loader of checkpoints and exports (`loading`), generation
over ranks with seeds per image (`generate`), and latents to pictures (`preview`). Imports nothing
of the training run. `python -m trainer.sample` is `mdt-sample` (for launchers)."""
