"""The non-finite-loss guard in a real 2-rank run: a NaN loss on rank 1 alone is skipped on both
ranks and counted; `monitor.max_nonfinite` of them in a row stop the run with status 3 and leave
the last checkpoint whole, and rerunning resumes from it."""

from __future__ import annotations

import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.checkpoints import COMPLETE, LATEST, STATE_FILE, network_weights

from launcher import deepspeed_command, free_port, losses, run, tiny_config, write_config

pytestmark = pytest.mark.timeout(600)


def test_nan_on_one_rank_is_skipped_on_both_and_a_run_of_them_exits_3(digits8, tmp_path):
    cfg = tiny_config(digits8, str(tmp_path / "runs"), run={"total_steps": 30},
                      checkpoint={"every": 10, "keep_last": 5},
                      monitor={"log_every": 1, "peak_tflops": 1.0, "sample_count": 4, "sample_steps": 4,
                               "max_nonfinite": 3})
    config = write_config(cfg, tmp_path / "c.yaml")
    # one accumulation step per optimizer step: forward call 7 is step 7's first try (retried with
    # call 8); from call 25 (step 24, after that one retry) every call is bad
    proc = run(deepspeed_command(config, free_port()), tmp_path, extra_env={"MDT_FAULTS": "nan:calls=7,25+:rank=1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-4000:]
    assert ("warning: non-finite gradients in step 7: update skipped, trying the step again with new data "
            "(1 in a row)") in proc.stdout
    assert "mdt-train: stopped: 3 updates in a row with non-finite gradients in step 24" in proc.stderr, \
        proc.stderr[-3000:]
    logged = losses(proc.stdout)
    assert sorted(logged) == list(range(1, 24)) and all(math.isfinite(v) for v in logged.values())

    root = tmp_path / "runs" / "t" / "checkpoints"
    assert (root / LATEST).read_text() == "step00000020" and (root / "step00000020" / COMPLETE).exists()
    assert not (root / "step00000030").exists()
    state = json.loads((root / "step00000020" / STATE_FILE).read_text())
    # rank 0 saw only finite losses: its count comes from the flag both ranks reduce
    assert state["state"]["nonfinite_skipped"] == 1 and state["state"]["images_seen"] == 20 * 16
    assert state["replica_checksums"][0] == state["replica_checksums"][1]
    tb = EventAccumulator(str(tmp_path / "runs" / "t" / "tb"))
    tb.Reload()
    skipped = {e.step: e.value for e in tb.Scalars("train/skipped_steps")}
    assert skipped[5] == 0 and skipped[6] == 0 and skipped[7] == 1 and skipped[23] == 1

    # the kept checkpoint loads: weights as saved, and the same command without the fault resumes
    weights, _ = network_weights(str(root / "step00000020"), "model")
    assert all(math.isfinite(float(v.abs().sum())) for v in weights.values())
    again = run(deepspeed_command(config, free_port(), ["--set", "run.total_steps=22"]), tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {root / 'step00000020'} at step 20 (weights match the saved checksums)" in again.stdout
    assert sorted(losses(again.stdout)) == [21, 22]
    # the same data and noise as the first attempt at steps 21-22 (the retry at step 7 moved both
    # runs' streams alike): equal losses
    resumed = losses(again.stdout)
    assert resumed[21] == pytest.approx(logged[21], rel=1e-5) and resumed[22] == pytest.approx(logged[22], rel=1e-5)
