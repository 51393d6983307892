"""The one metric registry (trainer/evaluation/registry.py) and its readers: the eval.metrics groups,
mdt-eval's metrics and print formats, the training run's `eval step` line, the history table and
the study's directions, each printing exactly as before the registry; one `read_metrics` for
mdt-eval --history (no file: an error) and the study (no file: no records yet)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trainer.config.validation import EVAL_METRICS
from trainer.evaluation.errors import EvalError
from trainer.evaluation.history import history_table, read_metrics
from trainer.evaluation.metrics import METRICS
from trainer.evaluation.registry import METRIC_SPECS, direction, guided, in_groups, line_text, table_text


def test_the_registry_names_groups_directions_and_formats():
    assert EVAL_METRICS == ("val_loss", "digits", "fid", "mnist")
    assert list(METRIC_SPECS) == ["val_loss", "digits_fd", "fid", "digits_acc", "mnist_fd", "mnist_acc"]
    assert set(METRICS) == {"fid", "digits_fd", "digits_acc", "mnist_fd", "mnist_acc"}
    assert METRIC_SPECS["val_loss"].function is None
    # the evaluator's order within an evaluation: group by group, whatever order eval.metrics lists
    assert [s.name for s in in_groups(["fid", "digits", "val_loss"])] == ["val_loss", "digits_fd", "digits_acc", "fid"]
    assert guided("digits_fd", 1.0) == "digits_fd" and guided("fid", 1.5) == "fid@g1.5"
    assert direction("digits_acc@g2") == "higher" and direction("val_loss/sigma=0.3") == "lower"
    with pytest.raises(ValueError, match="^unknown metric 'psnr': choose from val_loss, digits_fd, fid, digits_acc"):
        direction("psnr")
    # mdt-eval's lines, the eval step line, tables: as printed before the registry
    assert METRICS["digits_acc"].fmt.format(0.965) == "96.50%" and METRICS["fid"].fmt.format(2.5) == "2.5000"
    assert line_text("digits_acc@g2", 0.965) == "96.50%" and line_text("val_loss", 0.0412345) == "0.04123"
    assert table_text("digits_acc", 0.965) == "96.5%" and table_text("val_loss/sigma=0.3", 12.3456) == "12.35"
    assert table_text("not_registered_acc", 0.5) == "0.5"  # a name outside the registry prints plainly


def test_the_registry_is_light_for_the_config():
    """The launch config reads the registry: importing it loads neither torch nor the metric code."""
    code = ("import sys, trainer.evaluation.registry; "
            "print(sorted(m for m in ('torch', 'numpy', 'trainer.evaluation.metrics', 'trainer.evaluation.image_sets') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_history_table_and_one_read_metrics(tmp_path):
    record = {"step": 10, "images_seen": 160, "train_seconds": 90.0, "accelerator_hours": 0.05,
              "metrics": {"val_loss": 0.5, "val_loss/sigma=1": 0.25, "digits_acc": 0.965, "digits_acc@g2": 0.9}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    for where in (str(tmp_path), str(tmp_path / "metrics.jsonl")):
        assert read_metrics(where) == read_metrics(where, missing_ok=True) == [record]
    table = history_table(read_metrics(str(tmp_path))).splitlines()
    assert table[0] == "| step | images | train min | accel h | val_loss | digits_acc | digits_acc@g2 |"
    assert table[2] == "| 10 | 160 | 1.50 | 0.050 | 0.5 | 96.5% | 90.0% |"
    chosen = history_table([record], ["val_loss/sigma=1", "fid"]).splitlines()
    assert chosen[2] == "| 10 | 160 | 1.50 | 0.050 | 0.25 | - |"
    # no file: an error for mdt-eval --history, no records yet for the study
    with pytest.raises(EvalError, match="does not exist: the run has no in-loop evaluations"):
        read_metrics(str(tmp_path / "new"))
    assert read_metrics(str(tmp_path / "new"), missing_ok=True) == []
    # a bad line (not the last) is an error either way
    (tmp_path / "metrics.jsonl").write_text("nonsense\n" + json.dumps(record) + "\n")
    for missing_ok in (False, True):
        with pytest.raises(EvalError, match=r"metrics.jsonl:1: not an evaluation record"):
            read_metrics(str(tmp_path), missing_ok=missing_ok)
