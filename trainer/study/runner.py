"""`mdt-study STUDY.yaml`: train each variant x seed of a study (trainer/study/spec.py describes the
file) one run at a time through the deepspeed launcher, exactly as a user launches mdt-train, judge
each finished run post hoc (posthoc.py), then write study.md, study.png and study.json (report.py)
into the study's output_dir.

Rerunning the study resumes it: finished runs (a complete checkpoint at their last step and a final
evaluation in metrics.jsonl) are skipped, unfinished ones are relaunched with the same command and
resume from their latest checkpoint, post-hoc results come from each run's posthoc.json. A run
that fails stops the study with a one-line error naming the run and its log (RUN_DIR/study.log).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, TextIO

from ..checkpoints import CheckpointError, find_resume, read_record
from ..evaluation.errors import EvalError
from ..evaluation.history import read_metrics
from ..progress import ProgressLine
from .report import write_report
from .spec import PlannedRun, Study, StudyError, load_study, plan_runs
from .summary import summarize

LOG_FILE = "study.log"
FINISHED, RESUME, NEW = "finished", "resume", "new"
STEP_LINE = re.compile(r"(?:^|\]:? )step (\d+)/(\d+) \|")
"""The trainer's progress line (rank 0), possibly behind a launcher's '[...] ' prefix."""
_UNCOMPARED = ("run.total_steps", "run.time_limit_s", "run.stall_timeout_s", "run.stop_file", "checkpoint.",
               "monitor.", "data.num_workers")
"""Config keys a run may resume under other values of (the budget, logging, saving)."""


def run_records(run_dir: str) -> List[Dict[str, Any]]:
    """A run's evaluation records (RUN_DIR/metrics.jsonl), by step; [] before its first evaluation,
    StudyError (mdt-study's one-line error) for a line that is not a record."""
    try:
        return read_metrics(run_dir, missing_ok=True)
    except EvalError as err:
        raise StudyError(str(err)) from None


def _flat(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "options" and key != "extra":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_same_config(run: PlannedRun, checkpoint: str, trained: Dict[str, Any]) -> None:
    """A run dir left by a study whose variant read otherwise must not be skipped or resumed silently."""
    ours = _flat(run.config.to_dict())
    for key, value in _flat(trained).items():
        if key in ours and ours[key] != value and not key.startswith(_UNCOMPARED):
            raise StudyError(f"run {run.name}: {checkpoint} was trained with {key}={value!r}, the study now asks for "
                             f"{ours[key]!r}: restore the study file or remove {run.run_dir}")


@dataclass(frozen=True)
class RunStatus:
    """Where a planned run stands: FINISHED, RESUME (from `step`) or NEW."""

    state: str
    step: int = 0


def run_status(run: PlannedRun) -> RunStatus:
    """FINISHED when the newest complete checkpoint is at the run's last step (total_steps, or past the
    wall-time limit) and metrics.jsonl holds the final evaluation of that step."""
    try:
        checkpoint = find_resume(os.path.join(run.run_dir, "checkpoints"), "auto")
        if checkpoint is None:
            return RunStatus(NEW)
        record = read_record(checkpoint)
    except CheckpointError as err:
        raise StudyError(f"run {run.name}: {err}") from None
    _check_same_config(run, checkpoint, record.config)
    finals = [r for r in run_records(run.run_dir) if r.get("final") and r["step"] == record.step]
    limit = run.config.run.time_limit_s
    done = record.step >= run.steps or (limit is not None and bool(finals) and finals[-1]["train_seconds"] >= limit)
    return RunStatus(FINISHED if done and finals else RESUME, record.step)


def free_port() -> int:
    """A TCP port free right now, for the launcher's --master_port (a fresh one per launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> Dict[str, str]:
    """The runs' environment: ours, unbuffered output (the log follows the run), and one OpenMP
    thread per rank unless set (as torchrun does: ranks sharing a node's cores oversubscribe them)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """Ask the launcher and its ranks to stop (SIGINT: the trainer saves and exits), then kill them."""
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGKILL, 60.0)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def launch(run: PlannedRun, command: List[str], on_step: Callable[[int], None], grace_s: float = 120.0) -> str:
    """Run one training launch to its end, its output appended to RUN_DIR/study.log; on_step gets
    each step the trainer logs. Returns the log's path; StudyError naming the run if it fails."""
    os.makedirs(run.run_dir, exist_ok=True)
    log_path = os.path.join(run.run_dir, LOG_FILE)
    with open(log_path, "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} mdt-study launches: {shlex.join(command)}\n")
        log.flush()
        # A session of its own: the launcher and its ranks can be stopped together, and only on purpose.
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=launch_env(), start_new_session=True)
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                match = STEP_LINE.search(line)
                if match:
                    on_step(int(match.group(1)))
            code = proc.wait()
        except KeyboardInterrupt:
            _stop(proc, grace_s)
            raise StudyError(f"interrupted during run {run.name} (its log: {log_path}); rerun the study to resume "
                             "it", 130) from None
        except BaseException:
            _stop(proc, 0.0)
            raise
    if code != 0:  # the study ends with the run's status (a signal's death reads as 1)
        raise StudyError(f"run {run.name} failed with exit status {code}; its log: {log_path}",
                         code if 0 < code < 256 else 1)
    return log_path


def _dry_run(study: Study, runs: List[PlannedRun], statuses: List[RunStatus], out: TextIO) -> Dict[str, Any]:
    print(f"study {study.name}: {len(runs)} runs on {study.ranks} ranks each, budget {study.budget_text()}, "
          f"output {study.output_dir}", file=out)
    plan = []
    for k, (run, status) in enumerate(zip(runs, statuses), 1):
        state = {FINISHED: "finished", RESUME: f"resumes from step {status.step}", NEW: "new"}[status.state]
        command = run.command(study.base, study.ranks, "PORT", sys.executable)
        print(f"run {k}/{len(runs)} {run.name}: {run.steps} steps "
              f"({run.steps * run.config.data.batch_size:,} images), {state}\n  {shlex.join(command)}", file=out)
        plan.append({"name": run.name, "variant": run.variant, "seed": run.seed, "steps": run.steps,
                     "state": status.state, "command": command})
    return {"name": study.name, "runs": plan}


def train_all(study: Study, runs: List[PlannedRun], out: TextIO | None = None, err: TextIO | None = None) -> None:
    """Launch every unfinished run in order; one progress line for the study (run k of n, its last
    logged step, the ETA of the study's training from the steps done so far) on err (stderr)."""
    out, err = out or sys.stdout, err or sys.stderr
    todo = [(k, run, status) for k, (run, status) in enumerate(((r, run_status(r)) for r in runs), 1)
            if status.state != FINISHED]
    print(f"study {study.name}: {len(runs)} runs, {len(runs) - len(todo)} already finished; budget "
          f"{study.budget_text()}; output {study.output_dir}", file=out, flush=True)
    bar = ProgressLine(sum(run.steps - status.step for _, run, status in todo), "step", stream=err)
    done = 0
    for k, run, status in todo:
        what = "resumes from step " + str(status.step) if status.state == RESUME else "starts"
        print(f"run {k}/{len(runs)} {run.name} {what}: {run.steps} steps; log {os.path.join(run.run_dir, LOG_FILE)}",
              file=out, flush=True)

        def on_step(step: int, k: int = k, run: PlannedRun = run, start: int = status.step) -> None:
            bar.update(done + max(0, step - start), f"run {k}/{len(runs)} {run.name}: step {step}/{run.steps}")

        log = launch(run, run.command(study.base, study.ranks, free_port(), sys.executable), on_step)
        if run_status(run).state != FINISHED:
            raise StudyError(f"run {run.name} ended without its final checkpoint and evaluation "
                             f"(metrics.jsonl); its log: {log}", 1)
        done += run.steps - status.step


def report(study: Study, runs: List[PlannedRun], posthoc: Dict[str, Dict[int, Any]]) -> Dict[str, Any]:
    """The study's numbers from the runs' records (summary.summarize); writes the report."""
    records: Dict[str, Dict[int, List[Dict[str, Any]]]] = {}
    for run in runs:
        records.setdefault(run.variant, {})[run.seed] = run_records(run.run_dir)
    notes = sorted({p["note"] for seeds in posthoc.values() for p in seeds.values() if p and p.get("note")})
    head = {"name": study.name, "quality": study.quality, "baseline": study.baseline, "budget": study.budget,
            "budget_text": study.budget_text(), "ranks": study.ranks, "base": study.base,
            "posthoc_images": study.posthoc_images, "posthoc_note": "; ".join(notes) or None}
    try:
        summary = summarize(head, records, posthoc)
    except ValueError as err:
        raise StudyError(f"report: {err}") from None
    summary["files"] = write_report(summary, study.output_dir)
    return summary


def run_study(path: str, *, dry_run: bool = False, posthoc: bool = True, out: TextIO | None = None,
              err: TextIO | None = None) -> Dict[str, Any]:
    """mdt-study as a function: plan (every run's config validated before anything starts), train
    what is unfinished, judge post hoc, report. Returns the report's numbers (study.json), or with
    dry_run the plan ({"name", "runs": [{name, variant, seed, steps, state, command}]}). StudyError."""
    out = out or sys.stdout  # resolved per call: a caller (or a test) may have replaced sys.stdout
    study = load_study(path)
    runs = plan_runs(study)
    if dry_run:
        return _dry_run(study, runs, [run_status(r) for r in runs], out)
    train_all(study, runs, out, err)
    judged: Dict[str, Dict[int, Any]] = {}
    if posthoc and study.posthoc_images:
        # Sampling imports DeepSpeed's accelerator (seconds, and a log line): only when judging.
        from ..distributed import accelerator_device  # noqa: PLC0415
        from .posthoc import posthoc as judge  # noqa: PLC0415

        device = accelerator_device()
        for run in runs:
            judged.setdefault(run.variant, {})[run.seed] = judge(run, study, device,
                                                                 lambda text: print(text, file=out, flush=True))
    summary = report(study, runs, judged)
    print(f"wrote {summary['files']['md']}, {summary['files']['png']} and {summary['files']['json']}", file=out)
    return summary
