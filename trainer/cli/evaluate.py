"""mdt-eval (metrics of an image set, or a run's in-loop evaluations) and mdt-study."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Collection

from .common import OneLineParser

# The command imports the packages it runs when it runs (the noqa'd imports below): DeepSpeed, which
# the training run, sampling and evaluation pull in, takes seconds to import and prints its
# accelerator line, and --help, --reference, a config error or an export should not wait for it.


def _eval_parser(metrics: Collection[str]) -> argparse.ArgumentParser:
    p = OneLineParser(prog="mdt-eval", description="Frechet distances (Inception FID, digits and MNIST FD) and "
                                                   "digit accuracy of a generated image set against a reference set.")
    p.add_argument("generated", nargs="?", default=None,
                   help="generated images: .npz (arr_0 images, arr_1 labels) or a directory of images")
    p.add_argument("reference", nargs="?", default=None,
                   help="reference images: .npz (arr_0, or precomputed mu/sigma), a directory, or digits:train / "
                        "digits:heldout / mnist:train / mnist:heldout (default for the digits metrics: "
                        "digits:train; for the MNIST ones: mnist:train)")
    p.add_argument("--metrics", default="fid", help=f"comma-separated, from {', '.join(metrics)} (default fid)")
    p.add_argument("--inception", default=None,
                   help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth; default $MDT_INCEPTION_WEIGHTS)")
    p.add_argument("--digits-classifier", default=None,
                   help="digit classifier cache file (default $MDT_CACHE_DIR or ~/.cache/masked-diffusion-trainer; "
                        "trained there on first use)")
    p.add_argument("--mnist-classifier", default=None,
                   help="MNIST classifier cache file (default $MDT_CACHE_DIR or ~/.cache/masked-diffusion-trainer; "
                        "trained there on first use)")
    p.add_argument("--batch-size", type=int, default=50, help="Inception batch size")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    p.add_argument("--history", metavar="RUN_DIR", default=None,
                   help="instead: print the table of a run's in-loop evaluations (RUN_DIR/metrics.jsonl)")
    return p


def eval_main(argv: list[str] | None = None) -> int:
    """mdt-eval: print one `name: value` line per metric (and JSON with --json)."""
    from ..evaluation.errors import EvalError  # noqa: PLC0415
    from ..evaluation.history import history_table, read_metrics  # noqa: PLC0415
    from ..evaluation.metrics import METRICS, evaluate  # noqa: PLC0415

    parser = _eval_parser(METRICS)
    args = parser.parse_args(argv)
    if args.history:
        try:
            print(history_table(read_metrics(args.history)))
        except EvalError as err:
            print(f"mdt-eval: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.generated is None:
        parser.error("give the generated images (or --history RUN_DIR)")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        results = evaluate(args.generated, args.reference, metrics, inception=args.inception,
                           digits_classifier=args.digits_classifier, mnist_classifier=args.mnist_classifier,
                           batch_size=args.batch_size)
    except EvalError as err:
        print(f"mdt-eval: error: {err}", file=sys.stderr)
        return 2
    for name in metrics:
        value = results[name]
        print(f"{name}: {METRICS[name].fmt.format(value)}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def study_main(argv: list[str] | None = None) -> int:
    """mdt-study: train every variant x seed of a study under one budget (resuming, skipping finished
    runs), judge them post hoc, write study.md, study.png and study.json; errors are one line."""
    p = OneLineParser(prog="mdt-study", description="Train the variants of a launch config under one budget, "
                                                    "several seeds each, and compare them (study.md, study.png).")
    p.add_argument("study", help="study YAML (its keys: trainer/study/spec.py)")
    p.add_argument("--dry-run", action="store_true", help="print each run's command, steps and state; launch nothing")
    args = p.parse_args(argv)
    from ..study.runner import run_study  # noqa: PLC0415
    from ..study.spec import StudyError  # noqa: PLC0415

    try:
        run_study(args.study, dry_run=args.dry_run)
    except StudyError as err:
        print(f"mdt-study: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0
