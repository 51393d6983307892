"""EMA maths and restore; checkpoint bookkeeping (complete marker, latest, rotation)."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.checkpoints import (
    COMPLETE,
    EMA_FILE,
    LATEST,
    CheckpointError,
    CheckpointRecord,
    RunState,
    complete_tags,
    find_resume,
    make_tag,
    rotate,
)
from trainer.config import EMAConfig
from trainer.training.checkpointer import load_checkpoint, save_checkpoint
from trainer.training.ema import EMA


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(3))
        self.lin = nn.Linear(3, 2)


def test_ema_fixed_decay_matches_formula():
    live, shadow = Tiny(), Tiny()
    ema = EMA(shadow, EMAConfig(decay=0.9, warmup=False), images_per_step=8)
    ema.copy_from(live)
    start = live.lin.weight.detach().clone()
    with torch.no_grad():
        live.lin.weight.add_(1.0)
    ema.update(live, images_seen=8)
    torch.testing.assert_close(ema.module.lin.weight, 0.9 * start + 0.1 * (start + 1.0))
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_warmup_ramps_the_decay():
    ema = EMA(Tiny(), EMAConfig(decay=0.9999, warmup=True), images_per_step=8)
    decays = []
    for _ in range(3):
        decays.append(ema.decay(0))
        ema.updates += 1
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    ema.updates = 10**6
    assert ema.decay(0) == 0.9999


def test_ema_half_life_in_images():
    ema = EMA(Tiny(), EMAConfig(half_life_images=1000, warmup=False), images_per_step=100)
    d = ema.decay(10**6)
    assert d ** 10 == pytest.approx(0.5)  # 10 steps of 100 images = one half-life
    ramped = EMA(Tiny(), EMAConfig(half_life_images=1000, warmup=True), images_per_step=100)
    assert ramped.decay(2000) == pytest.approx(0.5 ** (100 / 100))  # half-life capped at 5% of 2000 images


def test_ema_updates_every_n_steps_at_the_right_steps():
    live, shadow = Tiny(), Tiny()
    ema = EMA(shadow, EMAConfig(decay=0.5, warmup=False, update_every=3), images_per_step=4)
    ema.copy_from(live)
    expected = live.lin.weight.detach().clone()
    done = []
    for step in range(1, 11):
        with torch.no_grad():
            live.lin.weight.add_(1.0)
        if ema.step_done(step, live, images_seen=4 * step):
            done.append(step)
            expected = 0.5 * expected + 0.5 * live.lin.weight.detach()
    assert done == [3, 6, 9] and ema.updates == 3
    torch.testing.assert_close(ema.module.lin.weight, expected)
    # the half-life decay covers the steps between updates: 3 steps of 4 images per update
    spaced = EMA(Tiny(), EMAConfig(half_life_images=120, warmup=False, update_every=3), images_per_step=4)
    assert spaced.decay(10**6) ** 10 == pytest.approx(0.5)


class _Engine:
    """Writes and reads what DeepSpeed would, minus the tensors (the EMA is the trainer's own file)."""

    def save_checkpoint(self, root, tag, save_latest):
        (Path(root) / tag).mkdir(parents=True)

    def load_checkpoint(self, root, tag, **kwargs):
        return os.path.join(root, tag), {}


def test_checkpoint_load_restores_the_ema_exactly(tmp_path):
    ema = EMA(Tiny(), EMAConfig(), images_per_step=8)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.copy_(torch.randn_like(p))
    ema.updates = 7
    data = {"samples_seen": 56, "epoch": 0, "batches_in_epoch": 7, "skipped": 0}
    record = CheckpointRecord(state=RunState(step=7, images_seen=56), world_size=1, model_name="tiny",
                              model_kwargs={}, config={}, dataset={}, ema_updates=ema.updates)
    path = save_checkpoint(_Engine(), ema, str(tmp_path), make_tag(7), record, data, 0, lambda: None)
    fresh = EMA(Tiny(), EMAConfig(), images_per_step=8)  # other random weights, no updates
    loaded, position = load_checkpoint(_Engine(), fresh, path, 0)
    saved = ema.state_dict()
    assert set(fresh.state_dict()) == set(saved)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert fresh.updates == 7 and loaded == record and position == data
    assert json.loads((Path(path) / "trainer_state.json").read_text())["ema_updates"] == 7
    assert (Path(path) / EMA_FILE).exists() and (Path(path) / COMPLETE).exists()


def test_ema_state_round_trip():
    ema = EMA(Tiny(), EMAConfig(), images_per_step=1)
    with torch.no_grad():
        ema.module.scale.fill_(3.0)
    restored = EMA(Tiny(), EMAConfig(), images_per_step=1)
    restored.load_state_dict(ema.state_dict(), updates=42)
    assert torch.equal(restored.module.scale, torch.full((3,), 3.0)) and restored.updates == 42


def _fake_ckpt(root, tag, complete=True):
    os.makedirs(os.path.join(root, tag))
    if complete:
        open(os.path.join(root, tag, COMPLETE), "w").close()


def test_resume_ignores_partial_checkpoints_and_stale_latest(tmp_path):
    root = str(tmp_path)
    assert find_resume(root, "auto") is None
    _fake_ckpt(root, make_tag(10))
    _fake_ckpt(root, make_tag(20, "unmask"))
    _fake_ckpt(root, make_tag(30), complete=False)  # killed while saving
    (tmp_path / LATEST).write_text(make_tag(30))  # points at the partial one
    assert find_resume(root, "auto") == os.path.join(root, "step00000020-unmask")
    (tmp_path / LATEST).write_text(make_tag(10))
    assert find_resume(root, "auto") == os.path.join(root, "step00000010")
    assert find_resume(root, "none") is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_resume(root, os.path.join(root, "step00000030"))


def test_rotation_keeps_newest_and_phase_ends(tmp_path):
    root = str(tmp_path)
    for step in (10, 20, 30, 40):
        _fake_ckpt(root, make_tag(step))
    _fake_ckpt(root, make_tag(25, "unmask"))
    _fake_ckpt(root, make_tag(15), complete=False)
    deleted = rotate(root, keep_last=2, keep_phase_ends=True)
    assert sorted(deleted) == ["step00000010", "step00000015", "step00000020"]
    assert complete_tags(root) == ["step00000025-unmask", "step00000030", "step00000040"]
