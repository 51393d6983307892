"""The one table of benchmarks/gpu_check.sh, from what its parts wrote into OUT_DIR:

    python benchmarks/gpu_check_table.py OUT_DIR

Rows: each bare training step of part 1 (batch, images/s, TFLOP/s, MFU), the trainer run of part 2
(median logged images/s over its log lines after the first, against the bare step of the same
network and batch), and the sampling of part 3 (seconds and the Skip-Cache speed-up). Parts that
did not run are left out, with a line saying so.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
from typing import Dict, List


def step_rows(text: str) -> List[Dict[str, str]]:
    """The rows of a bench_train_step.py table: model, batch, img/s, TFLOP/s, MFU."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[1].isdigit():
            rows.append({"model": cells[0], "batch": cells[1], "img/s": cells[3], "TFLOP/s": cells[5],
                         "MFU": cells[6]})
    return rows


def peak(text: str) -> str | None:
    found = re.search(r"matmul peak: ([\d.]+) TFLOP/s", text)
    return found.group(1) if found else None


def trainer_images_per_s(text: str) -> float | None:
    """Median of the logged img/s after the first log line (which holds start-up and the warm-up)."""
    values = [float(v) for v in re.findall(r"\| ([\d.]+) img/s \|", text)]
    return statistics.median(values[1:]) if len(values) > 1 else None


def sample_seconds(text: str) -> float | None:
    found = re.search(r"steps in ([\d.]+)s", text)
    return float(found.group(1)) if found else None


def read(out: str, name: str) -> str:
    path = os.path.join(out, name)
    return open(path).read() if os.path.exists(path) else ""


def main(out: str) -> int:
    step, skip = read(out, "step.txt"), read(out, "step_skip.txt")
    lines = [f"bf16 matmul peak measured: {peak(step) or '?'} TFLOP/s", "",
             "| what | batch | images/s | TFLOP/s | MFU | note |", "|---|---|---|---|---|---|"]
    rows = step_rows(step)
    if not rows:
        print("gpu_check: no step table in step.txt (part 1 did not finish)")
        return 1
    by_model = {r["model"]: r for r in rows}
    base = float(rows[0]["img/s"]) or 1.0
    for r in rows:
        lines.append(f"| bare step {r['model']} | {r['batch']} | {r['img/s']} | {r['TFLOP/s']} | {r['MFU']} "
                     f"| {float(r['img/s']) / base:.2f}x {rows[0]['model']}'s images/s |")
    bare = step_rows(skip)
    logged = trainer_images_per_s(read(out, "train.txt"))
    if bare and logged is not None:
        b = bare[0]
        lines.append(f"| bare step {b['model']} | {b['batch']} | {b['img/s']} | {b['TFLOP/s']} | {b['MFU']} "
                     "| the trainer run's network |")
        ratio = logged / float(b["img/s"])
        lines.append(f"| trainer run (deepspeed launcher, ZeRO-2, EMA) | {b['batch']} | {logged:.1f} | | "
                     f"| {ratio:.2f}x the bare step ({(ratio - 1) * 100:+.0f}%) |")
    else:
        lines.append("| trainer run | | | | | not run (see the log) |")
    plain, cached = sample_seconds(read(out, "sample_none.txt")), sample_seconds(read(out, "sample_2.txt"))
    if plain and cached:
        lines.append(f"| sampling 8 images, no cache | | {8 / plain:.2f} | | | {plain:.1f} s |")
        lines.append(f"| sampling 8 images, Skip-Cache N=2 | | {8 / cached:.2f} | | | {cached:.1f} s, "
                     f"{plain / cached:.2f}x faster |")
    else:
        lines.append("| sampling | | | | | not run |")
    masked = [m for m in by_model if m.startswith("MaskDiT") and "compiled" not in m]
    plain_dit = [m for m in by_model if m.startswith("DiT") and "compiled" not in m]
    if masked and plain_dit:
        speed = float(by_model[masked[0]]["img/s"]) / float(by_model[plain_dit[0]]["img/s"])
        lines.append("")
        lines.append(f"MaskDiT over DiT, eager: {speed:.2f}x the images/s (goal: 1.8x)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out"))
