"""trainer.training.data: exact accounting, equal steps per rank, seeded resume, surviving bad input."""

import collections
import io
import logging
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from data_tools.encode import EncodeSettings, encode_part
from data_tools.format import MANIFEST_NAME, DataToolsError, encode_array, encode_sample
from data_tools.manifest import Manifest, ShardInfo, sha256_file
from trainer.training.data import build_latent_loader

N = 200  # digits encoded as 3x8x8 pixels into 14 shards of 15 (the last holds 5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    encode_part(EncodeSettings(source="digits", out=str(out), resolution=8, encoder="pixels", limit=N,
                               shard_size=15, batch_size=50, loader_workers=0, progress=False, hflip=True))
    return str(out)


def _keys(loader):
    keys, sizes = [], []
    for batch in loader:
        z, y, k = batch.latents, batch.labels, batch.keys
        assert z.shape[1:] == (3, 8, 8) and len(y) == len(k) == z.shape[0]
        keys += k
        sizes.append(len(k))
    return keys, sizes


def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(dataset):
    for epoch in range(2):
        seen = []
        for rank in range(2):
            loader = build_latent_loader(dataset, 7, rank, 2, num_workers=2, resampled=False,
                                         shuffle_buffer=20, return_keys=True, seed=epoch)
            keys, sizes = _keys(loader)
            assert sum(s < 7 for s in sizes) <= 2  # at most one partial batch per worker
            seen += keys
        counts = collections.Counter(seen)
        assert len(seen) == N and len(counts) == N and set(counts.values()) == {1}


def test_resampled_ranks_take_equal_full_steps_despite_uneven_shards(dataset):
    lengths = []
    for rank in range(2):
        loader = build_latent_loader(dataset, 16, rank, 2, num_workers=2, seed=1)
        batches = list(loader)
        assert len(batches) == len(loader) == N // (2 * 16)
        assert all(b.latents.shape == (16, 3, 8, 8) for b in batches)
        lengths.append(len(batches))
        assert loader.state_dict()["epoch"] == 1 and loader.samples_seen == len(batches) * 16
    assert lengths[0] == lengths[1]
    loader = build_latent_loader(dataset, 16, 0, 2, num_workers=2, epoch_samples=1000)
    assert len(list(loader)) == len(loader) == 1000 // 32


def _epoch(loader):
    return [(b.latents.clone(), b.labels.clone(), tuple(b.keys)) for b in loader]


def _same(a, b):
    assert len(a) == len(b)
    for (za, ya, ka), (zb, yb, kb) in zip(a, b):
        assert ka == kb and torch.equal(ya, yb) and torch.equal(za, zb)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
def test_seeded_stream_and_resume_from_state(dataset):
    opts = dict(num_workers=3, seed=5, return_keys=True, shuffle_buffer=30)
    full = build_latent_loader(dataset, 8, 1, 2, **opts)
    first, second = _epoch(full), _epoch(full)
    _same(first, _epoch(build_latent_loader(dataset, 8, 1, 2, **opts)))
    assert [b[2] for b in first] != [b[2] for b in second]  # a new epoch is a new order
    # Stop after 5 steps (not a multiple of the 3 workers), "checkpoint", resume in a fresh loader.
    partial = build_latent_loader(dataset, 8, 1, 2, **opts)
    for step, _ in enumerate(partial):
        if step == 4:
            break
    state = partial.state_dict()
    assert state["samples_seen"] == 40 and state["batches_in_epoch"] == 5
    resumed = build_latent_loader(dataset, 8, 1, 2, **opts)
    resumed.load_state_dict(state)
    _same(_epoch(resumed), first[5:])  # batch for batch the uninterrupted stream
    _same(_epoch(resumed), second)
    # One-pass mode resumes exactly too (by replaying the epoch).
    once = dict(opts, resampled=False)
    whole = _epoch(build_latent_loader(dataset, 8, 1, 2, **once))
    partial = build_latent_loader(dataset, 8, 1, 2, **once)
    for step, _ in enumerate(partial):
        if step == 2:
            break
    resumed = build_latent_loader(dataset, 8, 1, 2, **once)
    resumed.load_state_dict(partial.state_dict())
    _same(_epoch(resumed), whole[3:])


def test_truncated_shard_is_skipped_counted_and_batches_keep_shape(dataset, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(dataset, root)
    victim = root / "latents-p0000-000003.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    keys = []
    for rank in range(2):
        loader = build_latent_loader(str(root), 7, rank, 2, num_workers=2, resampled=False, return_keys=True)
        keys += _keys(loader)[0]
        if rank == 1:
            assert loader.skipped == 1
    assert N - 15 < len(keys) < N and len(set(keys)) == len(keys)
    loader = build_latent_loader(str(root), 16, 1, 2, num_workers=2, epoch_samples=600)
    stream = loader.batches()
    batches = [next(stream) for _ in range(2 * len(loader))]
    assert all(b.latents.shape == (16, 3, 8, 8) for b in batches) and loader.skipped >= 1


def _member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_with_a_warning_naming_shard_and_key(tmp_path, caplog):
    good = np.zeros((2, 4, 2, 2), np.float16)
    shard = tmp_path / "bad-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(8):
            sample = encode_sample(f"k{i}", good + i, i % 3, flipped=good)
            if i == 1:
                sample["latent.npy"] = encode_array(np.zeros((2, 4, 3, 3), np.float16))
            elif i == 2:
                del sample["cls"]
            elif i == 3:
                sample["latent.npy"] = encode_array(good.astype(np.float32))
            elif i == 4:
                sample["cls"] = b"7"
            elif i == 5:
                sample["latent.npy"] = b"\x93NUMPY garbage"
            for field in sorted(k for k in sample if k != "__key__"):
                _member(tar, f"k{i}.{field}", sample[field])
    man = Manifest(latent=dict(shape=[4, 2, 2], moments=["mean", "std"], dtype="float16"),
                   scaling_factor=0.5, encoder=dict(kind="vae", id="test"), source=dict(spec="test"),
                   resolution=4, has_flip=True, num_classes=3, num_samples=8,
                   shards=[ShardInfo(shard.name, 8, shard.stat().st_size, sha256_file(str(shard)))])
    (tmp_path / MANIFEST_NAME).write_text(man.to_json())
    loader = build_latent_loader(str(tmp_path), 3, num_workers=0, resampled=False, hflip=False,
                                 sample_posterior=False, drop_last=True, return_keys=True)
    with caplog.at_level(logging.WARNING, logger="trainer.training.data"):
        batches = list(loader)
    assert loader.skipped == 5 and [len(b.keys) for b in batches] == [3]
    assert sorted(k for b in batches for k in b.keys) == ["k0", "k6", "k7"]
    text = caplog.text
    for key, reason in (("k1", "shape"), ("k2", "missing field cls"), ("k3", "dtype"), ("k4", "cls '7'"),
                        ("k5", "unreadable npy")):
        line = next(line for line in text.splitlines() if f"skipped {key} in " in line)
        assert str(shard) in line and reason in line
    z, keys = batches[0].latents, batches[0].keys
    assert torch.equal(z[keys.index("k6")], torch.full((4, 2, 2), 3.0))  # (0 + 6) * scale 0.5


def test_setup_errors_are_clear(dataset, tmp_path):
    with pytest.raises(ValueError, match="14 shards < 4 ranks x 4 workers"):
        build_latent_loader(dataset, 4, 0, 4, num_workers=4)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(os.path.join(dataset, "latents-p0000-000000.tar"), lone)
    with pytest.raises(DataToolsError, match="no manifest"):
        build_latent_loader(str(lone / "latents-p0000-{000000..000000}.tar"), 4, num_workers=0)


def test_pipe_urls_and_brace_patterns(dataset):
    pattern = os.path.join(dataset, "latents-p0000-{000000..000013}.tar")
    for shards in (f"pipe:cat {pattern}", pattern):
        loader = build_latent_loader(shards, 9, 0, 1, num_workers=2, resampled=False, return_keys=True,
                                     manifest=os.path.join(dataset, MANIFEST_NAME))
        keys, _ = _keys(loader)
        assert sorted(keys) == sorted(set(keys)) and len(keys) == N


SHAPE = (4, 8, 8)  # C, H, W of the hand-made posterior dataset
SCALE = 0.37  # not 1 (a dropped scale shows), and not exact in float32


def _moments(rng):
    """float16 [2, C, H, W]: a random mean and a positive std."""
    return np.stack([rng.standard_normal(SHAPE), rng.uniform(0.2, 1.5, SHAPE)]).astype(np.float16)


def _posterior_draw(moments, eps, scale):
    """(mean + std * eps) * scale in float32, in the loader's order, from stored float16 moments."""
    mean, std = moments.astype(np.float32)
    return torch.from_numpy((mean + std * eps.numpy()) * np.float32(scale))


@pytest.fixture(scope="module")
def posterior_dataset(tmp_path_factory):
    """8 shards x 12 samples with random mean/std moments and a distinct flipped latent; returns
    (root, {key: (latent, flipped, label)})."""
    root = tmp_path_factory.mktemp("posterior")
    rng = np.random.default_rng(0)
    stored, shards = {}, []
    for s in range(8):
        shard = root / f"post-{s:06d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i in range(12):
                key, latent, flipped, label = f"r{s}s{i:02d}", _moments(rng), _moments(rng), int(rng.integers(5))
                stored[key] = (latent, flipped, label)
                sample = encode_sample(key, latent, label, flipped=flipped)
                for field in sorted(k for k in sample if k != "__key__"):
                    _member(tar, f"{key}.{field}", sample[field])
        shards.append(ShardInfo(shard.name, 12, shard.stat().st_size, sha256_file(str(shard))))
    man = Manifest(latent=dict(shape=list(SHAPE), moments=["mean", "std"], dtype="float16"),
                   scaling_factor=SCALE, encoder=dict(kind="vae", id="test"), source=dict(spec="test"),
                   resolution=64, has_flip=True, num_classes=5, num_samples=96, shards=shards)
    (root / MANIFEST_NAME).write_text(man.to_json())
    return str(root), stored


def _draw_epoch(loader):
    return [(b.latents.clone(), b.labels.clone(), tuple(b.keys), b.draws.flip.clone(), b.draws.eps.clone())
            for b in loader]


def test_posterior_draws_and_flips_match_the_shards_and_repeat_after_resume(posterior_dataset):
    root, stored = posterior_dataset
    opts = dict(num_workers=2, seed=7, shuffle_buffer=10, return_keys=True, return_draws=True)
    flips, noise = [], []
    for rank in range(2):
        epoch = _draw_epoch(build_latent_loader(root, 4, rank, 2, **opts))
        assert len(epoch) == 96 // (2 * 4)
        for z, y, keys, flip, eps in epoch:
            assert flip.dtype == torch.bool and z.dtype == eps.dtype == torch.float32
            assert z.shape == eps.shape == (4, *SHAPE)
            for j, key in enumerate(keys):
                latent, flipped, label = stored[key]
                # Bit for bit: the loader's float32 operations in the same order.
                assert torch.equal(z[j], _posterior_draw(flipped if flip[j] else latent, eps[j], SCALE)), key
                assert int(y[j]) == label
            assert abs(float(eps.mean())) < 0.15 and 0.85 < float(eps.std()) < 1.15  # N(0, 1)-ish
            flips += flip.tolist()
            noise.append(eps.flatten())
        # Stop after 5 steps (not a multiple of the 2 workers), resume in a fresh loader: the same
        # samples, flips and noise follow.
        partial = build_latent_loader(root, 4, rank, 2, **opts)
        for step, _ in enumerate(partial):
            if step == 4:
                break
        state = partial.state_dict()
        assert state["batches_in_epoch"] == 5
        resumed = build_latent_loader(root, 4, rank, 2, **opts)
        resumed.load_state_dict(state)
        after = _draw_epoch(resumed)
        assert len(after) == len(epoch) - 5
        for step, (got, want) in enumerate(zip(after, epoch[5:]), 5):
            assert got[2] == want[2], f"keys of step {step}"
            for name, a, b in zip(("z", "labels", "flips", "eps"), got[:2] + got[3:], want[:2] + want[3:]):
                assert torch.equal(a, b), f"{name} of step {step} after resume"
    assert len(flips) == 96 and 0.35 < np.mean(flips) < 0.65  # both sides, about half each
    noise = torch.stack(noise)
    assert len(torch.unique(noise, dim=0)) == len(noise)  # fresh noise for every batch of both ranks
    # Without sampling or flips: no noise drawn, z = mean * scale from the unflipped latent.
    plain = build_latent_loader(root, 32, num_workers=0, resampled=False, hflip=False, sample_posterior=False,
                                return_keys=True, return_draws=True)
    for batch in plain:
        z, keys, draws = batch.latents, batch.keys, batch.draws
        assert draws.eps is None and not draws.flip.any()
        want = np.stack([stored[key][0][0] for key in keys]).astype(np.float32) * np.float32(SCALE)
        assert np.array_equal(z.numpy(), want)
