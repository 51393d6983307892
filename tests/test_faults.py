"""MDT_FAULTS, the failure-rehearsal hook: what parses, what it arms on which rank, and a value that
does not parse stopping mdt-train before launch with one line naming the part."""

from __future__ import annotations

import pytest
from deepspeed import DeepSpeedEngine

from trainer import cli
from trainer.training import task
from trainer.training.faults import Fault, FaultSpecError, arm_faults, parse_faults

from launcher import tiny_config, write_config


def test_faults_parse_with_their_ranks_and_numbers():
    faults = parse_faults("nan:calls=7,25+:rank=1; raise:call=9 ;enospc:save=2;hang:call=3:rank=0")
    assert faults == [Fault("nan", frozenset({7}), 25, 1), Fault("raise", frozenset({9}), None, None),
                      Fault("enospc", frozenset({2}), None, None), Fault("hang", frozenset({3}), None, 0)]
    nan = faults[0]
    assert [c for c in range(1, 30) if nan.strikes(c)] == [7, 25, 26, 27, 28, 29]
    assert nan.describe() == "nan at calls 7,25+ on rank 1" and faults[1].describe() == "raise at call 9"
    assert parse_faults("") == []


@pytest.mark.parametrize("spec, message", [
    ("boom:call=1", "unknown kind 'boom' (choose from raise, hang, nan, enospc)"),
    ("raise", "say when with call=N"),
    ("raise:calls=1", "expected call=N[,M...] and optionally rank=R, got 'calls=1'"),
    ("raise:call=2,3", "raise strikes once: give one number"),
    ("nan:calls=x", "'x' is not a number (or N+)"),
    ("enospc:save=1:rank=one", "rank must be a number, got 'one'"),
])
def test_bad_values_name_the_part(spec, message):
    with pytest.raises(FaultSpecError) as caught:
        parse_faults(f"nan:calls=1;{spec}")
    assert str(caught.value) == f"MDT_FAULTS: {spec!r}: {message}"


def test_only_this_ranks_faults_are_armed_and_announced(capsys, monkeypatch):
    monkeypatch.setattr(task.TrainingModule, "forward", task.TrainingModule.forward)  # restored afterwards
    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", DeepSpeedEngine.save_checkpoint)
    before = task.TrainingModule.forward
    assert arm_faults(0, "raise:call=9:rank=1") == [] and capsys.readouterr().out == ""
    assert task.TrainingModule.forward is before  # nothing installed for another rank
    armed = arm_faults(1, "raise:call=9:rank=1;enospc:save=2")
    assert [f.kind for f in armed] == ["raise", "enospc"] and task.TrainingModule.forward is not before
    assert capsys.readouterr().out == "rank 1: MDT_FAULTS armed: raise at call 9 on rank 1; enospc at save 2\n"


def test_mdt_train_refuses_a_bad_value_before_launch(digits8, tmp_path, monkeypatch, capsys):
    config = write_config(tiny_config(digits8, str(tmp_path / "runs")), tmp_path / "c.yaml")
    monkeypatch.setenv("MDT_FAULTS", "raise:call=9;explode")
    assert cli.main(["--config", str(config)]) == 2
    assert capsys.readouterr().err == ("mdt-train: error: MDT_FAULTS: 'explode': unknown kind 'explode' "
                                       "(choose from raise, hang, nan, enospc)\n")
    assert not (tmp_path / "runs").exists()
