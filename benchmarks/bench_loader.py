"""Latent loader throughput against bare webdataset iteration over the same shards.

    python benchmarks/bench_loader.py [--samples 8192] [--shard-size 512] [--batch-size 256]
                                      [--workers 1 2] [--rounds 3] [--data DIR]

Without ``--data`` it writes synthetic shards shaped like ImageNet-256 SD-VAE latents
(4x32x32 mean+std float16, plus the flipped copy) to a temporary directory. Pipelines, each run
over the same shards with the same worker count and batch size (median of ``--rounds``):

- ``wds bare``: ``WebDataset(urls).to_tuple("latent.npy", "cls").batched(B)``, bytes only.
- ``wds decode``: the same plus ``.decode()`` (npy -> numpy) and default collation.
- ``ours``: trainer.training.data.build_latent_loader (shuffle buffer, flip choice, validation, posterior
  sampling, float32 batches), one pass (``resampled=False``) and resampled epoch mode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_tools.format import MANIFEST_NAME, TAR_WRITER_OPTIONS, encode_sample, make_key  # noqa: E402
from data_tools.manifest import Manifest, ShardInfo, sha256_file  # noqa: E402
from trainer.training.data import build_latent_loader  # noqa: E402


def write_synthetic(out: str, samples: int, shard_size: int, shape=(4, 32, 32)) -> list[str]:
    """Write latent shards plus a manifest with random moments; return the shard paths."""
    from webdataset import ShardWriter

    rng = np.random.default_rng(0)
    names: list[str] = []
    with ShardWriter(os.path.join(out, "bench-%06d.tar"), maxcount=shard_size, verbose=0,
                     post=names.append, **TAR_WRITER_OPTIONS) as writer:
        for i in range(samples):
            moments = np.stack([rng.standard_normal(shape), np.full(shape, 0.05)]).astype(np.float16)
            writer.write(encode_sample(make_key(i), moments, i % 1000, {"index": i}, moments[:, :, :, ::-1]))
    shards = [ShardInfo(os.path.basename(n), min(shard_size, samples - k * shard_size), os.path.getsize(n),
                        sha256_file(n)) for k, n in enumerate(names)]
    manifest = Manifest(latent=dict(shape=list(shape), moments=["mean", "std"], dtype="float16"),
                        scaling_factor=0.18215, encoder=dict(kind="synthetic", id="bench"),
                        source=dict(spec="synthetic"), resolution=256, has_flip=True, num_classes=1000,
                        num_samples=samples, shards=shards)
    with open(os.path.join(out, MANIFEST_NAME), "w") as handle:
        handle.write(manifest.to_json())
    return names


def _wds(urls: list[str], batch: int, workers: int, decode: bool):
    import webdataset as wds
    from torch.utils.data import DataLoader

    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    if decode:
        ds = ds.decode()
    ds = ds.to_tuple("latent.npy", "cls").batched(batch, collation_fn=None if not decode else
                                                  wds.filters.default_collation_fn)
    return DataLoader(ds, batch_size=None, num_workers=workers)


def _count(loader, kind: str) -> int:
    n = 0
    for batch in loader:
        # wds bare batches are lists of (bytes, bytes), ours are Batch objects (len: samples), the
        # decoded wds ones are (latents, labels).
        n += len(batch) if kind in ("bare", "ours") else len(batch[1])
    return n


def measure(make, kind: str, rounds: int) -> tuple[float, int]:
    """Median samples/s over ``rounds`` full passes of a freshly built loader (worker start-up
    included, as a training epoch pays it too)."""
    rates, n = [], 0
    for _ in range(rounds):
        loader = make()
        start = time.perf_counter()
        n = _count(loader, kind)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates), n


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="existing dataset directory (default: write synthetic shards)")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-loader-")
        args.data = tmp.name
        write_synthetic(args.data, args.samples, args.shard_size)
    manifest = Manifest.load(os.path.join(args.data, MANIFEST_NAME))
    urls = [os.path.join(args.data, s.name) for s in manifest.shards]
    B = args.batch_size
    print(f"{manifest.num_samples} samples of {manifest.latent['shape']} x {manifest.latent['moments']}"
          f" in {len(urls)} shards, batch {B}, median of {args.rounds} passes, {os.cpu_count()} CPUs")
    rows = []
    for w in args.workers:
        pipelines = [
            ("wds bare (bytes)", "bare", lambda: _wds(urls, B, w, False)),
            ("wds decode+collate", "decode", lambda: _wds(urls, B, w, True)),
            ("ours, one pass", "ours", lambda: build_latent_loader(args.data, B, num_workers=w, resampled=False)),
            ("ours, resampled", "ours", lambda: build_latent_loader(args.data, B, num_workers=w)),
        ]
        bare = None
        for name, kind, make in pipelines:
            rate, n = measure(make, kind, args.rounds)
            bare = bare or rate
            rows.append((name, w, rate, n, bare / rate))
    print("\n| pipeline | workers | samples/s | samples/pass | time per sample vs wds bare |")
    print("|---|---:|---:|---:|---:|")
    for name, w, rate, n, cost in rows:
        print(f"| {name} | {w} | {rate:,.0f} | {n} | {cost:.2f}x |")
    print("\ngoal: ours <= 1.25x wds bare at the same worker count")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
