"""The cluster's precision and memory paths on 2 CPU ranks: bf16 training end to end at ZeRO-2 and
ZeRO-3 (the loss falls, a resume continues it exactly, the result exports and samples), fp16
refused in one line where the accelerator has no fp16, and activation checkpointing inside a
ZeRO-3 engine (every mode, fairscale's CPU offload included, gives the plain run's gradients and
recomputes each block)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from deepspeed.accelerator import get_accelerator
from safetensors.torch import load_file

from trainer.checkpoints import COMPLETE, STATE_FILE, export_weights
from trainer.sample.generate import sample_checkpoint

from launcher import deepspeed_command, free_port, losses, run, seed_resume, tiny_config, write_config

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_trains_resumes_exactly_exports_and_samples(stage, digits8, tmp_path):
    common = dict(run={"total_steps": 20}, deepspeed={"zero_stage": stage, "precision": "bf16"},
                  checkpoint={"every": 10}, ema={"decay": 0.9},
                  monitor={"log_every": 1, "peak_tflops": 1.0, "sample_count": 4, "sample_steps": 4})
    full = write_config(tiny_config(digits8, str(tmp_path / "full"), **common), tmp_path / "full.yaml")
    first = run(deepspeed_command(full, free_port()), tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ref = losses(first.stdout)
    assert sorted(ref) == list(range(1, 21)) and all(math.isfinite(v) for v in ref.values())
    early, late = np.mean([ref[s] for s in range(1, 6)]), np.mean([ref[s] for s in range(16, 21)])
    assert late < 0.85 * early, (early, late)

    # the same run resumed from its step-10 checkpoint continues it exactly
    seed_resume(tmp_path / "full" / "t", tmp_path / "resumed" / "t", "step00000010")
    ckpts = tmp_path / "resumed" / "t" / "checkpoints"
    again_cfg = write_config(tiny_config(digits8, str(tmp_path / "resumed"), **common), tmp_path / "again.yaml")
    again = run(deepspeed_command(again_cfg, free_port()), tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "at step 10 (weights match the saved checksums), optimizer state: Adam step 10" in again.stdout
    resumed = losses(again.stdout)
    assert sorted(resumed) == list(range(11, 21))
    for step in range(11, 21):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-8), (step, resumed[step], ref[step])

    end = tmp_path / "full" / "t" / "checkpoints" / "step00000020"
    assert (end / COMPLETE).exists() and json.loads((end / STATE_FILE).read_text())["state"]["step"] == 20
    # the EMA came back with the weights (under ZeRO-3: each rank's shard of it)
    ema_full, ema_resumed = load_file(end / "ema.safetensors"), load_file(ckpts / "step00000020" / "ema.safetensors")
    assert set(ema_full) == set(ema_resumed)
    for key in ema_full:
        torch.testing.assert_close(ema_resumed[key], ema_full[key], rtol=1e-6, atol=1e-8, msg=key)
    exported = tmp_path / "ema.safetensors"
    export_weights(str(end), str(exported), "ema")
    weights = load_file(exported)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    result = sample_checkpoint(str(exported), str(tmp_path / "samples"), classes=[0, 1], per_class=2, steps=4,
                               guidance_scale=1.5, png=False, device=torch.device("cpu"))
    images = np.load(result.npz)["arr_0"]
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8 and images.std() > 0


@pytest.mark.skipif(bool(get_accelerator().is_fp16_supported()), reason="this accelerator trains fp16")
def test_fp16_is_refused_in_one_line_where_the_accelerator_has_none(digits8, tmp_path):
    cfg = tiny_config(digits8, str(tmp_path / "runs"), deepspeed={"zero_stage": 2, "precision": "fp16"})
    proc = run(deepspeed_command(write_config(cfg, tmp_path / "c.yaml"), free_port()), tmp_path)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("mdt-train: error: deepspeed.precision: fp16 is not supported on this accelerator (cpu); use bf16 "
            "or fp32") in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()


def test_activation_checkpointing_inside_a_zero3_engine_gives_the_plain_gradients(tmp_path):
    out = tmp_path / "grads.json"
    proc = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(free_port()), "--module", "grads_on_ranks", str(out)], Path(__file__).parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    plain = report["none"]
    assert plain["nonzero_grads"] > 0.9 * plain["params"]  # random weights: nearly every gradient moves
    assert plain["backward_runs"] == 0  # without checkpointing no block runs again in backward
    for mode in ("torch", "deepspeed", "fairscale", "fairscale+offload"):
        r = report[mode]
        assert r["loss"] == plain["loss"], mode
        assert r["max_grad_diff"] < 1e-6, (mode, r["max_grad_diff"])
        assert r["backward_runs"] == r["blocks"] == r["forward_runs"], (mode, r)  # every block recomputed once


def test_the_sharded_ema_equals_the_gathering_one_on_half_the_bytes(tmp_path):
    """Under ZeRO-3 each rank averages its own partition: after 6 updates the whole average, however
    it is assembled (gathered everywhere, to rank 0 for saving, materialised for sampling, reloaded
    from a whole state), equals the EMA that gathers every parameter, bit for bit."""
    out = tmp_path / "ema.json"
    proc = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(free_port()), "--module", "ema_on_ranks", str(out)], Path(__file__).parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    for r in ranks:
        assert r["moved_from_start"] > 1e-3  # the average really moved with training
        assert r["everywhere"] == r["materialised"] == r["round_trip"] == 0.0, r
        assert r["emptied_after_full"] and r["updates"] == [6, 6]
        assert r["bytes"]["sharded"] <= 0.55 * r["bytes"]["gathering"], r["bytes"]
    assert ranks[0]["saved"] == 0.0 and ranks[1]["saved_keys_elsewhere"] == 0
    assert ranks[0]["to_rank0"] == 0.0 and ranks[1]["to_rank0"] is None  # a grid's gather: rank 0 only
