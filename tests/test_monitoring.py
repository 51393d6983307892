"""What a run reports, read back with TensorBoard's own reader: the monitor's reduction and
formulas on known inputs, then a real 2-rank run (tags, recomputable values, a bad shard's
skipped samples on another rank, sample grids, MFU against a measured peak, memory)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.config import MonitorConfig, OptimConfig, PhasesConfig
from trainer.config.phases import PhasePlan
from trainer.diffusion import LossOutput
from trainer.training.monitor import SIGMA_EDGES, Monitor, bucket_names

from launcher import deepspeed_command, free_port, losses, run, tiny_config, write_config


def read_events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> dict:
    return {e.step: e.value for e in events.Scalars(tag)}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_monitor_reduces_and_writes_what_it_was_given(tmp_path):
    clock = Clock()
    monitor = Monitor(MonitorConfig(log_every=2), str(tmp_path), 0, 10, torch.device("cpu"), peak_flops=1e9,
                      clock=clock)
    # two steps of 4 samples; sigmas chosen per bucket: edges 0.05, 0.2, 0.5, 1, 2, 5
    sigmas = [torch.tensor([0.01, 0.1, 0.3, 0.3]), torch.tensor([0.7, 1.5, 3.0, 50.0])]
    dsm = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([5.0, 6.0, 7.0, 8.0])]
    mae = [torch.tensor([0.5, 0.0, 0.5, 0.0]), torch.tensor([0.0, 1.0, 0.0, 1.0])]
    for step in range(2):
        monitor.record(LossOutput(dsm[step] + 0.1 * mae[step], sigmas[step], dsm[step], mae[step]))
        clock.now += 2.0
        monitor.step_done(images=4, flops=3e9, data_wait=0.5, skipped_samples=3 + step)
    metrics = monitor.log(2, {"lr": 1e-3, "mask_ratio": 0.5}, world_size=1, phase="masked")
    monitor.close()
    loss = torch.cat(dsm) + 0.1 * torch.cat(mae)
    expected = {"loss": float(loss.mean()), "loss_dsm": 4.5, "loss_mae": 0.375, "lr": 1e-3, "mask_ratio": 0.5,
                "images_per_s": 8 / 4.0, "data_wait_share": 1.0 / 4.0, "mfu": 6e9 / 4.0 / 1e9,
                "skipped_samples": 4.0}
    events = read_events(tmp_path)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
        assert scalars(events, f"train/{key}") == {2: pytest.approx(value, rel=1e-6)}, key
    assert scalars(events, "train/max_rss_gib")[2] > 0
    buckets = bucket_names()
    assert len(buckets) == len(SIGMA_EDGES) + 1
    counts = {name: scalars(events, f"samples_by_sigma/{name}")[2] for name in buckets}
    assert list(counts.values()) == [1, 1, 2, 1, 1, 1, 1]
    per_bucket = [[0], [1], [2, 3], [4], [5], [6], [7]]
    for name, members in zip(buckets, per_bucket):
        assert scalars(events, f"loss_by_sigma/{name}")[2] == pytest.approx(float(loss[members].mean()), rel=1e-6)


def test_a_two_rank_run_reports_what_it_did(digits8, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(digits8, shards)
    # rank 1 reads the odd shards (round-robin over ranks): each is cut in half, so its skips reach
    # rank 0's log only through the reduction
    victims = sorted(shards.glob("*.tar"))[1::2]
    for victim in victims:
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    # lr scales that differ from step to step: warm-up to step 4, unmask phases at half the lr
    phases = {"mask_ratio": 0.5, "unmask_every": 8, "unmask_steps": 3, "unmask_lr_scale": 0.5}
    cfg = tiny_config(str(shards), str(tmp_path / "runs"), run={"total_steps": 20}, phases=phases,
                      data={"shuffle_buffer": 10}, optim={"lr": 2e-3, "torch_adam": True, "warmup_steps": 4},
                      monitor={"log_every": 2, "sample_every": 10, "sample_count": 4, "sample_steps": 4,
                               "peak_tflops": None})
    config = write_config(cfg, tmp_path / "c.yaml")
    proc = run(deepspeed_command(config, free_port()), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "t"
    events = read_events(run_dir)
    tags = events.Tags()
    steps = list(range(2, 21, 2))
    for key in ("loss", "loss_dsm", "loss_mae", "lr", "mask_ratio", "grad_norm", "images_per_s", "mfu",
                "data_wait_share", "skipped_samples", "skipped_steps", "phase_unmask", "max_rss_gib"):
        assert sorted(scalars(events, f"train/{key}")) == steps, key
    # the values the plan and the config determine
    plan = PhasePlan(PhasesConfig(**phases), 20, cfg["optim"]["warmup_steps"])
    lr, scales = cfg["optim"]["lr"], set()
    for step in steps:
        state = plan.at(step - 1)  # logged after the step, with that step's settings
        assert scalars(events, "train/lr")[step] == pytest.approx(lr * state.lr_scale, rel=1e-6)
        scales.add(state.lr_scale)
        assert scalars(events, "train/mask_ratio")[step] == pytest.approx(state.mask_ratio)
        assert scalars(events, "train/phase_unmask")[step] == float(state.phase != "masked")
        # every sample of the window in exactly one noise-level bucket, and the loss their weighted mean
        counts = {n: scalars(events, f"samples_by_sigma/{n}")[step] for n in bucket_names()}
        assert sum(counts.values()) == 2 * cfg["data"]["batch_size"]
        by_bucket = sum(scalars(events, f"loss_by_sigma/{n}")[step] * c for n, c in counts.items() if c)
        assert by_bucket / sum(counts.values()) == pytest.approx(scalars(events, "train/loss")[step], rel=1e-5)
        assert scalars(events, "train/loss")[step] == pytest.approx(losses(proc.stdout)[step], abs=6e-5)
    assert OptimConfig().lr != lr and scales == {0.5, 1.0}  # the config's lr and every kind of scale were checked
    skipped = scalars(events, "train/skipped_samples")
    assert skipped[20] >= 1 and all(skipped[a] <= skipped[b] for a, b in zip(steps, steps[1:]))
    assert any(f"in {v}: unreadable" in proc.stdout + proc.stderr for v in victims)
    # MFU against the peak measured at start (no monitor.peak_tflops): a share, not a made-up number
    assert all(0 < v < 1 for v in scalars(events, "train/mfu").values())
    assert all(v > 0 and math.isfinite(v) for v in scalars(events, "train/max_rss_gib").values())
    # sample grids at sample_every and at the end, in TensorBoard and as PNGs
    assert "samples/ema" in tags["images"]
    assert [e.step for e in events.Images("samples/ema")] == [10, 20]
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step00000010.png", "step00000020.png"]
    assert {"config/text_summary", "phase_plan/text_summary"} <= set(tags["tensors"])
