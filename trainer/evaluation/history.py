"""A run's in-loop evaluations (RUN_DIR/metrics.jsonl, written by the training run's evaluator):
reading them (`mdt-eval --history`, the study), and the table `mdt-eval --history RUN_DIR` prints."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence

from .errors import EvalError
from .registry import table_text

METRICS_FILE = "metrics.jsonl"


def parse_metrics(text: str, where: str = "metrics.jsonl") -> List[Dict[str, Any]]:
    """Evaluation records of one run, one per step (a repeated step keeps its last record), by step.
    A last line cut short by a crash is dropped; any other bad line is a ValueError naming it."""
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    by_step: Dict[int, Dict[str, Any]] = {}
    for k, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError) as err:
            if k == len(lines) - 1:
                break
            raise ValueError(f"{where}:{number}: not an evaluation record ({err})") from None
    return [by_step[s] for s in sorted(by_step)]


def read_metrics(run_dir: str, *, missing_ok: bool = False) -> List[Dict[str, Any]]:
    """The evaluation records of a run (RUN_DIR or the .jsonl path), one per step, in step order;
    EvalError when a line is not a record, and when there is no file unless missing_ok (then []: a
    run before its first evaluation, as the study reads it)."""
    path = run_dir if run_dir.endswith(".jsonl") else os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        if missing_ok:
            return []
        raise EvalError(f"{path} does not exist: the run has no in-loop evaluations (set eval.every)")
    with open(path) as f:
        try:
            return parse_metrics(f.read(), path)
        except ValueError as err:
            raise EvalError(str(err)) from None


def _cell(name: str, value: float | None) -> str:
    return "-" if value is None else table_text(name, value)


def history_table(records: Sequence[Dict[str, Any]], metrics: Sequence[str] | None = None) -> str:
    """A markdown table: step, images, training minutes and accelerator hours, then each metric
    (default: every metric without a per-level '/', in the order first seen)."""
    if metrics is None:
        metrics = []
        for r in records:
            metrics += [m for m in r["metrics"] if "/" not in m and m not in metrics]
    head = ["step", "images", "train min", "accel h", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        row = [str(r["step"]), str(r["images_seen"]), f"{r['train_seconds'] / 60:.2f}", f"{r['accelerator_hours']:.3f}"]
        row += [_cell(m, r["metrics"].get(m)) for m in metrics]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
