"""The metric library: the metric registry (`registry`: every metric's name, group, direction and
print format), FID with the TensorFlow FID graph's Inception (`fid`), the Frechet distance
(`frechet`), image sets (`images`), the held-out judges (`judge`; the digits demo's `digits`,
MNIST's `mnist`), `mdt-eval`'s computation (`metrics`) and a run's metrics.jsonl (`history`). Below
the training run (its evaluator imports this package) and below the study (`trainer.study`);
imports nothing of either."""
