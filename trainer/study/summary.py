"""A study's numbers as pure functions: the runs' in-loop evaluation records (RUN_DIR/metrics.jsonl)
and post-hoc judgements (RUN_DIR/posthoc.json) in, the content of `study.json` out (report.py
renders it as study.md and study.png).

The target quality is the baseline's final quality, averaged over its seeds. What a variant needed
to reach it is read off the variant's mean curve (quality averaged over seeds at each evaluation
step, the final evaluations averaged with each other), interpolated linearly between evaluations:
the baseline's own mean curve reaches the target by its final evaluation, where a single seed of
it (the worse one) would never reach its own mean. Per-seed values are in study.json as well.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from ..evaluation.registry import LOWER, METRIC_SPECS, direction, metric_stem

AXES = ("step", "images_seen", "train_flops", "train_seconds", "accelerator_hours")
"""What an evaluation record says about the training spent so far (all ranks)."""


def reaches(value: float, target: float, way: str) -> bool:
    """Whether `value` is at least as good as `target`."""
    return value <= target if way == LOWER else value >= target


# ----------------------------------------------------------------------------- records


def split_final(records: Sequence[Mapping[str, Any]]) -> Tuple[List[Mapping[str, Any]], Mapping[str, Any] | None]:
    """(records before the final evaluation, the final record or None). Without a record marked
    final (an unfinished run) the last one stands in."""
    finals = [r for r in records if r.get("final")]
    last = finals[-1] if finals else (records[-1] if records else None)
    if last is None:
        return [], None
    return [r for r in records if r["step"] < last["step"]], last


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _sd(values: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1); None for one value."""
    if len(values) < 2:
        return None
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _point(records: Sequence[Mapping[str, Any]], quality: str, final: bool) -> Dict[str, Any]:
    values = [float(r["metrics"][quality]) for r in records]
    point = {axis: _mean([float(r[axis]) for r in records]) for axis in AXES}
    point.update(quality=_mean(values), quality_sd=_sd(values), final=final)
    return point


def mean_curve(runs: Sequence[Sequence[Mapping[str, Any]]], quality: str) -> List[Dict[str, Any]]:
    """The quality over training of several seeds: at each step every seed evaluated (the final
    evaluations, which may fall on different steps under a wall-time budget, form the last point),
    the mean of each axis and of the quality, and the quality's standard deviation."""
    parts = [split_final([r for r in recs if quality in r.get("metrics", {})]) for recs in runs]
    if not parts or any(final is None for _, final in parts):
        return []
    by_step = [{r["step"]: r for r in before} for before, _ in parts]
    common = sorted(set.intersection(*(set(s) for s in by_step)))
    curve = [_point([steps[s] for steps in by_step], quality, False) for s in common]
    return curve + [_point([final for _, final in parts], quality, True)]


def first_reach(curve: Sequence[Mapping[str, Any]], target: float, way: str) -> Dict[str, float] | None:
    """Where a curve first reaches the target, each axis interpolated linearly between the
    evaluation before and the one that reaches it (the first evaluation's own values if it already
    does); None when it never does."""
    before = None
    for point in curve:
        if reaches(point["quality"], target, way):
            if before is None:
                return {axis: float(point[axis]) for axis in AXES}
            frac = (target - before["quality"]) / (point["quality"] - before["quality"])
            return {axis: before[axis] + frac * (point[axis] - before[axis]) for axis in AXES}
        before = point
    return None


# ----------------------------------------------------------------------------- summary (study.json)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _guided_values(final: Mapping[str, Any], posthoc: Mapping[str, Any] | None, stem: str,
                   table: str = "guidance") -> Dict[float, float]:
    """Quality by guidance scale for one run: the final in-loop evaluation's NAME / NAME@gG, then
    the post-hoc judgement's values of the same metric in posthoc.json's `table` (which win where
    both exist). For another guidance kind than CFG ('path_drop') only scale 1 (no guidance, the same
    for every kind) comes from the CFG values."""
    if table != "guidance":
        unguided = {s: v for s, v in _guided_values(final, posthoc, stem).items() if s == 1.0}
        measured = ((posthoc or {}).get(table) or {}).items()
        return {**unguided, **{float(s): float(r[stem]) for s, r in measured if stem in r}}
    values: Dict[float, float] = {}
    for name, value in final.get("metrics", {}).items():
        if name == stem:
            values[1.0] = float(value)
        elif name.startswith(stem + "@g"):
            values[float(name[len(stem) + 2:])] = float(value)
    for scale, result in ((posthoc or {}).get("guidance") or {}).items():
        if stem in result:
            values[float(scale)] = float(result[stem])
    return values


def _guided(finals: Sequence[Mapping[str, Any]], posthoc: Sequence[Mapping[str, Any] | None], stem: str,
            way: str, table: str = "guidance") -> Dict[str, Any] | None:
    per_run = [_guided_values(f, p, stem, table) for f, p in zip(finals, posthoc)]
    scales = sorted(set.intersection(*(set(v) for v in per_run))) if per_run else []
    if not scales:
        return None
    means = {s: _mean([v[s] for v in per_run]) for s in scales}
    best = min(scales, key=means.get) if way == LOWER else max(scales, key=means.get)
    costs = [((p or {}).get(table) or {}).get(f"{best:g}", {}).get("gflops_per_image") for p in posthoc]
    cost = _mean(costs) if costs and all(c is not None for c in costs) else None
    return {"metric": stem, "scales": {f"{s:g}": means[s] for s in scales}, "best_scale": best,
            "best": means[best], "gflops_per_image": cost}


def _skip_cache(posthoc: Sequence[Mapping[str, Any] | None], scale: float | None) -> Dict[str, Any] | None:
    """Skip-Cache's sampling speed-up and change in digits FD / accuracy, mean over seeds, at `scale`
    (the best guidance scale) where it was measured, else at the first scale measured."""
    pairs = []
    for p in posthoc:
        cached = ((p or {}).get("skip_cache") or {}).get("guidance") or {}
        full = (p or {}).get("guidance") or {}
        shared = [s for s in cached if s in full]
        if not shared:
            return None
        key = f"{scale:g}" if scale is not None and f"{scale:g}" in shared else shared[0]
        pairs.append((float(key), full[key], cached[key]))
    if not pairs:
        return None
    out = {"scale": pairs[0][0], "interval": (posthoc[0] or {})["skip_cache"].get("interval"),
           "speedup": _mean([f["seconds"] / c["seconds"] for _, f, c in pairs])}
    for metric in METRIC_SPECS:  # what the post-hoc judge measured: digits_fd and digits_acc
        if all(metric in f and metric in c for _, f, c in pairs):
            out[f"{metric}_change"] = _mean([c[metric] - f[metric] for _, f, c in pairs])
    return out


def _posthoc_table(posthoc: Sequence[Mapping[str, Any] | None]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Every post-hoc metric by guidance scale, mean over the seeds that judged it:
    {"full" | "skip_cache": {metric: {scale: mean}}}; a scale some seed lacks is left out."""
    tables: Dict[str, Dict[str, Dict[str, float]]] = {}
    judged = [p for p in posthoc if p]
    if not judged or len(judged) != len(posthoc):
        return tables
    for kind, pick in (("full", lambda p: p.get("guidance") or {}),
                       ("skip_cache", lambda p: (p.get("skip_cache") or {}).get("guidance") or {}),
                       ("path_drop", lambda p: p.get("path_drop") or {})):
        per_seed = [pick(p) for p in judged]
        scales = sorted(set.intersection(*(set(t) for t in per_seed)), key=float)
        metrics = sorted({m for t in per_seed for s in scales for m in t[s] if m != "seconds"})
        table = {m: {s: _mean([t[s][m] for t in per_seed]) for s in scales if all(m in t[s] for t in per_seed)}
                 for m in metrics}
        if any(table.values()):
            tables[kind] = table
    return tables


def summarize(study: Mapping[str, Any], runs: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]],
              posthoc: Mapping[str, Mapping[int, Mapping[str, Any] | None]]) -> Dict[str, Any]:
    """The study's numbers (study.json). study: name, quality, baseline, budget (a mapping) and
    anything else to carry; runs: variant -> seed -> evaluation records; posthoc: variant -> seed
    -> the run's posthoc.json (or None). Variants keep the order of `runs`."""
    quality, baseline = study["quality"], study["baseline"]
    way = direction(quality)
    curves = {v: mean_curve(list(seeds.values()), quality) for v, seeds in runs.items()}
    if not curves.get(baseline):
        raise ValueError(f"baseline {baseline!r} has no evaluation with {quality}")
    target = curves[baseline][-1]["quality"]
    base_need = first_reach(curves[baseline], target, way)
    variants = []
    for name, seeds in runs.items():
        curve = curves[name]
        finals = [split_final([r for r in recs if quality in r.get("metrics", {})])[1] for recs in seeds.values()]
        if not curve:
            variants.append({"name": name, "seeds": list(seeds), "final": None, "curve": [], "runs": [],
                             "posthoc": {}})
            continue
        need = first_reach(curve, target, way)
        per_seed = []
        for seed, recs, final in zip(seeds, seeds.values(), finals):
            one = mean_curve([recs], quality)
            per_seed.append({"seed": seed, "final": float(final["metrics"][quality]),
                             "final_step": int(final["step"]), "to_target": first_reach(one, target, way)})
        values = [p["final"] for p in per_seed]
        judged = [posthoc.get(name, {}).get(s) for s in seeds]
        guided = _guided(finals, judged, metric_stem(quality), way)
        path_drop = _guided(finals, judged, metric_stem(quality), way, "path_drop") \
            if any((p or {}).get("path_drop") for p in judged) else None
        variants.append({
            "name": name, "baseline": name == baseline, "seeds": list(seeds),
            "final": {"mean": _mean(values), "sd": _sd(values), "values": values},
            "at_budget": {axis: curve[-1][axis] for axis in AXES},
            "to_target": need,
            "speedup": {"wall": _ratio(base_need and base_need["train_seconds"], need and need["train_seconds"]),
                        "images": _ratio(base_need and base_need["images_seen"], need and need["images_seen"])},
            "guided": guided,
            "guided_path_drop": path_drop,
            "skip_cache": _skip_cache([posthoc.get(name, {}).get(s) for s in seeds],
                                      guided["best_scale"] if guided else None),
            "posthoc": _posthoc_table([posthoc.get(name, {}).get(s) for s in seeds]),
            "curve": curve, "runs": per_seed,
        })
    return {**study, "direction": way, "target": target, "variants": variants}
