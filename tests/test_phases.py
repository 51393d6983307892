"""The phase plan: a pure step -> (mask ratio, lr scale, phase) function."""

import math
import re

import pytest

from trainer.config import PhasesConfig
from trainer.config.phases import FINAL, MASKED, UNMASK, PhasePlan


def plan(**kw) -> PhasePlan:
    total = kw.pop("total", 1000)
    warm = kw.pop("warmup", 0)
    return PhasePlan(PhasesConfig(**kw), total, warm)


def test_constant_masking_with_periodic_and_final_unmask_tuning():
    p = plan(mask_ratio=0.5, unmask_every=100, unmask_steps=10, unmask_lr_scale=0.5,
             final_unmask_steps=50, final_unmask_lr_scale=0.1)
    phases = [p.at(s).phase for s in range(1000)]
    assert phases.count(FINAL) == 50 and all(ph == FINAL for ph in phases[950:])
    # periodic windows are the last 10 steps of each 100-step block before the final phase
    assert [s for s in range(950) if phases[s] == UNMASK][:12] == list(range(90, 100)) + [190, 191]
    assert phases.count(UNMASK) == 9 * 10
    assert p.at(0) .mask_ratio == 0.5 and p.at(95).mask_ratio == 0.0 and p.at(960).mask_ratio == 0.0
    assert p.at(95).lr_scale == 0.5 and p.at(960).lr_scale == 0.1 and p.at(100).lr_scale == 1.0
    ends = [s for s in range(1000) if p.at(s).phase_end]
    assert ends == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert all(p.at(s).phase in (UNMASK, FINAL) for s in ends)


def test_periodic_window_cut_short_by_the_final_phase_ends_there():
    p = plan(total=130, mask_ratio=0.5, unmask_every=60, unmask_steps=20, final_unmask_steps=15)
    assert p.at(99).phase == MASKED and p.at(100).phase == UNMASK
    assert p.at(114).phase == UNMASK and p.at(114).phase_end
    assert p.at(115).phase == FINAL


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_mask_ratio_schedules(schedule):
    p = plan(total=101, mask_ratio=0.75, schedule=schedule, end_mask_ratio=0.25, schedule_levels=0)
    assert p.at(0).mask_ratio == pytest.approx(0.75)
    assert p.at(100).mask_ratio == pytest.approx(0.25)
    mid = p.at(50).mask_ratio
    assert mid == pytest.approx(0.5)
    quarter = p.at(25).mask_ratio
    expected = 0.75 - 0.5 * (0.25 if schedule == "linear" else 0.5 * (1 - math.cos(math.pi / 4)))
    assert quarter == pytest.approx(expected)
    ratios = [p.at(s).mask_ratio for s in range(101)]
    assert all(a >= b for a, b in zip(ratios, ratios[1:]))
    # in levels (the default, 8): a few distinct ratios, the nearest level of the continuous one
    stepped = plan(total=101, mask_ratio=0.75, schedule=schedule, end_mask_ratio=0.25, schedule_levels=4)
    levels = [stepped.at(s).mask_ratio for s in range(101)]
    assert sorted(set(levels), reverse=True) == pytest.approx([0.75, 0.625, 0.5, 0.375, 0.25])
    assert all(abs(a - b) <= 0.5 / 4 * 0.5 + 1e-12 for a, b in zip(levels, ratios))
    assert all(a >= b for a, b in zip(levels, levels[1:]))


def test_warmup_scales_every_phase():
    p = plan(total=100, warmup=10, final_unmask_steps=95, final_unmask_lr_scale=0.5)
    assert p.at(0).lr_scale == pytest.approx(0.1 * 1.0)
    assert p.at(5).lr_scale == pytest.approx(0.6 * 0.5)
    assert p.at(50).lr_scale == pytest.approx(0.5)


def test_plan_is_pure_so_resume_mid_phase_agrees():
    kwargs = dict(mask_ratio=0.5, schedule="cosine", end_mask_ratio=0.3, unmask_every=40, unmask_steps=7,
                  final_unmask_steps=20, total=300, warmup=15)
    a, b = plan(**kwargs), plan(**kwargs)
    for s in list(range(35, 45)) + list(range(275, 300)):  # inside an unmask window / the final phase
        assert a.at(s) == b.at(s)


def test_table_and_bounds():
    p = plan(total=1000, mask_ratio=0.5, unmask_every=100, unmask_steps=10, final_unmask_steps=50)
    text = p.table(max_rows=6)
    assert "final_unmask" in text and "pattern repeats every 100 steps" in text
    segs = p.segments()
    assert segs[0][:3] == (0, 89, MASKED) and segs[-1][:3] == (950, 999, FINAL)
    assert sum(last - first + 1 for first, last, *_ in segs) == 1000
    with pytest.raises(ValueError, match="outside the plan"):
        p.at(1000)


@pytest.mark.parametrize("schedule,values", [
    # steps 0-9 warm up; the decay runs over steps 10..109 to a floor of 0.1 of the peak
    ("constant", {0: 0.1, 9: 1.0, 10: 1.0, 60: 1.0, 109: 1.0}),
    ("linear", {0: 0.1, 9: 1.0, 10: 1.0, 43: 1 - 0.9 * 33 / 99, 109: 0.1}),
    ("cosine", {0: 0.1, 9: 1.0, 10: 1.0, 59: 1 - 0.9 * 0.5 * (1 - math.cos(math.pi * 49 / 99)), 109: 0.1}),
])
def test_lr_schedules_after_the_warm_up(schedule, values):
    p = PhasePlan(PhasesConfig(mask_ratio=0.5, final_unmask_steps=20, final_unmask_lr_scale=0.5), 110, 10,
                  lr_schedule=schedule, min_lr_ratio=0.1)
    for step, factor in values.items():
        assert p.lr_factor(step) == pytest.approx(factor, abs=1e-12), (schedule, step)
        # composed with the phase's own scale: the final unmask tuning (steps 90-109) halves it
        assert p.at(step).lr_scale == pytest.approx(factor * (0.5 if step >= 90 else 1.0), abs=1e-12)
    decay = [p.lr_factor(s) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # never rises after the warm-up
    assert f"then {schedule}" in p.table() or schedule == "constant"
    assert "lr schedule: linear warm-up over the first 10 steps" in p.table()


def test_lr_schedule_from_the_config_and_its_checks():
    from trainer.config import ConfigError, config_from_dict
    from trainer.config.validation import validate

    cfg = config_from_dict({"data": {"shards": "x"}, "run": {"total_steps": 101},
                            "optim": {"lr": 1e-3, "lr_schedule": "cosine", "min_lr": 1e-4}})
    p = PhasePlan.from_config(cfg)
    assert p.at(0).lr_scale == pytest.approx(1.0) and p.at(100).lr_scale == pytest.approx(0.1)
    assert p.at(50).lr_scale == pytest.approx(0.55)
    with pytest.raises(ConfigError, match=r"optim\.min_lr must be in \[0, optim\.lr 0\.001\], got 0\.01"):
        validate(config_from_dict({"data": {"shards": "x"}, "optim": {"lr": 1e-3, "min_lr": 1e-2}}), 1)
    with pytest.raises(ConfigError, match="optim.lr_schedule: 'step' is not one of constant, linear, cosine"):
        validate(config_from_dict({"data": {"shards": "x"}, "optim": {"lr_schedule": "step"}}), 1)


def test_lr_line_stays_inside_the_plan_and_a_decay_needs_steps_after_the_warm_up():
    from trainer.config import ConfigError, config_from_dict
    from trainer.config.validation import validate

    line = PhasePlan(PhasesConfig(mask_ratio=0.5), 10, 100).lr_line()
    assert re.findall(r"(\d+): [\d.]+", line.split("factor at step ")[1]) == ["0", "9"]
    with pytest.raises(ConfigError, match="optim.warmup_steps 10 leaves no step of run.total_steps 11 to decay over"):
        validate(config_from_dict({"data": {"shards": "x"}, "run": {"total_steps": 11},
                                   "optim": {"lr_schedule": "cosine", "warmup_steps": 10}}), 1)
