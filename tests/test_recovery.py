"""The divergence policy (trainer.training.recovery) on its own: when a streak or a loss spike
rolls back and when it stops, the lowered learning rate, and the config checks of its keys."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, config_from_dict
from trainer.config.schema import MonitorConfig
from trainer.config.validation import validate
from trainer.training.recovery import SPIKE_MIN_HISTORY, Diverged, Recovery, scale_search
from trainer.training.stop import RunStopped


def policy(**kw) -> Recovery:
    return Recovery(MonitorConfig(**kw), "/runs/x/checkpoints")


def test_a_streak_rolls_back_until_the_rollbacks_are_used_up():
    r = policy(max_nonfinite=2, on_nonfinite="rollback", max_rollbacks=1, rollback_lr_scale=0.25,
               rollback_lr_steps=10)
    r.nonfinite(7)
    with pytest.raises(Diverged) as hit:
        r.nonfinite(7)
    assert (hit.value.step, hit.value.why) == (7, "2 updates in a row with non-finite gradients in step 7")
    assert hit.value.first_bad == 7
    r.rolled_back(5)
    assert (r.rollbacks, r.lr_cut_until, r.bad_in_a_row) == (1, 15, 0)
    assert [r.lr_scale(s) for s in (6, 15, 16)] == [0.25, 0.25, 1.0]
    r.nonfinite(20)
    r.finite()  # an applied update ends the streak
    r.nonfinite(20)
    with pytest.raises(RunStopped, match=r"^2 updates in a row with non-finite gradients in step 20: stopping after "
                                         r"1 rollback; the last good checkpoint in /runs/x/checkpoints is intact"):
        r.nonfinite(20)


def test_stop_is_the_default_and_says_nothing_of_rollbacks():
    r = policy(max_nonfinite=1)
    with pytest.raises(RunStopped, match=r"^1 updates in a row with non-finite gradients in step 3: stopping; the "
                                         r"last good"):
        r.nonfinite(3)
    assert r.lr_scale(1) == 1.0


def test_a_spike_is_a_loss_far_above_the_phase_median_for_several_steps():
    r = policy(on_nonfinite="rollback", spike_factor=3.0, spike_steps=2)
    for step in range(1, SPIKE_MIN_HISTORY + 1):
        r.step_loss(step, 1.0 + 0.01 * (step % 3), "masked")
    r.step_loss(21, 5.0, "masked")  # one high step is not yet a spike
    r.step_loss(22, 1.0, "masked")  # and a normal one ends the run of high ones
    r.step_loss(23, 5.0, "masked")
    with pytest.raises(Diverged, match=r"loss above 3 x its running median 1\.01 for 2 steps in a row \(step 24: 5\)") \
            as hit:
        r.step_loss(24, 5.0, "masked")
    assert hit.value.first_bad == 23  # the rollback goes to a checkpoint from before the first high step


def test_spikes_need_history_and_restart_with_each_phase():
    r = policy(on_nonfinite="rollback", spike_factor=2.0, spike_steps=1)
    for step in range(1, SPIKE_MIN_HISTORY):
        r.step_loss(step, 1.0, "masked")
    r.step_loss(SPIKE_MIN_HISTORY, 50.0, "masked")  # too little history: no median yet, so no spike
    for step in range(SPIKE_MIN_HISTORY + 1, 40):
        r.step_loss(step, 1.0, "masked")
    r.step_loss(40, 10.0, "unmask_1")  # a new phase: its loss level starts a new history
    for step in range(41, 41 + SPIKE_MIN_HISTORY):
        r.step_loss(step, 10.0, "unmask_1")
    with pytest.raises(Diverged, match="running median 10 "):  # measured against the new phase's level
        r.step_loss(70, 25.0, "unmask_1")
    off = policy(on_nonfinite="rollback")  # spike_factor 0: never a spike
    for step in range(1, 50):
        off.step_loss(step, float(step) ** 3, "masked")


@pytest.mark.parametrize("key,value,message", [
    ("on_nonfinite", "retry", "monitor.on_nonfinite: 'retry' is not one of stop, rollback"),
    ("max_rollbacks", -1, "monitor.max_rollbacks must be >= 0"),
    ("rollback_lr_scale", 0.0, "monitor.rollback_lr_scale must be in (0, 1]"),
    ("rollback_lr_steps", -5, "monitor.rollback_lr_steps must be >= 0"),
    ("spike_factor", 0.5, "monitor.spike_factor must be 0 (off) or > 1"),
    ("spike_steps", 0, "monitor.spike_steps must be >= 1"),
])
def test_recovery_keys_are_checked(key, value, message):
    cfg = config_from_dict({"data": {"shards": "x"}, "monitor": {key: value}})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg, 1)


def test_fp16_loss_scale_search_is_not_a_divergence():
    """fp16's scaler skips and halves its scale on an overflow: routine until the scale is at its
    minimum, where a skip counts as non-finite like any other precision's."""
    assert scale_search("fp16", 65536.0) and scale_search("fp16", 2.0)
    assert not scale_search("fp16", 1.0) and not scale_search("fp16", None)
    assert not scale_search("bf16", 65536.0) and not scale_search("fp32", 4.0)
