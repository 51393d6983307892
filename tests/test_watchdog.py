"""The stall watchdog: quiet while beats come, a named reason, stacks and status 4 when they stop;
faulthandler's backstop when a call holds the GIL; a frozen rank ends a real 2-rank job."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainer.checkpoints import COMPLETE, LATEST, STATE_FILE
from trainer.training.watchdog import STALL_EXIT_CODE, StallWatchdog

from launcher import (
    ROOT,
    deepspeed_command,
    free_port,
    kill_group,
    rank_processes,
    start,
    tiny_config,
    wait_for,
    write_config,
)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_beats_keep_it_quiet_and_silence_fires_once_with_the_last_label():
    clock, exits, out = FakeClock(), [], io.StringIO()
    dog = StallWatchdog(10.0, rank=3, backstop_grace_s=-1, exit_fn=exits.append, stream=out, clock=clock,
                        poll_s=0.005).start()
    try:
        for step in range(1, 6):  # 5 beats 8 s apart: never 10 s without one
            clock.now += 8.0
            dog.beat(f"step {step}")
            time.sleep(0.1)  # 20 polls of the thread between beats
        assert exits == [] and not dog.fired
        clock.now += 10.5
        assert _wait_until(lambda: exits)
    finally:
        dog.stop()
    assert exits == [STALL_EXIT_CODE] and dog.fired
    message = out.getvalue().splitlines()[0]
    assert "rank 3 made no progress for 10s (stuck in: step 5)" in message
    assert "run.stall_timeout_s=10" in message


def test_a_stream_without_a_file_descriptor_is_fine():
    dog = StallWatchdog(30.0, stream=io.StringIO()).start()  # the backstop falls back to sys.__stderr__
    dog.stop()
    assert not dog.fired


def test_zero_disables_it():
    exits = []
    dog = StallWatchdog(0, backstop_grace_s=-1, exit_fn=exits.append, clock=lambda: 1e9).start()
    assert not dog.enabled and dog._thread is None
    dog.stop()
    assert exits == []


def _script(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from trainer.training.watchdog import StallWatchdog
        {body}
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_a_blocked_process_exits_with_status_4_and_its_stacks(tmp_path):
    proc = _script("""
        def wait_for_a_peer_that_never_answers():
            time.sleep(60)
        dog = StallWatchdog(0.5, rank=1).start()
        dog.beat("step 7")
        wait_for_a_peer_that_never_answers()
    """, tmp_path)
    assert proc.returncode == STALL_EXIT_CODE, proc.stderr
    assert "rank 1 made no progress" in proc.stderr and "(stuck in: step 7)" in proc.stderr
    assert "wait_for_a_peer_that_never_answers" in proc.stderr  # the main thread's stack is in the dump


def test_backstop_fires_when_a_call_holds_the_gil(tmp_path):
    # sum() over a huge range runs in C without giving up the GIL: the Python thread never runs,
    # faulthandler's own thread ends the process after timeout + grace.
    proc = _script("""
        dog = StallWatchdog(0.5, backstop_grace_s=0.5).start()
        sum(range(10 ** 13))
    """, tmp_path)
    assert proc.returncode not in (0, STALL_EXIT_CODE), proc.stderr
    assert "Timeout" in proc.stderr and "made no progress" not in proc.stderr


def test_config_rejects_a_negative_timeout():
    from trainer.config import ConfigError, config_from_dict, validate

    cfg = config_from_dict({"run": {"stall_timeout_s": -1}})
    with pytest.raises(ConfigError, match="run.stall_timeout_s must be >= 0"):
        validate(cfg, 1)


@pytest.mark.timeout(600)
def test_a_frozen_rank_ends_the_job_with_the_last_checkpoint_intact(digits8, tmp_path):
    """SIGSTOP rank 1 mid-run (a frozen node): rank 0 waits in a collective, its watchdog ends it
    with status 4, the launcher ends the job, and the newest complete checkpoint is resumable."""
    cfg = tiny_config(digits8, str(tmp_path / "runs"), run={"total_steps": 2000, "stall_timeout_s": 15},
                      monitor={"log_every": 50, "peak_tflops": 1.0, "sample_count": 4, "sample_steps": 4})
    log = tmp_path / "run.log"
    proc = start(deepspeed_command(write_config(cfg, tmp_path / "c.yaml"), free_port()), tmp_path, log)
    try:
        root = tmp_path / "runs" / "t" / "checkpoints"
        wait_for(root / "step00000010" / COMPLETE, proc, timeout=250)
        ranks = rank_processes(proc)
        assert len(ranks) == 2, [p.cmdline() for p in ranks]
        os.kill(ranks[1].pid, signal.SIGSTOP)
        # The launcher has seen rank 0's status once it starts ending the job. A stopped rank cannot
        # act on its SIGTERM: the launcher SIGKILLs it after 30 s of its own grace; doing that here
        # now ends the job as that would (its data workers die with it), 30 s sooner.
        _wait_until(lambda: "Killing subprocess" in log.read_text() or proc.poll() is not None, timeout=250)
        os.kill(ranks[1].pid, signal.SIGKILL)
        rc = proc.wait(timeout=250)
    finally:
        kill_group(proc)
    text = log.read_text()
    assert rc == STALL_EXIT_CODE, text[-3000:]  # the launcher passes the rank's status on
    assert f"exiting with status {STALL_EXIT_CODE}" in text and "rank 0 made no progress" in text, text[-3000:]
    assert "Thread" in text and "File " in text  # the stack dump
    latest = (root / LATEST).read_text().strip()
    assert (root / latest / COMPLETE).exists()
    assert json.loads((root / latest / STATE_FILE).read_text())["state"]["step"] >= 10
