"""Launch 2-rank CPU training runs through the real `deepspeed` launcher for tests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import yaml

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^step (\d+)/\d+ \| (\S*) r=([\d.]+) \| loss ([\d.eE+-]+|nan|inf)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(shards: str, out_dir: str, **sections) -> Dict:
    """A config for a tiny MaskDiT on 3x8x8 digits; keyword sections update the defaults."""
    cfg = {
        "run": {"name": "t", "output_dir": out_dir, "seed": 3, "total_steps": 20},
        "model": {"name": "MaskDiT-S/2", "skip": True,
                  "options": {"hidden_size": 32, "depth": 2, "num_heads": 2, "decoder_depth": 1,
                              "decoder_hidden_size": 16, "decoder_num_heads": 2}},
        "data": {"shards": shards, "batch_size": 16, "micro_batch_size": 8, "num_workers": 1, "shuffle_buffer": 50},
        "optim": {"lr": 2e-3, "torch_adam": True, "warmup_steps": 2},
        "phases": {"mask_ratio": 0.5},
        "ema": {"decay": 0.99},
        "checkpoint": {"every": 10, "keep_last": 5},
        "monitor": {"log_every": 5, "peak_tflops": 1.0, "sample_count": 4, "sample_steps": 4},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def seed_resume(src_run: Path, dest_run: Path, tag: str) -> None:
    """Copy checkpoint `tag` of the run in `src_run` into a fresh run directory `dest_run` and mark
    it the latest, so a run there resumes from it."""
    ckpts = dest_run / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / tag, ckpts / tag)
    (ckpts / "latest").write_text(tag)


def write_config(cfg: Dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra: str) -> Dict[str, str]:
    """The ranks' environment: one thread each, unbuffered, the project and tests/ importable
    (tests/eval_on_ranks.py runs as a rank's module); `extra` adds variables."""
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    e.update(extra)
    return e


def deepspeed_command(config: Path, port: int, extra: List[str] | None = None,
                      launcher_args: List[str] | None = None, module: str = "trainer.cli") -> List[str]:
    """The same command a user types, with this interpreter's deepspeed runner."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", *(launcher_args or ["--num_gpus", "2"]),
            "--master_port", str(port), "--module", module, "--config", str(config), *(extra or [])]


RUN_MARK = "launcher: the next config's run starts"
FAULTS_MARK = "+MDT_FAULTS="


def train_each_command(configs: List[Path], port: int, faults: List[str] | None = None) -> List[str]:
    """A 2-rank launch whose ranks run the Trainer of each config in turn (`python -m launcher`,
    below): start-up, not training, is most of a tiny run's time. `faults`: an MDT_FAULTS value per
    config, armed for its run only. Split the launch's output with `runs_in`."""
    runs = [f"{c}{FAULTS_MARK}{f}" if f else str(c) for c, f in zip(configs, faults or [""] * len(configs))]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
            "--module", "launcher", *runs]


def runs_in(output: str) -> List[str]:
    """Rank 0's output of each run of a `train_each_command` launch, in order."""
    return output.split(RUN_MARK + "\n")[1:]


def _train_each(runs: List[str]) -> int:
    """On a rank: what mdt-train does for each config, with one process group for them all."""
    from deepspeed import DeepSpeedEngine

    from trainer.config import load_config
    from trainer.distributed import init_distributed, shutdown
    from trainer.training import task
    from trainer.training.faults import arm_faults
    from trainer.training.shard_reader import end_data_workers
    from trainer.training.trainer import Trainer

    info = init_distributed()
    unarmed = task.TrainingModule.forward, DeepSpeedEngine.save_checkpoint  # what faults patch
    try:
        for path_and_faults in runs:
            path, _, faults = path_and_faults.partition(FAULTS_MARK)
            if info.rank == 0:
                print(RUN_MARK, flush=True)
            arm_faults(info.rank, faults)
            try:
                Trainer(load_config(path), info).train()
            finally:
                task.TrainingModule.forward, DeepSpeedEngine.save_checkpoint = unarmed
            end_data_workers()
    finally:
        shutdown()
    return 0


def run(cmd: List[str], cwd: Path, timeout: int = 400, extra_env: Dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    """Run a launcher to the end; past `timeout` kill it with its ranks (no orphans left spinning)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(**(extra_env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def start(cmd: List[str], cwd: Path, log: Path, extra_env: Dict[str, str] | None = None) -> subprocess.Popen:
    """Start a launcher in its own process group (so it and its ranks can be killed together)."""
    return subprocess.Popen(cmd, cwd=cwd, env=env(**(extra_env or {})), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def rank_processes(proc: subprocess.Popen) -> list:
    """The training ranks under a launcher started with `start` (children of deepspeed's per-node
    launch process, so not their forked data workers), in local-rank order."""
    import psutil

    launch = [p for p in psutil.Process(proc.pid).children(recursive=True)
              if "deepspeed.launcher.launch" in p.cmdline()]
    ranks = [p for p in launch[0].children() if "trainer.cli" in p.cmdline()]
    return sorted(ranks, key=lambda p: next(a for a in p.cmdline() if a.startswith("--local_rank=")))


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {path} appeared")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.2)


def losses(output: str) -> Dict[int, float]:
    """step -> logged loss, from the rank-0 progress lines."""
    out = {}
    for line in output.splitlines():
        m = STEP_LINE.match(line.split("] ", 1)[-1] if line.startswith("[") else line)
        if m:
            out[int(m.group(1))] = float(m.group(4))
    return out


if __name__ == "__main__":
    sys.exit(_train_each([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
