"""The shipped sbatch script, run by bash with stand-ins for srun, scontrol and deepspeed: USR1
creates the stop file the trainer is given and requeues; only a stall (a few times) or a stop the
script asked for requeue; arguments reach the trainer word for word."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "launch_configs" / "slurm_maskdit_xl2.sbatch"

FAKES = {
    # srun: drop its own options, run the task command on "node 0"
    "srun": """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
""",
    "scontrol": """#!/bin/bash
if [ "$1" = show ]; then echo node1; echo node2; else echo "$*" >> "$WORK/scontrol_calls"; fi
""",
    # deepspeed: record the words it got; with STOP_AT_FILE act as the trainer (exit 5 once the
    # stop file named by --set run.stop_file=... appears), else exit FAKE_STATUS
    "deepspeed": """#!/bin/bash
printf '%s\\n' "$@" > "$WORK/deepspeed_args"
stop=""
for a in "$@"; do case "$a" in run.stop_file=*) stop="${a#run.stop_file=}";; esac; done
if [ -n "${STOP_AT_FILE:-}" ]; then
  for i in $(seq 1 400); do [ -e "$stop" ] && exit 5; sleep 0.05; done
  exit 99
fi
exit "${FAKE_STATUS:-0}"
""",
}


def _launch(tmp_path: Path, *args: str, **env) -> subprocess.Popen:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    full = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", WORK=str(tmp_path), SLURM_SUBMIT_DIR=str(tmp_path),
                SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node[1-2]", SLURM_GPUS_PER_NODE="8", **env)
    return subprocess.Popen(["bash", str(SCRIPT), *args], cwd=tmp_path, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_usr1_creates_the_stop_file_and_the_job_is_requeued(tmp_path):
    proc = _launch(tmp_path, "--set", "run.name=my run", STOP_AT_FILE="1")
    deadline = time.time() + 20
    while not (tmp_path / "deepspeed_args").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 5, out
    words = (tmp_path / "deepspeed_args").read_text().splitlines()
    assert f"run.stop_file={tmp_path}/STOP.77" in words
    assert words[-2:] == ["--set", "run.name=my run"]  # one word, space kept
    assert words[words.index("--node_rank") + 1] == "0"
    assert words[words.index("--hostfile") + 1] == f"{tmp_path}/hostfile.77"
    assert (tmp_path / "hostfile.77").read_text().splitlines() == ["node1 slots=8", "node2 slots=8"]
    assert "asking the trainer to checkpoint and stop" in out
    assert (tmp_path / "scontrol_calls").read_text().split() == ["requeue", "77"]
    assert not (tmp_path / "STOP.77").exists()  # a requeued run must not stop at once


@pytest.mark.parametrize("status, restarts, requeued", [
    (0, 0, False), (2, 0, False), (3, 0, False),
    (4, 0, True), (4, 3, False),  # a stall requeues, but not forever (MAX_STALL_REQUEUES=3)
    (5, 0, False),  # a stop nobody asked the script for: the user's own, the job ends
])
def test_requeue_only_when_a_rerun_helps(tmp_path, status, restarts, requeued):
    proc = _launch(tmp_path, FAKE_STATUS=str(status), SLURM_RESTART_COUNT=str(restarts))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == status, out
    assert (tmp_path / "scontrol_calls").exists() == requeued, out
