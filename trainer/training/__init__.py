"""The training run: `Trainer` (trainer) owns the DeepSpeed engine (engine), what is trained
(task), the latent stream (data), the EMA (ema), the monitor (monitor) and sample grids (previews),
the checkpointer (checkpointer), stop requests (stop) and the stall watchdog (watchdog)."""
