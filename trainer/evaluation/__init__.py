"""Judging generated images: FID with the TensorFlow FID graph's Inception (`fid`), the Frechet
distance (`frechet`), image sets (`images`), the digits demo's judge (`digits`) and the metric
registry behind `mdt-eval` (`metrics`). Imports nothing of the training run."""
