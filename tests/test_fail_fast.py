"""A rank that fails ends at once: an exception in the training loop while data workers are alive
ends the rank, its workers included, with status 6 and the cause in one line; the launcher then
ends the other rank. Before, the rank hung in multiprocessing's exit handler joining a worker that
ignored SIGTERM. A rank that hangs is ended by the stall watchdog (status 4). Both failures are
made on purpose with MDT_FAULTS, as a user rehearsing a cluster's failure handling would."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from trainer.checkpoints import COMPLETE, LATEST, make_tag

from launcher import deepspeed_command, env, free_port, kill_group, run, tiny_config, write_config

pytestmark = pytest.mark.timeout(300)


def _processes_naming(marker: str) -> list[int]:
    """PIDs of live (not zombie) processes whose command line contains `marker`."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(p.info["cmdline"] or []):
            found.append(p.pid)
    return found


def test_an_exception_in_the_loop_ends_the_rank_and_its_workers(digits8, tmp_path):
    cfg = tiny_config(digits8, str(tmp_path / "runs"), run={"total_steps": 40},
                      data={"num_workers": 2, "shards": digits8, "batch_size": 16, "micro_batch_size": 8,
                            "shuffle_buffer": 50})
    config = write_config(cfg, tmp_path / "failing.yaml")
    cmd = deepspeed_command(config, free_port())
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(MDT_FAULTS="raise:call=9:rank=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # a hang is the failure this test exists for: it would sit here until the timeout
        out, err = proc.communicate(timeout=120)  # start-up, 9 steps and the exit: about 20 s here
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"the failed run did not end: {err[-3000:]}")
    assert proc.returncode != 0, out[-2000:] + err[-2000:]
    # the failing rank names itself, the step and the cause in one line, and exits with status 6
    lines = [line for line in (out + err).splitlines() if line.startswith("mdt-train: rank 1 failed")]
    assert lines == ["mdt-train: rank 1 failed in step 9: RuntimeError: injected fault (MDT_FAULTS) in forward "
                     "call 9 (status 6; the traceback is above)"], (out + err)[-4000:]
    assert "rank 1: MDT_FAULTS armed: raise at call 9 on rank 1" in out
    assert "exits with return code = 6" in out + err, (out + err)[-3000:]  # the launcher saw it
    # nothing of the run is left: not the ranks, not their data workers
    deadline = time.monotonic() + 10
    while _processes_naming(str(config)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _processes_naming(str(config))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the failed run still alive: {left}"


def test_a_rank_hung_by_mdt_faults_is_ended_by_the_watchdog(digits8, tmp_path):
    # rank 1 never returns from step 25's forward: the stall watchdog ends the job with status 4
    # and the checkpoint of step 20 is the newest complete one
    # the test waits out the limit once: 15 s keeps clear of start-up's longest silence (building
    # the engine: 5.5 s measured on 2 cores beside a running suite), as test_watchdog's does
    cfg = tiny_config(digits8, str(tmp_path / "runs"), run={"total_steps": 40, "stall_timeout_s": 15})
    config = write_config(cfg, tmp_path / "hang.yaml")
    proc = run(deepspeed_command(config, free_port()), tmp_path, timeout=200,
               extra_env={"MDT_FAULTS": "hang:call=25:rank=1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out[-3000:]
    assert "rank 1 made no progress" in out and "(stuck in: step 25)" in out, out[-3000:]
    root = tmp_path / "runs" / "t" / "checkpoints"
    assert (root / LATEST).read_text() == make_tag(20) and (root / make_tag(20) / COMPLETE).exists()
