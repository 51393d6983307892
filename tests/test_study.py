"""mdt-study without training launches: the study file and its one-line errors, budgets in steps
(FLOPs against a direct sum over the phase plan), skipping and resuming runs, the launch of a run
(a stand-in command), post-hoc judgement of a tiny checkpoint, and the report from synthetic
metrics.jsonl files checked against numbers worked out by hand."""

from __future__ import annotations

import io
import json
import math
import os
import struct
import sys
from pathlib import Path

import pytest
import yaml

from model_zoo.flops import model_flops
from trainer.checkpoints import COMPLETE, LATEST, CheckpointRecord, RunState, make_tag, write_record
from trainer.cli import study_main
from trainer.config import PhasePlan, load_config
from trainer.evaluation.history import parse_metrics
from trainer.study import runner as study_mod
from trainer.study.budget import dataset_manifest, flops_per_image, training_flops
from trainer.study.runner import FINISHED, NEW, RESUME, launch, run_status, run_study, train_all
from trainer.study.spec import StudyError, load_study, plan_runs
from trainer.study.summary import first_reach, mean_curve
from trainer.training.trainer import TrainingFlops as TrainerFlopsPerImage

from launcher import tiny_config

BATCH = 16


def fake_manifest(root: Path, spec: str = "digits:train") -> Path:
    """A manifest of 3x8x8 pixel latents, 10 classes and no shards: what the study reads of a dataset."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "mdt-latents", "version": 1, "latent": {"shape": [3, 8, 8], "moments": ["mean"],
                                                                 "dtype": "float16"},
                "scaling_factor": 1.0, "encoder": {"kind": "pixels", "id": "pixels"},
                "source": {"spec": spec, "num_images": 0, "class_names": None}, "resolution": 8,
                "has_flip": False, "num_classes": 10, "num_samples": 0, "shards": []}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def write_study(tmp_path: Path, study: dict | None = None, spec: str = "digits:train", **sections) -> Path:
    """A base launch config (tiny MaskDiT, evaluation of the digits every 10 steps) in tmp/configs and a
    study file beside it; `study` updates the study's keys."""
    data = fake_manifest(tmp_path / "data", spec)
    cfg = tiny_config(str(data), str(tmp_path / "unused"),
                      **{"eval": {"every": 10, "metrics": ["digits"], "guidance_scales": [1.0, 2.0]}, **sections})
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "base.yaml").write_text(yaml.safe_dump(cfg))
    tree = {"name": "demo", "base": "base.yaml", "output_dir": str(tmp_path / "out"), "budget": {"images": 480},
            "quality": "digits_fd", "baseline": "ref", "seeds": [0, 1],
            "variants": [{"name": "ref", "set": ["phases.mask_ratio=0.5"]},
                         {"name": "fast", "set": ["optim.lr=0.004"]}]}
    tree.update(study or {})
    path = tmp_path / "configs" / "study.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- the study file


def test_study_file_parses_with_defaults(tmp_path):
    study = load_study(str(write_study(tmp_path, {"seeds": [3], "guidance": [1, 2.5], "skip_cache": 2})))
    assert study.base == str(tmp_path / "configs" / "base.yaml")  # relative to the study file
    assert (study.name, study.ranks, study.quality, study.baseline) == ("demo", 2, "digits_fd", "ref")
    assert study.budget == {"images": 480} and study.seeds == [3] and study.guidance == [1.0, 2.5]
    assert [v.name for v in study.variants] == ["ref", "fast"] and study.variants[1].overrides == ["optim.lr=0.004"]
    assert study.skip_cache == 2 and study.posthoc_images == 200


@pytest.mark.parametrize("change, message", [
    ({"budgte": {"images": 1}}, r"^unknown key 'budgte'; valid keys: name, base, "),
    ({"base": "nowhere.yaml"}, r"^base: launch config .*nowhere.yaml does not exist$"),
    ({"baseline": "refx"}, r"^baseline: 'refx' is not a variant; variants: ref, fast$"),
    ({"budget": {"images": 10, "flops": 1e9}}, r"^budget must give exactly one of images, flops, wall_s"),
    ({"budget": {"steps": 10}}, r"^budget must give exactly one of images, flops, wall_s"),
    ({"budget": {"wall_s": 0}}, r"^budget.wall_s must be a number > 0, got 0$"),
    ({"budget": {"images": 10.5}}, r"^budget.images must be an integer"),
    ({"quality": "psnr"}, r"^quality: unknown metric 'psnr': choose from val_loss, digits_fd, fid, digits_acc"),
    ({"quality": "digits_fd@gx"}, r"^quality: 'digits_fd@gx' is not NAME or NAME@gSCALE$"),
    ({"variants": [{"name": "ref", "sett": []}]}, r"^variants\[0\]: unknown key 'sett'; valid keys: name, set, seeds$"),
    ({"variants": [{"name": "ref", "set": ["run.total_steps=5"]}]}, r"^variants ref: run.total_steps is set by the "
                                                                     r"study for every run"),
    ({"variants": [{"name": "ref"}, {"name": "ref"}]}, r"^variants: the name 'ref' is used twice$"),
    ({"seeds": [0, 0]}, r"^seeds must be a non-empty list of distinct integers"),
    ({"ranks": 0}, r"^ranks must be >= 1"),
])
def test_study_file_errors_are_one_line_naming_the_key(tmp_path, change, message):
    with pytest.raises(StudyError, match=message) as err:
        load_study(str(write_study(tmp_path, change)))
    assert "\n" not in str(err.value) and err.value.exit_code == 2


def test_a_bad_variant_fails_the_plan_naming_variant_and_key(tmp_path, capsys):
    path = write_study(tmp_path, {"variants": [{"name": "ref"}, {"name": "typo", "set": ["optim.lrr=1"]}]})
    with pytest.raises(StudyError, match=r"^variants typo: unknown key 'optim.lrr'; valid keys in optim: lr, "):
        plan_runs(load_study(str(path)))
    path = write_study(tmp_path, {"variants": [{"name": "ref"}, {"name": "noeval", "set": ["eval.every=0"]}]})
    with pytest.raises(StudyError, match=r"^variants noeval: eval.every is 0: a study needs the run's evaluation"):
        plan_runs(load_study(str(path)))
    path = write_study(tmp_path, {"quality": "fid"})
    with pytest.raises(StudyError, match=r"^variants ref: eval.metrics \['digits'\] lacks fid, which gives the "):
        plan_runs(load_study(str(path)))
    path = write_study(tmp_path, {"budget": {"images": 8}})
    with pytest.raises(StudyError, match=r"^variants ref: budget.images 8 is less than one batch \(data.batch_size 16"):
        plan_runs(load_study(str(path)))
    # the command line: one line on stderr, exit 2, nothing launched
    assert study_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mdt-study: error: variants ref: budget.images 8") and err.count("\n") == 1


# ----------------------------------------------------------------------------- budgets


def test_images_budget_sets_steps_name_seed_and_output_dir(tmp_path):
    runs = plan_runs(load_study(str(write_study(tmp_path, {"budget": {"images": 500},
                                                           "output_dir": str(tmp_path / "out: odd")}))))
    assert [r.name for r in runs] == ["ref-s0", "ref-s1", "fast-s0", "fast-s1"]
    for r in runs:
        assert r.steps == 500 // BATCH == 31 and r.config.run.total_steps == 31
        assert r.config.run.output_dir == str(tmp_path / "out: odd")  # quoted for --set, read back as given
        assert r.run_dir == str(tmp_path / "out: odd" / r.name) and r.config.run.time_limit_s is None
    assert runs[1].config.run.seed == 1 and runs[2].config.optim.lr == 0.004 and runs[0].config.optim.lr == 2e-3
    assert runs[2].overrides[0] == "optim.lr=0.004"  # the variant's own first, then the study's
    # what is launched resolves to the same config
    again = load_config(load_study(str(tmp_path / "configs" / "study.yaml")).base, runs[2].overrides)
    assert again.to_dict() == runs[2].config.to_dict()


def test_wall_time_budget_sets_the_time_limit_and_keeps_the_steps(tmp_path):
    runs = plan_runs(load_study(str(write_study(tmp_path, {"budget": {"wall_s": 90}}))))
    assert all(r.config.run.time_limit_s == 90.0 and r.steps == 20 for r in runs)  # tiny_config's total_steps


COUNTED: dict = {}


def direct_flops(cfg, steps: int) -> float:
    """Training FLOPs summed step by step over the phase plan, each step's ratio counted as the
    trainer counts it (rounded to 2 decimals)."""
    kwargs = {k: v for k, v in cfg.model_kwargs((3, 8, 8), 10).items() if k != "class_dropout_prob"}
    plan, total = PhasePlan(cfg.phases, steps, cfg.optim.warmup_steps), 0.0
    for s in range(steps):
        ratio = round(plan.at(s).mask_ratio, 2)
        if (cfg.model.name, ratio) not in COUNTED:  # the same network in every test here
            COUNTED[cfg.model.name, ratio] = model_flops(cfg.model.name, 1, ratio, backward=True, **kwargs)
        total += COUNTED[cfg.model.name, ratio]
    return total * cfg.data.batch_size


@pytest.mark.parametrize("phases", [
    {"mask_ratio": 0.5, "unmask_every": 10, "unmask_steps": 3, "final_unmask_steps": 4},
    {"mask_ratio": 0.5, "schedule": "linear", "end_mask_ratio": 0.4, "final_unmask_steps": 5},
])
def test_flops_budget_is_the_fewest_steps_that_reach_it(tmp_path, phases):
    path = write_study(tmp_path, phases=phases)
    cfg = load_config(load_study(str(path)).base)
    budget = direct_flops(cfg, 40) - 1.0
    runs = plan_runs(load_study(str(write_study(tmp_path, {"budget": {"flops": budget}}, phases=phases))))
    steps = runs[0].steps
    assert direct_flops(cfg, steps) >= budget > direct_flops(cfg, steps - 1)
    if "schedule" not in phases:
        assert steps == 40
    # the network counted is the trainer's, FLOPs per image as the trainer counts them
    count = flops_per_image(cfg, dataset_manifest(cfg))
    assert isinstance(count, TrainerFlopsPerImage)  # the very counter the trainer's train_flops come from
    assert count.network.kwargs == {k: v for k, v in cfg.model_kwargs((3, 8, 8), 10).items()
                                    if k != "class_dropout_prob"}
    assert training_flops(cfg, steps, count) == pytest.approx(direct_flops(cfg, steps))


# ----------------------------------------------------------------------------- skipping, resuming, launching


def fake_run(run, step: int, final: bool = True, **config) -> None:
    """A complete checkpoint of `run` at `step` (with its config, `config` sections updated) and
    metrics.jsonl ending with an evaluation there."""
    ckpt = Path(run.run_dir) / "checkpoints" / make_tag(step)
    ckpt.mkdir(parents=True)
    tree = run.config.to_dict()
    for section, values in config.items():
        tree[section].update(values)
    write_record(str(ckpt), CheckpointRecord(state=RunState(step=step, images_seen=step * BATCH), world_size=2,
                                             model_name="MaskDiT-S/2", model_kwargs={"skip": True}, config=tree))
    (ckpt / COMPLETE).write_text("")
    (ckpt.parent / LATEST).write_text(ckpt.name)
    record = {"step": step, "images_seen": step * BATCH, "train_flops": 1e9 * step, "train_seconds": float(step),
              "accelerator_hours": step * 2 / 3600, "eval_seconds": 0.5, "phase": "masked", "final": final,
              "metrics": {"digits_fd": 10.0}}
    with open(Path(run.run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def test_finished_runs_are_skipped_and_unfinished_ones_resume(tmp_path, capsys):
    path = write_study(tmp_path)
    runs = plan_runs(load_study(str(path)))
    fake_run(runs[0], 30)                 # finished: checkpoint at total_steps and its final evaluation
    fake_run(runs[1], 10, final=False)    # stopped at step 10
    fake_run(runs[3], 30, final=False)    # last checkpoint saved, final evaluation missing
    assert [(s.state, s.step) for s in map(run_status, runs)] == [(FINISHED, 30), (RESUME, 10), (NEW, 0), (RESUME, 30)]
    plan = run_study(str(path), dry_run=True, out=io.StringIO())
    assert [r["state"] for r in plan["runs"]] == [FINISHED, RESUME, NEW, RESUME]
    assert study_main(["--dry-run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "run 2/4 ref-s1: 30 steps (480 images), resumes from step 10" in out
    assert "-m deepspeed.launcher.runner --num_gpus 2 --master_port PORT --module trainer.cli --config " in out
    assert f"--set phases.mask_ratio=0.5 --set run.output_dir={tmp_path / 'out'} --set run.name=ref-s1 --set " \
           "run.seed=1 --set run.total_steps=30\n" in out
    # launch the unfinished ones in order with a stand-in launcher that finishes them
    launched = []

    def fake_launch(run, command, on_step, grace_s=120.0):
        launched.append((run.name, command[command.index("--num_gpus") + 1]))
        on_step(run.steps)
        fake_run(run, run.steps) if run.name == "fast-s0" else _finish(run)
        return "log"

    def _finish(run):
        with open(Path(run.run_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": run.steps, "images_seen": 480, "train_flops": 3e10, "train_seconds": 30.0,
                                "accelerator_hours": 0.1, "eval_seconds": 0.1, "phase": "final_unmask",
                                "final": True, "metrics": {"digits_fd": 9.0}}) + "\n")
        ckpt = Path(run.run_dir) / "checkpoints" / make_tag(run.steps)
        if not ckpt.exists():
            ckpt.mkdir()
            write_record(str(ckpt), CheckpointRecord(state=RunState(step=run.steps, images_seen=480), world_size=2,
                                                     model_name="MaskDiT-S/2", model_kwargs={},
                                                     config=run.config.to_dict()))
            (ckpt / COMPLETE).write_text("")
            (ckpt.parent / LATEST).write_text(ckpt.name)

    mp = pytest.MonkeyPatch()
    mp.setattr(study_mod, "launch", fake_launch)
    try:
        err = io.StringIO()
        train_all(load_study(str(path)), runs, io.StringIO(), err)
    finally:
        mp.undo()
    assert launched == [("ref-s1", "2"), ("fast-s0", "2"), ("fast-s1", "2")]
    assert "run 4/4 fast-s1: step 30/30" in err.getvalue()
    assert all(run_status(r).state == FINISHED for r in runs)


def test_a_run_dir_from_another_config_is_refused(tmp_path):
    runs = plan_runs(load_study(str(write_study(tmp_path))))
    fake_run(runs[0], 30, optim={"lr": 0.5})
    with pytest.raises(StudyError, match=r"^run ref-s0: .*step00000030 was trained with optim.lr=0.5, the study "
                                         r"now asks for 0.002: restore the study file or remove "):
        run_status(runs[0])


def test_a_run_that_ends_unfinished_or_fails_stops_the_study(tmp_path):
    path = write_study(tmp_path)
    study, runs = load_study(str(path)), plan_runs(load_study(str(path)))
    mp = pytest.MonkeyPatch()
    mp.setattr(study_mod, "launch", lambda run, command, on_step: "the log")
    try:
        with pytest.raises(StudyError, match=r"^run ref-s0 ended without its final checkpoint and evaluation "
                                             r"\(metrics.jsonl\); its log: the log$"):
            train_all(study, runs, io.StringIO(), io.StringIO())
    finally:
        mp.undo()
    # the real launch with a stand-in command: output streamed to the log, steps seen, the status kept
    steps = []
    script = "print('[rank0]: step 5/30 | masked r=0.50 | loss 1.0'); print('step 7/30 | x'); raise SystemExit(3)"
    with pytest.raises(StudyError, match=r"^run ref-s0 failed with exit status 3; its log: .*ref-s0/study.log$") as err:
        launch(runs[0], [sys.executable, "-c", script], steps.append)
    assert err.value.exit_code == 3 and steps == [5, 7]
    log = (Path(runs[0].run_dir) / "study.log").read_text()
    assert "mdt-study launches: " in log and "step 7/30 | x" in log
    log = launch(runs[1], [sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"], steps.append)
    assert Path(log).read_text().splitlines()[-1] == os.environ.get("OMP_NUM_THREADS", "1")  # one thread a rank


# ----------------------------------------------------------------------------- post-hoc judgement


def test_posthoc_judges_a_tiny_checkpoint_and_caches_it(tmp_path):
    import trainer.study.posthoc as posthoc_mod
    from trainer.study.posthoc import posthoc

    from test_sample_cli import make_checkpoint

    study = load_study(str(write_study(tmp_path, {"guidance": [1, 2], "skip_cache": 2, "posthoc_images": 20})))
    run = plan_runs(study)[0]
    make_checkpoint(Path(run.run_dir), steps=10)
    lines = []
    result = posthoc(run, study, "cpu", lines.append)
    assert set(result["guidance"]) == {"1", "2"} and set(result["skip_cache"]["guidance"]) == {"1", "2"}
    for judged in (*result["guidance"].values(), *result["skip_cache"]["guidance"].values()):
        assert judged["digits_fd"] > 0 and 0 <= judged["digits_acc"] <= 1 and judged["seconds"] > 0
    assert result["guidance"]["2"] != result["skip_cache"]["guidance"]["2"]  # Skip-Cache changes the images
    assert len(lines) == 4 and json.loads((Path(run.run_dir) / "posthoc.json").read_text()) == result
    # a rerun samples nothing (no model is even loaded)
    mp = pytest.MonkeyPatch()
    mp.setattr(posthoc_mod, "load_model", lambda *a, **k: pytest.fail("sampled again"))
    try:
        assert posthoc(run, study, "cpu", lines.append) == result
    finally:
        mp.undo()
    # other data than the digits: a note, no judgement
    other = load_study(str(write_study(tmp_path / "o", {"posthoc_images": 20}, spec="imagefolder:/x")))
    run = plan_runs(other)[0]
    make_checkpoint(Path(run.run_dir), steps=2)
    assert posthoc(run, other, "cpu")["note"].startswith("no post-hoc judgement: the data are 'imagefolder:/x'")


# ----------------------------------------------------------------------------- the report


def test_metrics_records_resumed_steps_and_a_cut_last_line():
    text = "\n".join([json.dumps({"step": 10, "metrics": {"a": 1}}), json.dumps({"step": 20, "metrics": {"a": 2}}),
                      json.dumps({"step": 20, "metrics": {"a": 3}}), '{"step": 3'])
    assert [(r["step"], r["metrics"]["a"]) for r in parse_metrics(text)] == [(10, 1), (20, 3)]
    with pytest.raises(ValueError, match=r"^m.jsonl:1: not an evaluation record"):
        parse_metrics('{"step": 3\n' + json.dumps({"step": 4}), "m.jsonl")


def test_a_runs_records_before_its_first_evaluation_and_a_bad_line(tmp_path):
    from trainer.study.runner import run_records

    assert run_records(str(tmp_path)) == []  # no metrics.jsonl yet: no records, not an error
    (tmp_path / "metrics.jsonl").write_text("nonsense\n" + json.dumps({"step": 4, "metrics": {}}) + "\n")
    with pytest.raises(StudyError, match=r"metrics.jsonl:1: not an evaluation record"):
        run_records(str(tmp_path))


def test_mean_curve_aligns_steps_and_final_evaluations():
    def rec(step, q, final=False):
        return {"step": step, "images_seen": step, "train_flops": step, "train_seconds": step,
                "accelerator_hours": step, "final": final, "metrics": {"q": q}}

    a = [rec(10, 5.0), rec(20, 4.0), rec(25, 3.0, True)]              # a wall-time budget ends runs at other steps
    b = [rec(10, 7.0), rec(20, 6.0), rec(30, 5.0), rec(32, 2.0, True)]
    curve = mean_curve([a, b], "q")
    assert [(p["step"], p["quality"], p["final"]) for p in curve] == [(10, 6.0, False), (20, 5.0, False),
                                                                      (28.5, 2.5, True)]
    assert curve[0]["quality_sd"] == pytest.approx(math.sqrt(2))
    assert first_reach(curve, 6.0, "lower")["step"] == 10          # the first evaluation already reaches it
    assert first_reach(curve, 4.0, "lower")["step"] == pytest.approx(20 + 8.5 * 1 / 2.5)
    assert first_reach(curve, 1.0, "lower") is None


def synthetic_runs(tmp_path: Path):
    """2 variants x 2 seeds of evaluation records at steps 10, 20, 30 (final), batch 16, 1e9 FLOPs a
    step, and post-hoc results at guidance 1 and 2 with Skip-Cache at 2 (and, for `fast`, path-drop
    guidance at 2 with its counted cost)."""
    path = write_study(tmp_path, {"guidance": [1, 2], "skip_cache": 2, "posthoc_images": 20})
    runs = plan_runs(load_study(str(path)))
    fd = {"ref-s0": [30, 20, 10], "ref-s1": [34, 22, 14], "fast-s0": [20, 10, 6], "fast-s1": [24, 12, 8]}
    seconds = {"ref-s0": 1.0, "ref-s1": 1.2, "fast-s0": 0.5, "fast-s1": 0.7}  # per step
    posthoc_fd = {"ref": {"1": 15.0, "2": 9.0}, "fast": {"1": 8.0, "2": 5.0}}
    for run in runs:
        fake_run(run, 30)
        lines = [{"step": s, "images_seen": s * BATCH, "train_flops": 1e9 * s, "train_seconds": seconds[run.name] * s,
                  "accelerator_hours": seconds[run.name] * s * 2 / 3600, "eval_seconds": 1.0, "phase": "masked",
                  "final": s == 30, "metrics": {"digits_fd": float(q), "digits_acc": 0.5}}
                 for s, q in zip((10, 20, 30), fd[run.name])]
        (Path(run.run_dir) / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        settings = {"checkpoint": make_tag(30), "step": 30, "images": 20, "sampler": "heun", "steps": 18, "seed": 0}
        judged = {g: {"digits_fd": q + run.seed, "digits_acc": 0.9, "seconds": 2.0}
                  for g, q in posthoc_fd[run.variant].items()}
        cached = {"2": {"digits_fd": posthoc_fd[run.variant]["2"] + run.seed + 1.5, "digits_acc": 0.8, "seconds": 1.0},
                  "1": {"digits_fd": 99.0, "digits_acc": 0.1, "seconds": 0.5}}
        path_drop = {"path_drop": {"2": {"digits_fd": 4.0 + run.seed, "digits_acc": 0.9, "seconds": 1.5,
                                         "gflops_per_image": 7.0}}} if run.variant == "fast" else {}
        (Path(run.run_dir) / "posthoc.json").write_text(json.dumps({
            "settings": settings, "note": None, "guidance": judged, "skip_cache": {"interval": 2, "guidance": cached},
            **path_drop}))
    return path


def test_report_numbers_equal_those_worked_out_by_hand(tmp_path):
    path = synthetic_runs(tmp_path)
    summary = run_study(str(path), out=io.StringIO(), err=io.StringIO())  # everything finished and judged: no work
    saved = json.loads((tmp_path / "out" / "study.json").read_text())
    assert saved["target"] == summary["target"] == 12.0  # the baseline's final mean: (10 + 14) / 2
    ref, fast = saved["variants"]
    assert ref["baseline"] and not fast["baseline"]
    # at the budget: mean and sample standard deviation over the seeds
    assert ref["final"] == {"mean": 12.0, "sd": pytest.approx(math.sqrt(8)), "values": [10.0, 14.0]}
    assert fast["final"]["mean"] == 7.0 and fast["final"]["sd"] == pytest.approx(math.sqrt(2))
    # the baseline's mean curve (32, 21, 12) reaches 12 at its final evaluation: step 30, 1.1 s a step
    assert ref["to_target"]["step"] == pytest.approx(30) and ref["to_target"]["train_seconds"] == pytest.approx(33)
    # fast's mean curve (22, 11, 7) crosses 12 between steps 10 and 20: 10/11 of the way, 0.6 s a step
    frac = (12 - 22) / (11 - 22)
    need = fast["to_target"]
    assert need["step"] == pytest.approx(10 + 10 * frac)
    assert need["images_seen"] == pytest.approx(BATCH * (10 + 10 * frac))
    assert need["train_flops"] == pytest.approx(1e9 * (10 + 10 * frac))
    assert need["train_seconds"] == pytest.approx(6 + 6 * frac)
    assert need["accelerator_hours"] == pytest.approx((6 + 6 * frac) * 2 / 3600)
    assert fast["speedup"]["wall"] == pytest.approx(33 / (6 + 6 * frac))
    assert fast["speedup"]["images"] == pytest.approx(30 / (10 + 10 * frac))
    assert ref["speedup"] == {"wall": pytest.approx(1.0), "images": pytest.approx(1.0)}
    # per seed: ref-s0 (30, 20, 10) crosses 12 at step 28; ref-s1 (34, 22, 14) never does
    assert [r["to_target"] and r["to_target"]["step"] for r in ref["runs"]] == [pytest.approx(28), None]
    # guidance (post-hoc, seeds offset by 0 and 1) and Skip-Cache at the best scale
    assert fast["guided"] == {"metric": "digits_fd", "scales": {"1": 8.5, "2": 5.5}, "best_scale": 2.0, "best": 5.5,
                              "gflops_per_image": None}
    # path-drop guidance: unguided (g = 1) is CFG's value, g = 2 its own, with its counted cost
    assert fast["guided_path_drop"] == {"metric": "digits_fd", "scales": {"1": 8.5, "2": 4.5}, "best_scale": 2.0,
                                        "best": 4.5, "gflops_per_image": 7.0}
    assert ref["guided_path_drop"] is None
    assert fast["posthoc"]["path_drop"]["digits_fd"] == {"2": 4.5}
    assert fast["skip_cache"] == {"scale": 2.0, "interval": 2, "speedup": 2.0, "digits_fd_change": 1.5,
                                  "digits_acc_change": pytest.approx(-0.1)}
    # every judged metric by scale, mean over seeds: fd 8 + 0 and 8 + 1 at g = 1, the cached 5 + 1.5 + 0 / + 1 at 2
    assert fast["posthoc"]["full"] == {"digits_acc": {"1": 0.9, "2": 0.9}, "digits_fd": {"1": 8.5, "2": 5.5}}
    assert fast["posthoc"]["skip_cache"]["digits_fd"] == {"1": 99.0, "2": 7.0}
    md = (tmp_path / "out" / "study.md").read_text()
    assert "| fast | path-drop | 4.5 (digits_fd) | 2 | 7 | 1: 8.5, 2: 4.5 |" in md and "| fast | CFG | 5.5 " in md
    assert "| fast + Skip-Cache | 99 | 7 |" in md and "| ref | 15.5 | 9.5 |" in md and "| fast | 90.0% | 90.0% |" in md
    assert "| ref (baseline) | 2 | 12 ± 2.8 | 30 | 480 | 3e+10 | 0:00:33 | 0.0183 | 1.00x | 1.00x |" in md
    assert "| fast | 2 | 7 ± 1.4 | 19 | 305 | 1.91e+10 | 0:00:11 | 0.00636 | 2.88x | 1.57x |" in md
    assert "| fast | 5.5 (digits_fd) | 2 | 1: 8.5, 2: 5.5 | 2.00x | +1.5 |" in md
    assert "| ref | 1 | 30 | 14 | not reached | not reached |" in md
    png = (tmp_path / "out" / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1200, 450)
    assert len(png) > 20000  # curves, bands and labels, not an empty canvas


@pytest.mark.parametrize("name", ["digits", "digits_equal_time"])
def test_the_shipped_studies_plan(name):
    # every run's config of the shipped studies loads and validates for 2 ranks (no data needed)
    study = load_study(str(Path(__file__).parents[1] / "launch_configs" / "studies" / f"{name}.yaml"))
    runs = plan_runs(study)
    images = study.budget["images"]
    assert all(run.steps * run.config.data.batch_size == images for run in runs)
    assert study.baseline in {run.variant for run in runs}
    if name == "digits":  # two seeds for the headline: the baseline and the masked recipe
        seeds = {v: [r.seed for r in runs if r.variant == v] for v in ("dit_edm", "mask_final")}
        assert seeds == {"dit_edm": [0, 1], "mask_final": [0, 1]}
