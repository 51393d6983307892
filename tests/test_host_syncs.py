"""The training loop reads nothing from the device between log steps (tests/syncs_on_ranks.py
counts host reads and collectives per step of real 2-rank Trainers), and a non-finite update is
skipped at each ZeRO stage (tests/skips_on_ranks.py)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from launcher import free_port, run, tiny_config, write_config

pytestmark = pytest.mark.timeout(600)

HERE = Path(__file__).parent


def _per_step(path: Path) -> dict:
    """{step: {(kind, who): count}} for the training steps of one rank's report."""
    steps: dict = defaultdict(lambda: defaultdict(int))
    for row in json.loads(path.read_text())["counts"]:
        if row["label"].startswith("step "):
            steps[int(row["label"].split()[1])][(row["kind"], row["who"])] += row["count"]
    return steps


def test_steps_between_log_steps_read_nothing_from_the_device(digits8, tmp_path):
    """ZeRO-2 with 2 micro-steps per step and the spike watch on: between log steps (every 4th) our
    code neither reads the device nor starts a device collective; the stop and time-limit flags take
    one host-side (gloo) all-reduce per step. Log steps do read (the counter sees reads). ZeRO-0 fp32,
    whose plain optimizer DeepSpeed does not guard, reads once per step: the non-finite check."""
    zero2 = tiny_config(digits8, str(tmp_path / "z2"), run={"total_steps": 8}, data={"batch_size": 32},
                        checkpoint={"every": 100}, monitor={"log_every": 4, "peak_tflops": 1.0, "spike_factor": 3.0})
    zero0 = tiny_config(digits8, str(tmp_path / "z0"), run={"total_steps": 8}, checkpoint={"every": 100},
                        monitor={"log_every": 4, "peak_tflops": 1.0}, deepspeed={"zero_stage": 0, "precision": "fp32"})
    configs = [write_config(zero2, tmp_path / "z2.yaml"), write_config(zero0, tmp_path / "z0.yaml")]
    prefix = tmp_path / "syncs"
    proc = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
                "--module", "syncs_on_ranks", str(prefix), *map(str, configs)], HERE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        for index, guard_reads in ((0, 0), (1, 1)):
            report = Path(f"{prefix}.{index}.{rank}.json")
            steps = _per_step(report)
            assert sorted(steps) == list(range(1, 9)), sorted(steps)
            ours = json.loads(report.read_text())["ours"]
            for step in (1, 2, 3, 5, 6, 7):
                counts = steps[step]
                assert counts[("read", "ours")] == guard_reads, (index, rank, step, ours)
                assert counts[("collective", "ours")] == 0, (index, rank, step, ours)
                assert counts[("collective", "host")] == 1, (index, rank, step, dict(counts))
                assert counts[("collective", "deepspeed")] >= 1  # the gradients' reduction
            for step in (4, 8):  # the log: one all-reduce of the window's sums (and the spike watch's)
                assert steps[step][("read", "ours")] > guard_reads and steps[step][("collective", "ours")] >= 1


def test_a_non_finite_update_is_skipped_at_each_zero_stage(tmp_path):
    """A NaN loss on rank 1 in step 2 of 4: the update is skipped on both ranks (weights as after
    step 1, engine.skipped_steps 1) and the next steps train on with finite weights. DeepSpeed's
    optimizers do this themselves; ZeRO-0 fp32's plain optimizer through
    trainer.training.engine.skip_nonfinite_updates."""
    out = tmp_path / "skips.json"
    proc = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
                "--module", "skips_on_ranks", str(out)], HERE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert sorted(report) == ["0-bf16", "0-fp32", "1-fp32", "2-bf16", "3-fp32"]
    for name, r in report.items():
        sums = r["checksums"]
        assert r["skipped"] == 1, (name, r)
        assert sums[1] == sums[0], (name, sums)  # step 2 changed nothing
        assert all(s == s and abs(s) < 1e6 for s in sums), (name, sums)  # finite
        assert sums[2] != sums[1] and sums[3] != sums[2], (name, sums)  # and training goes on
