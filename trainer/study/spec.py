"""The study file (`mdt-study STUDY.yaml`): variants of one launch config, trained under one budget
and judged by one headline metric. Parsed into `Study`, with one-line errors naming the key, and
planned into `PlannedRun`s: each run's overrides, its validated launch config and its steps.

    name: mask_ratio                  # default: the file's name
    base: ../digits_demo.yaml         # the launch config, relative to this file
    output_dir: runs/studies/mask_ratio   # default runs/studies/NAME (relative to the working directory)
    ranks: 2                          # ranks per run (deepspeed --num_gpus)
    budget: {images: 192000}          # exactly one of images, flops (training FLOPs), wall_s (training seconds)
    quality: digits_fd                # the headline metric: val_loss, {digits,mnist}_{fd,acc}, fid (optionally @gSCALE)
    baseline: mask50                  # default: the first variant
    seeds: [0, 1]
    guidance: [1, 2, 4]               # post-hoc judgement at these guidance scales
    guidance_kinds: [cfg, path_drop]  # ... with these kinds of guidance (path_drop: SPRINT variants only)
    skip_cache: 2                     # post-hoc Skip-Cache interval (models with skip branches); null: none
    posthoc_images: 200               # images per post-hoc judgement (0: no post-hoc judgement)
    variants:
      - {name: mask50, set: [phases.mask_ratio=0.5]}
      - {name: mask75, set: [phases.mask_ratio=0.75], seeds: [0]}

Run NAME-sSEED of a variant trains in OUTPUT_DIR/NAME-sSEED with the variant's `set` overrides
followed by the study's own: run.output_dir, run.name, run.seed, run.total_steps and, for a
wall-time budget, run.time_limit_s (a variant may not set these).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List

import yaml

from ..config import ConfigError, TrainConfig, TrainingFlops, load_config, validate
from ..diffusion import GUIDANCE_KINDS
from ..evaluation.registry import METRIC_SPECS, direction, metric_stem
from .budget import dataset_manifest, flops_per_image, steps_for_flops, steps_for_images

BUDGETS = ("images", "flops", "wall_s")
STUDY_KEYS = ("run.output_dir", "run.name", "run.seed", "run.total_steps", "run.time_limit_s")
"""Config keys the study sets for every run."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NUMBER = r"\d+(\.\d*)?(e[+-]?\d+)?"
_QUALITY = re.compile(rf"^[a-z_]+(/sigma={_NUMBER})?(@g{_NUMBER})?$")


class StudyError(Exception):
    """A problem with a study (file, variant, run); the message is one line. exit_code: the status
    mdt-study ends with (2 for bad input, a failed run's own status otherwise)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Variant:
    """One arm of the study: overrides of the base launch config."""

    name: str
    overrides: List[str] = field(default_factory=list)
    """KEY=VALUE overrides as `--set` takes them (the YAML key is `set`)."""
    seeds: List[int] | None = None
    """This variant's seeds; None: the study's."""


@dataclass
class Study:
    """A parsed study file; paths are resolved (base against the study file's folder)."""

    path: str
    name: str
    base: str
    output_dir: str
    budget: Dict[str, float]
    """Exactly one of images, flops, wall_s with its value."""
    quality: str
    baseline: str
    variants: List[Variant]
    ranks: int = 2
    seeds: List[int] = field(default_factory=lambda: [0])
    guidance: List[float] = field(default_factory=lambda: [1.0])
    skip_cache: int | None = None
    posthoc_images: int = 200
    guidance_kinds: List[str] = field(default_factory=lambda: ["cfg"])
    """Post-hoc guidance kinds: cfg, and path_drop for the SPRINT variants (path-drop guidance)."""

    def seeds_of(self, variant: Variant) -> List[int]:
        """The seeds a variant runs."""
        return variant.seeds if variant.seeds is not None else self.seeds

    def budget_text(self) -> str:
        """The budget in words, e.g. '192,000 images'."""
        kind, value = next(iter(self.budget.items()))
        return {"images": f"{value:,.0f} images", "flops": f"{value:.3g} training FLOPs",
                "wall_s": f"{value:g} s of training wall time"}[kind]


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise StudyError(message)


def _int_list(value: Any, key: str) -> List[int]:
    _expect(isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and len(set(value)) == len(value), f"{key} must be a non-empty list of distinct integers, got {value!r}")
    return list(value)


def _keys(tree: Dict[str, Any], valid: tuple, where: str) -> None:
    for key in tree:
        _expect(key in valid, f"{where}unknown key {key!r}; valid keys: {', '.join(valid)}")


def _variant(item: Any, index: int) -> Variant:
    where = f"variants[{index}]"
    _expect(isinstance(item, dict), f"{where} must be a mapping with name and set, got {item!r}")
    _keys(item, ("name", "set", "seeds"), f"{where}: ")
    name = item.get("name")
    _expect(isinstance(name, str) and bool(_NAME.match(name)),
            f"{where}.name must be a name of letters, digits, '_', '.', '-', got {name!r}")
    overrides = item.get("set") or []
    _expect(isinstance(overrides, list) and all(isinstance(o, str) and "=" in o for o in overrides),
            f"variants {name}: set must be a list of KEY=VALUE strings, got {overrides!r}")
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        _expect(key not in STUDY_KEYS, f"variants {name}: {key} is set by the study for every run (budget, "
                                       f"seeds, output_dir); remove it from set")
    seeds = _int_list(item["seeds"], f"variants {name}: seeds") if "seeds" in item else None
    return Variant(name, list(overrides), seeds)


def _budget(value: Any) -> Dict[str, float]:
    _expect(isinstance(value, dict) and len(value) == 1 and next(iter(value)) in BUDGETS,
            f"budget must give exactly one of {', '.join(BUDGETS)}, got {value!r}")
    kind, amount = next(iter(value.items()))
    if isinstance(amount, str):  # YAML 1.1 reads 2.0e13 (no exponent sign) as a string
        try:
            amount = float(amount)
        except ValueError:
            pass
    _expect(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0,
            f"budget.{kind} must be a number > 0, got {amount!r}")
    _expect(kind != "images" or float(amount).is_integer(), f"budget.images must be an integer, got {amount!r}")
    return {kind: int(amount) if kind == "images" else float(amount)}


def load_study(path: str) -> Study:
    """Read and check a study file; StudyError (one line, naming the key) on any problem."""
    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except FileNotFoundError:
        raise StudyError(f"study file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise StudyError(f"study file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    _expect(isinstance(tree, dict), f"study file {path} must hold a mapping")
    _keys(tree, ("name", "base", "output_dir", "ranks", "budget", "quality", "baseline", "seeds", "variants",
                 "guidance", "guidance_kinds", "skip_cache", "posthoc_images"), "")
    for key in ("base", "budget", "quality", "variants"):
        _expect(key in tree, f"missing key {key!r} in {path}")
    name = tree.get("name") or os.path.splitext(os.path.basename(path))[0]
    _expect(isinstance(name, str) and bool(_NAME.match(name)), f"name must be letters, digits, '_', '.', '-', "
                                                                f"got {name!r}")
    _expect(isinstance(tree["base"], str), f"base must be a launch config path, got {tree['base']!r}")
    base = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), tree["base"]))
    _expect(os.path.isfile(base), f"base: launch config {base} does not exist")
    quality = tree["quality"]
    try:
        direction(str(quality))
    except ValueError as err:
        raise StudyError(f"quality: {err}") from None
    _expect(bool(_QUALITY.match(str(quality))), f"quality: {quality!r} is not NAME or NAME@gSCALE")
    items = tree["variants"]
    _expect(isinstance(items, list) and items, "variants must be a non-empty list")
    variants = [_variant(item, i) for i, item in enumerate(items)]
    names = [v.name for v in variants]
    twice = [n for n in names if names.count(n) > 1]
    _expect(not twice, f"variants: the name {twice[0]!r} is used twice" if twice else "")
    baseline = tree.get("baseline", names[0])
    _expect(baseline in names, f"baseline: {baseline!r} is not a variant; variants: {', '.join(names)}")
    ranks = tree.get("ranks", 2)
    _expect(isinstance(ranks, int) and not isinstance(ranks, bool) and ranks >= 1, f"ranks must be >= 1, got {ranks!r}")
    guidance = tree.get("guidance", [1.0])
    _expect(isinstance(guidance, list) and guidance and all(
        isinstance(g, (int, float)) and not isinstance(g, bool) and g >= 0 for g in guidance),
        f"guidance must be a non-empty list of scales >= 0, got {guidance!r}")
    kinds = tree.get("guidance_kinds", ["cfg"])
    _expect(isinstance(kinds, list) and kinds and all(k in GUIDANCE_KINDS for k in kinds),
            f"guidance_kinds must be a non-empty list of {', '.join(GUIDANCE_KINDS)}, got {kinds!r}")
    skip = tree.get("skip_cache")
    _expect(skip is None or (isinstance(skip, int) and not isinstance(skip, bool) and skip >= 1),
            f"skip_cache must be an interval >= 1 or null, got {skip!r}")
    images = tree.get("posthoc_images", 200)
    _expect(isinstance(images, int) and not isinstance(images, bool) and images >= 0,
            f"posthoc_images must be an integer >= 0, got {images!r}")
    output_dir = tree.get("output_dir") or os.path.join("runs", "studies", name)
    _expect(isinstance(output_dir, str), f"output_dir must be a path, got {output_dir!r}")
    return Study(path=path, name=name, base=base, output_dir=output_dir, budget=_budget(tree["budget"]),
                 quality=quality, baseline=baseline, variants=variants, ranks=ranks,
                 seeds=_int_list(tree.get("seeds", [0]), "seeds"), guidance=[float(g) for g in guidance],
                 skip_cache=skip, posthoc_images=images, guidance_kinds=list(kinds))


# ----------------------------------------------------------------------------- the plan


@dataclass
class PlannedRun:
    """One training run of the study, resolved and validated."""

    variant: str
    seed: int
    name: str
    overrides: List[str]
    """Every --set of its command: the variant's, then the study's."""
    config: TrainConfig
    steps: int

    @property
    def run_dir(self) -> str:
        """Where the run writes (run.output_dir/run.name)."""
        return self.config.run.run_dir()

    def command(self, base: str, ranks: int, port: int | str, python: str) -> List[str]:
        """The launch a user would type: the deepspeed launcher on trainer.cli with the overrides."""
        cmd = [python, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(port),
               "--module", "trainer.cli", "--config", base]
        for item in self.overrides:
            cmd += ["--set", item]
        return cmd


def _yaml_value(value: Any) -> str:
    """A value as --set reads it back (YAML): plain where that round-trips, JSON-quoted otherwise."""
    text = str(value)
    return text if yaml.safe_load(text) == value else json.dumps(value)  # a JSON string is YAML too


def _check_eval(cfg: TrainConfig, quality: str) -> None:
    e, group = cfg.eval, METRIC_SPECS[metric_stem(quality)].group
    if e.every <= 0:
        raise ConfigError("eval.every is 0: a study needs the run's evaluation (set eval.every)")
    if group not in e.metrics:
        raise ConfigError(f"eval.metrics {e.metrics} lacks {group}, which gives the study's {quality}")
    if "@g" in quality and float(quality.split("@g", 1)[1]) not in e.guidance_scales:
        raise ConfigError(f"eval.guidance_scales {e.guidance_scales} lacks the scale of the study's {quality}")


def plan_runs(study: Study) -> List[PlannedRun]:
    """Every run of the study, in order (variant by variant, seed by seed), its config loaded with its
    overrides and validated for study.ranks ranks; StudyError naming the variant and key otherwise."""
    runs: List[PlannedRun] = []
    manifests: Dict[Any, Any] = {}
    counters: Dict[Any, TrainingFlops] = {}
    for v in study.variants:
        try:
            cfg = load_config(study.base, v.overrides)
            kind, amount = next(iter(study.budget.items()))
            extra = []
            if kind == "images":
                steps = steps_for_images(cfg, int(amount))
            elif kind == "flops":
                validate(cfg, study.ranks)  # model.name and friends, before the network is built to count
                key = (cfg.data.shards, cfg.data.manifest)
                manifests[key] = manifests.get(key) or dataset_manifest(cfg)
                count = flops_per_image(cfg, manifests[key])
                # one network (and alignment head), one count: counting a mask ratio builds the network
                counter = json.dumps([cfg.model.name, count.kwargs, count.align_block, count.head_per_token],
                                     sort_keys=True)
                counters[counter] = counters.get(counter) or count
                steps = steps_for_flops(cfg, float(amount), counters[counter])
            else:
                steps, extra = cfg.run.total_steps, [f"run.time_limit_s={amount!r}"]
            for seed in study.seeds_of(v):
                name = f"{v.name}-s{seed}"
                overrides = [*v.overrides, f"run.output_dir={_yaml_value(study.output_dir)}",
                             f"run.name={_yaml_value(name)}", f"run.seed={seed}", f"run.total_steps={steps}", *extra]
                run_cfg = load_config(study.base, overrides)
                validate(run_cfg, study.ranks)
                _check_eval(run_cfg, study.quality)
                runs.append(PlannedRun(variant=v.name, seed=seed, name=name, overrides=overrides, config=run_cfg,
                                       steps=steps))
        except ConfigError as err:
            raise StudyError(f"variants {v.name}: {err}") from None
    return runs
