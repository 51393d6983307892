"""The shipped sbatch script's stop-and-requeue logic, with stand-ins for srun and scontrol: USR1
creates the stop file the trainer is given, and exit statuses 4 and 5 requeue the job."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "launch_configs" / "slurm_maskdit_xl2.sbatch"

# srun stand-in: records its command, then acts as the trainer would: with STOP_AT_FILE, waits for
# the stop file named in `--set run.stop_file=...` and exits 5; otherwise exits with FAKE_STATUS.
FAKE_SRUN = """#!/bin/bash
echo "$*" > "$WORK/srun_args"
if [ -n "${STOP_AT_FILE:-}" ]; then
  stop=$(echo "$*" | sed -n 's/.*run.stop_file=\\([^ ]*\\).*/\\1/p')
  for i in $(seq 1 200); do [ -e "$stop" ] && exit 5; sleep 0.05; done
  exit 99
fi
exit "${FAKE_STATUS:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo node1; echo node2; else echo "$*" >> "$WORK/scontrol_calls"; fi
"""


def _launch(tmp_path: Path, **env) -> subprocess.Popen:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    full = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", WORK=str(tmp_path), SLURM_SUBMIT_DIR=str(tmp_path),
                SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node[1-2]", SLURM_GPUS_PER_NODE="8", **env)
    return subprocess.Popen(["bash", str(SCRIPT)], cwd=tmp_path, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_usr1_creates_the_stop_file_and_the_job_is_requeued(tmp_path):
    proc = _launch(tmp_path, STOP_AT_FILE="1")
    deadline = time.time() + 20
    while not (tmp_path / "srun_args").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 5, out
    assert f"run.stop_file={tmp_path}/STOP.77" in (tmp_path / "srun_args").read_text()
    assert "asking the trainer to checkpoint and stop" in out
    assert (tmp_path / "scontrol_calls").read_text().split() == ["requeue", "77"]
    assert not (tmp_path / "STOP.77").exists()  # a requeued run must not stop at once


@pytest.mark.parametrize("status, requeued", [(0, False), (2, False), (3, False), (4, True), (5, True)])
def test_requeue_only_for_statuses_a_rerun_resolves(tmp_path, status, requeued):
    proc = _launch(tmp_path, FAKE_STATUS=str(status))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == status, out
    assert (tmp_path / "scontrol_calls").exists() == requeued, out
