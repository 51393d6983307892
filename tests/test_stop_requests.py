"""Asked to stop (the stop file, SIGTERM to the whole process group as scancel and Ctrl-C send it),
a 2-rank run finishes its step, saves a checkpoint there and exits with status 5; the rerun
resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from trainer.checkpoints import COMPLETE, LATEST, STATE_FILE

from launcher import (
    deepspeed_command,
    free_port,
    kill_group,
    rank_processes,
    run,
    start,
    tiny_config,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(600)


def _start_long_run(digits8: str, tmp_path: Path):
    cfg = tiny_config(digits8, str(tmp_path / "runs"), run={"total_steps": 2000},
                      monitor={"log_every": 50, "peak_tflops": 1.0, "sample_count": 4, "sample_steps": 4})
    config = write_config(cfg, tmp_path / "c.yaml")
    log = tmp_path / "run.log"
    proc = start(deepspeed_command(config, free_port()), tmp_path, log)
    root = tmp_path / "runs" / "t" / "checkpoints"
    wait_for(root / "step00000010" / COMPLETE, proc, timeout=200)
    return proc, config, log, root


def _latest_step(root: Path) -> int:
    latest = (root / LATEST).read_text().strip()
    assert (root / latest / COMPLETE).exists()
    return json.loads((root / latest / STATE_FILE).read_text())["state"]["step"]


def test_stop_file_saves_on_a_step_boundary_and_the_rerun_resumes(digits8, tmp_path):
    proc, config, log, root = _start_long_run(digits8, tmp_path)
    stop_file = tmp_path / "runs" / "t" / "STOP"
    try:
        stop_file.touch()
        rc = proc.wait(timeout=150)
    finally:
        kill_group(proc)
    text = log.read_text()
    assert rc == 5, text[-3000:]
    step = _latest_step(root)
    assert step > 10 and f"stop requested (found {stop_file}): checkpoint saved at step {step}" in text, text[-3000:]
    assert not stop_file.exists()  # removed, so the rerun trains on
    again = run(deepspeed_command(config, free_port(), ["--set", f"run.total_steps={step + 3}"]), tmp_path,
                timeout=200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {root / f'step{step:08d}'} at step {step}" in again.stdout
    assert f"done: {step + 3} steps" in again.stdout


def test_sigterm_to_the_process_group_saves_before_the_ranks_exit(digits8, tmp_path):
    proc, _, log, root = _start_long_run(digits8, tmp_path)
    try:
        ranks = rank_processes(proc)
        assert len(ranks) == 2  # their data workers get the signal too, and must not die of it
        os.killpg(proc.pid, signal.SIGTERM)
        # DeepSpeed's runner dies of SIGTERM at once; the ranks save first, then exit
        _, alive = psutil.wait_procs(ranks, timeout=200)
        assert not alive
    finally:
        kill_group(proc)
    text = log.read_text()
    step = _latest_step(root)
    assert step > 10, text[-3000:]
    assert f"stop requested (SIGTERM): checkpoint saved at step {step}" in text, text[-3000:]
    assert "DataLoader worker" not in text, text[-3000:]
