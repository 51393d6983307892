"""Networks only: DiT, MaskDiT, skip branches and their building blocks (no diffusion maths)."""
