"""Recovery without a person (`monitor.on_nonfinite: rollback`) in real 2-rank runs with data
workers: a streak of non-finite losses reloads the last checkpoint on every rank, skips the data
that led there, trains on at a lowered learning rate, and finishes; one more streak than
`monitor.max_rollbacks` allows stops the run with its checkpoint intact; without a checkpoint from
before the trouble the run stops too."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.checkpoints import COMPLETE, LATEST, STATE_FILE, CheckpointRecord, RunState, make_tag, write_record
from trainer.training.checkpointer import checkpoint_before
from trainer.training.stop import RunStopped

from launcher import (
    STEP_LINE,
    deepspeed_command,
    free_port,
    losses,
    run,
    runs_in,
    tiny_config,
    train_each_command,
    write_config,
)

pytestmark = pytest.mark.timeout(600)

LR = 2e-3


def _config(shards, out, **monitor):
    return tiny_config(shards, out, run={"total_steps": 16}, checkpoint={"every": 5, "keep_last": 5},
                       data={"batch_size": 32},  # 2 micro-steps per step on 2 ranks
                       optim={"lr": LR, "torch_adam": True, "warmup_steps": 0},
                       monitor={"log_every": 1, "peak_tflops": 1.0, "sample_count": 4, "sample_steps": 4,
                                "on_nonfinite": "rollback", "max_rollbacks": 2, "rollback_lr_scale": 0.5,
                                "rollback_lr_steps": 4, **monitor})


def _logged_steps(stdout: str) -> list:
    steps = []
    for line in stdout.splitlines():
        m = STEP_LINE.match(line.split("] ", 1)[-1] if line.startswith("[") else line)
        if m:
            steps.append(int(m.group(1)))
    return steps


def test_a_streak_rolls_back_skips_its_data_and_finishes(digits8, tmp_path):
    """Step 8 (forward calls 15-16 on each rank, 2 micro-steps) has its update skipped 3 times in a
    row: rollback to step 5. Run A's NaN losses on rank 1 come in calls 16, 17 and 19 (the first
    micro-step of step 8 trains, its gradients wait in ZeRO-2's buffers, then the second is NaN);
    run B's in 15, 18 and 20. Each drew 6 batches for step 8. From step 5 on both must train exactly
    alike: the gradients accumulated beside a NaN are gone, both skip the same data and lower the
    learning rate alike."""
    configs = [write_config(_config(digits8, str(tmp_path / name), max_nonfinite=3), tmp_path / f"{name}.yaml")
               for name in ("a", "b")]
    # both runs in one launch, one after the other, each with its own faults
    proc = run(train_each_command(configs, free_port(), ["nan:calls=16,17,19:rank=1", "nan:calls=15,18,20:rank=1"]),
               tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = runs_in(proc.stdout)
    root = tmp_path / "a" / "t" / "checkpoints"
    assert (f"rollback 1 of 2: 3 updates in a row with non-finite gradients in step 8; reloaded "
            f"{root / 'step00000005'} (step 5); the data of steps 6-8 are skipped; lr x0.5 through step 9") \
        in a, a[-3000:]
    assert "rollback 1 of 2: 3 updates in a row with non-finite gradients in step 8" in b
    assert a.count("rollback 1 of 2") == 1 and "rollback 2" not in a
    # steps 1-7 trained once, then 6-16 again from the checkpoint of step 5
    assert _logged_steps(a) == list(range(1, 8)) + list(range(6, 17))
    after_a, after_b = losses(a), losses(b)  # the later line of a step wins
    for step in range(6, 17):
        assert after_a[step] == pytest.approx(after_b[step], rel=1e-6, abs=1e-8), (step, after_a[step], after_b[step])
        assert math.isfinite(after_a[step])

    # saved right after the rollback: a crash before step 10 resumes past it, not into the divergence
    after = json.loads((root / "step00000006" / STATE_FILE).read_text())["state"]
    assert (after["step"], after["rollbacks"], after["lr_cut_until"]) == (6, 1, 9)
    end = root / "step00000016"
    record = json.loads((end / STATE_FILE).read_text())
    state = record["state"]
    assert (state["step"], state["images_seen"], state["rollbacks"], state["lr_cut_until"]) == (16, 16 * 32, 1, 9)
    assert state["nonfinite_skipped"] == 3 and record["replica_checksums"][0] == record["replica_checksums"][1]
    ema_a = load_file(end / "ema.safetensors")
    ema_b = load_file(tmp_path / "b" / "t" / "checkpoints" / "step00000016" / "ema.safetensors")
    for key in ema_a:
        torch.testing.assert_close(ema_a[key], ema_b[key], rtol=1e-5, atol=1e-7, msg=key)

    tb = EventAccumulator(str(tmp_path / "a" / "t" / "tb"))
    tb.Reload()
    assert [(e.step, e.value) for e in tb.Scalars("recovery/rollbacks")] == [(8, 1.0)]
    assert [(e.step, e.value) for e in tb.Scalars("recovery/rolled_back_to")] == [(8, 5.0)]
    lr = {e.step: e.value for e in tb.Scalars("train/lr")}  # the replayed steps' values replace the first ones
    assert [lr[s] for s in (5, 6, 9, 10, 16)] == pytest.approx([LR, LR / 2, LR / 2, LR, LR])


def test_one_streak_more_than_allowed_stops_with_the_checkpoint_intact(digits8, tmp_path):
    """max_rollbacks 1 and two streaks (one micro-step per step), at ZeRO-3 (its sharded EMA is
    reloaded too): the first (step 8) rolls back to step 5; the second (step 15: calls 11-19 train
    steps 6-14) stops the run with status 3, and the checkpoint of step 10, written after the
    rollback, is whole and records it."""
    cfg = _config(digits8, str(tmp_path / "r"), max_nonfinite=3, max_rollbacks=1)
    cfg["data"]["batch_size"] = 16
    cfg["deepspeed"] = {"zero_stage": 3, "precision": "fp32"}
    config = write_config(cfg, tmp_path / "c.yaml")
    proc = run(deepspeed_command(config, free_port()), tmp_path,
               extra_env={"MDT_FAULTS": "nan:calls=8,9,10,20,21,22:rank=1"})
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = tmp_path / "r" / "t" / "checkpoints"
    assert "rollback 1 of 1: 3 updates in a row with non-finite gradients in step 8" in proc.stdout
    assert (f"mdt-train: stopped: 3 updates in a row with non-finite gradients in step 15: stopping after 1 "
            f"rollback; the last good checkpoint in {root} is intact") in proc.stderr, proc.stderr[-3000:]
    assert (root / LATEST).read_text() == "step00000010" and (root / "step00000010" / COMPLETE).exists()
    state = json.loads((root / "step00000010" / STATE_FILE).read_text())["state"]
    assert (state["step"], state["rollbacks"], state["nonfinite_skipped"]) == (10, 1, 3)


def test_a_rollback_goes_to_the_newest_checkpoint_from_before_the_trouble(tmp_path):
    """Complete checkpoints at steps 5 and 10 (and an incomplete one at 15): trouble that began in
    step 11 goes back to 10, in step 10 (a spike whose first high step was 10: the checkpoint of
    step 10 was saved after it) to 5, before step 6 nowhere."""
    root = tmp_path / "checkpoints"
    for step, complete in ((5, True), (10, True), (15, False)):
        path = root / make_tag(step)
        path.mkdir(parents=True)
        write_record(str(path), CheckpointRecord(state=RunState(step=step, images_seen=16 * step), world_size=2,
                                                 model_name="m", model_kwargs={}, config={}))
        if complete:
            (path / COMPLETE).write_text("")
    assert checkpoint_before(str(root), 16, 2) == str(root / "step00000010")
    assert checkpoint_before(str(root), 11, 2) == str(root / "step00000010")
    assert checkpoint_before(str(root), 10, 2) == str(root / "step00000005")
    assert checkpoint_before(str(root), 5, 2) is None
    assert checkpoint_before(str(tmp_path / "none"), 5, 2) is None
    # the run's own checkpoints, written by 2 ranks with partitioned optimizer state, on 1 rank:
    # a one-line stop naming the command that makes them loadable
    (root / "step00000010" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(RunStopped, match="run `mdt-universal"):
        checkpoint_before(str(root), 11, 1)


def test_without_a_checkpoint_to_go_back_to_the_run_stops(digits8, tmp_path):
    cfg = _config(digits8, str(tmp_path / "r"), max_nonfinite=2)
    cfg["data"]["batch_size"] = 16
    proc = run(deepspeed_command(write_config(cfg, tmp_path / "c.yaml"), free_port()), tmp_path,
               extra_env={"MDT_FAULTS": "nan:calls=3,4"})
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"stopped: 2 updates in a row with non-finite gradients in step 3: no checkpoint from before "
                     r"step 3 to roll back to \(checkpoint\.every 5\); stopping", proc.stderr), proc.stderr[-3000:]
