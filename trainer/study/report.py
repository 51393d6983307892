"""A study's report: its numbers (summary.summarize, the content of study.json) rendered as
study.md (tables) and study.png (quality against training FLOPs and wall time, matplotlib's Agg
renderer), written with study.json into the study's output_dir."""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping

from matplotlib.figure import Figure

from data_tools.atomic import write_json_atomic, write_text_atomic

from ..evaluation.registry import table_text
from ..progress import format_eta

# ----------------------------------------------------------------------------- study.md


def _num(value: float | None, fmt: str = "{:.4g}") -> str:
    return "-" if value is None else fmt.format(value)


def _cell(metric: str, value: float | None) -> str:
    return "-" if value is None else table_text(metric, value)


def _need(need: Mapping[str, float] | None, axis: str, fmt: str) -> str:
    if need is None:
        return "not reached"
    return format_eta(need[axis]) if axis == "train_seconds" else fmt.format(need[axis])


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _posthoc_lines(summary: Mapping[str, Any]) -> list:
    """One table per post-hoc metric: a row per variant (and per variant with Skip-Cache), a column
    per guidance scale, means over seeds."""
    variants = [v for v in summary["variants"] if v.get("posthoc")]
    if not variants:
        return []
    metrics = sorted({m for v in variants for t in v["posthoc"].values() for m in t})
    scales = sorted({s for v in variants for t in v["posthoc"].values() for m in t.values() for s in m}, key=float)
    lines = []
    for metric in metrics:
        lines += ["", f"### `{metric}` by guidance scale (post hoc, {summary.get('posthoc_images', '?')} images, "
                  "mean over seeds)", "", "| variant | " + " | ".join(f"g = {s}" for s in scales) + " |",
                  "|---|" + "---|" * len(scales)]
        for v in variants:
            for kind, label in (("full", v["name"]), ("skip_cache", f"{v['name']} + Skip-Cache"),
                                ("path_drop", f"{v['name']}, path-drop guidance")):
                row = v["posthoc"].get(kind, {}).get(metric)
                if row:
                    lines.append(f"| {label} | " + " | ".join(_cell(metric, row.get(s)) for s in scales) + " |")
    return lines


def _guidance_kind_lines(summary: Mapping[str, Any]) -> list:
    """Classifier-free against path-drop guidance where both were judged: each at its best scale,
    with the network GFLOPs one image cost there (counted)."""
    variants = [v for v in summary["variants"] if v.get("guided_path_drop") and v.get("guided")]
    if not variants:
        return []
    lines = ["", "### Classifier-free against path-drop guidance (post hoc, each at its best scale)", "",
             "| variant | guidance | best quality | at guidance | GFLOPs per image | all scales |",
             "|---|---|---|---|---|---|"]
    for v in variants:
        for label, g in (("CFG", v["guided"]), ("path-drop", v["guided_path_drop"])):
            scales = ", ".join(f"{k}: {x:.4g}" for k, x in g["scales"].items())
            lines.append(f"| {v['name']} | {label} | {g['best']:.4g} ({g['metric']}) | {g['best_scale']:g} "
                         f"| {_num(g.get('gflops_per_image'), '{:.3g}')} | {scales} |")
    return lines


def render_markdown(summary: Mapping[str, Any]) -> str:
    """study.md: the headline table, guidance and Skip-Cache, one row per run, and the plot."""
    q, way = summary["quality"], summary["direction"]
    lines = [f"# Study {summary['name']}", "",
             f"Headline quality: `{q}` ({way} is better). Budget per run: {summary.get('budget_text', '-')}. "
             f"Target: `{q}` = {summary['target']:.4g}, the final mean of the baseline `{summary['baseline']}`. "
             "Values are mean ± standard deviation over seeds; what a variant needed to reach the target is read "
             "off its mean curve, interpolated linearly between evaluations.", "",
             f"| variant | seeds | {q} at budget | steps to target | images to target | training FLOPs to target "
             "| wall time to target | accelerator hours to target | speed-up (wall time) | speed-up (images) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in summary["variants"]:
        name = f"{v['name']} (baseline)" if v.get("baseline") else v["name"]
        if v["final"] is None:
            lines.append(f"| {name} | {len(v['seeds'])} | no evaluation of {q} | | | | | | | |")
            continue
        f, need = v["final"], v["to_target"]
        quality = _num(f["mean"]) + ("" if f["sd"] is None else f" ± {f['sd']:.2g}")
        lines.append(f"| {name} | {len(v['seeds'])} | {quality} | {_need(need, 'step', '{:,.0f}')} "
                     f"| {_need(need, 'images_seen', '{:,.0f}')} | {_need(need, 'train_flops', '{:.3g}')} "
                     f"| {_need(need, 'train_seconds', '')} | {_need(need, 'accelerator_hours', '{:.3g}')} "
                     f"| {_speedup(v['speedup']['wall'])} | {_speedup(v['speedup']['images'])} |")
    lines += ["", "## Guidance and Skip-Cache", ""]
    if summary.get("posthoc_note"):
        lines += [summary["posthoc_note"], ""]
    lines += ["| variant | best guided quality | at guidance | all scales | Skip-Cache speed-up | digits_fd change "
              "with Skip-Cache |", "|---|---|---|---|---|---|"]
    for v in summary["variants"]:
        g, s = v.get("guided"), v.get("skip_cache")
        scales = ", ".join(f"{k}: {x:.4g}" for k, x in g["scales"].items()) if g else "-"
        best = f"{g['best']:.4g} ({g['metric']})" if g else "-"
        lines.append(f"| {v['name']} | {best} | {_num(g and g['best_scale'], '{:g}')} | {scales} "
                     f"| {_speedup(s and s['speedup'])} "
                     f"| {_num(s and s.get('digits_fd_change'), '{:+.3g}')} |")
    lines += _guidance_kind_lines(summary)
    lines += _posthoc_lines(summary)
    lines += ["", "## Runs", "", f"| variant | seed | final step | {q} final | steps to target | wall time to target |",
              "|---|---|---|---|---|---|"]
    for v in summary["variants"]:
        for r in v["runs"]:
            need = r["to_target"]
            lines.append(f"| {v['name']} | {r['seed']} | {r['final_step']:,} | {r['final']:.4g} "
                         f"| {_need(need, 'step', '{:,.0f}')} | {_need(need, 'train_seconds', '')} |")
    lines += ["", "![quality against training FLOPs and wall time](study.png)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- study.png


def plot(summary: Mapping[str, Any], path: str) -> str:
    """study.png: quality against training FLOPs and against training wall time, one mean curve per
    variant with a band of ± one standard deviation over seeds, the target as a dashed line."""
    # The object API, not pyplot: no global backend or figure registry (Agg renders the file).
    fig = Figure(figsize=(12, 4.5), dpi=100)
    axes = fig.subplots(1, 2)
    for ax, axis, label in ((axes[0], "train_flops", "training FLOPs"), (axes[1], "train_seconds",
                                                                           "training wall time (s)")):
        for i, v in enumerate(summary["variants"]):
            curve = v["curve"]
            if not curve:
                continue
            x = [p[axis] for p in curve]
            y = [p["quality"] for p in curve]
            # the colour cycle has 10 colours: the next ten variants repeat them dashed, and so on
            style = ("-", "--", ":", "-.")[(i // 10) % 4]
            (line,) = ax.plot(x, y, marker="o", markersize=3, linestyle=style, label=v["name"])
            sd = [p["quality_sd"] or 0.0 for p in curve]
            ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.axhline(summary["target"], color="grey", linestyle="--", linewidth=1, label="target")
        ax.set_xlabel(label)
        ax.set_ylabel(summary["quality"])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{summary['name']}: {summary['quality']} ({summary['direction']} is better)")
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_report(summary: Mapping[str, Any], out_dir: str) -> Dict[str, str]:
    """Write study.json, study.md and study.png into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {kind: os.path.join(out_dir, f"study.{kind}") for kind in ("json", "md", "png")}
    write_json_atomic(paths["json"], summary)
    write_text_atomic(paths["md"], render_markdown(summary))
    plot(summary, paths["png"])
    return paths
