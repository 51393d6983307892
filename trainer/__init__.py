"""The trainer: diffusion maths, data stream, DeepSpeed engine, loop, sampling and evaluation."""
