"""The checkpoint record: one typed reader for every user of a checkpoint, version checks with
one-line errors, and a checkpoint written before the record existed (tests/fixtures/checkpoint_v1,
see make_checkpoint_v1.py) still resumes, exports and samples."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from trainer.checkpoints import (
    FORMAT_VERSION,
    STATE_FILE,
    CheckpointError,
    CheckpointRecord,
    export_weights,
    network_weights,
    read_record,
    write_record,
)
from trainer.cli import sample_main
from trainer.config import config_from_dict
from trainer.sample.loading import load_model

from launcher import deepspeed_command, free_port, losses, run, tiny_config, write_config

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v1"
V1 = FIXTURE / "step00000003"
TINY_MODEL = {"hidden_size": 16, "depth": 2, "num_heads": 2, "decoder_depth": 1, "decoder_hidden_size": 16,
              "decoder_num_heads": 2}


def test_a_record_written_before_versioning_reads_as_version_1():
    raw = json.loads((V1 / STATE_FILE).read_text())
    assert "format_version" not in raw  # the fixture predates the field
    record = read_record(str(V1))
    assert record.format_version == 1 and FORMAT_VERSION == 4
    assert (record.state.train_flops, record.state.train_seconds) == (0.0, 0.0)  # fields of version 2
    assert (record.step, record.world_size, record.state.images_seen, record.ema_updates) == (3, 2, 48, 3)
    assert record.model_name == "MaskDiT-S/2" and record.model_kwargs["hidden_size"] == 16
    assert record.dataset["latent_shape"] == [3, 8, 8] and record.micro_batch_size() == 8
    assert config_from_dict(record.config).model.options == TINY_MODEL
    assert len(record.replica_checksums) == 2


def test_record_round_trip_and_one_line_errors(tmp_path):
    record = dataclasses.replace(read_record(str(V1)), phase_end="unmask", universal_from="/somewhere")
    write_record(str(tmp_path), record)
    # a record read from an older file is written in the current layout, as the current version
    assert read_record(str(tmp_path)) == dataclasses.replace(record, format_version=FORMAT_VERSION)
    state = json.loads((tmp_path / STATE_FILE).read_text())

    def error(data) -> str:
        (tmp_path / STATE_FILE).write_text(data if isinstance(data, str) else json.dumps(data))
        with pytest.raises(CheckpointError) as err:
            read_record(str(tmp_path))
        assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
        return str(err.value)

    # checkpoints from before the dataset summary wrote none, or null: they still resume and export
    for early in ({k: v for k, v in state.items() if k != "dataset"}, {**state, "dataset": None}):
        (tmp_path / STATE_FILE).write_text(json.dumps(early))
        assert read_record(str(tmp_path)).dataset == {}
    newer = error({**state, "format_version": FORMAT_VERSION + 1})
    assert f"format version {FORMAT_VERSION + 1}" in newer and "reads versions 1 to" in newer
    assert "format version 'x'" in error({**state, "format_version": "x"})
    assert "has unknown fields weird" in error({**state, "weird": 1})
    assert "lacks model_name" in error({k: v for k, v in state.items() if k != "model_name"})
    assert "cannot read" in error("{not json")
    assert "does not hold a JSON object" in error("[1, 2]")
    with pytest.raises(CheckpointError, match="no trainer_state.json"):
        read_record(str(tmp_path / "elsewhere"))


def test_the_old_checkpoint_exports_and_samples(tmp_path, capsys):
    ema, record = network_weights(str(V1), "ema")
    live, _ = network_weights(str(V1), "model")  # consolidated from its two ZeRO-2 partitions
    assert set(ema) == set(live) and record.step == 3
    meta = export_weights(str(V1), str(tmp_path / "w.safetensors"), "model")
    assert meta["model"] == "MaskDiT-S/2" and meta["step"] == "3"
    loaded = load_model(str(tmp_path / "w.safetensors"))
    assert loaded.step == 3 and loaded.weights == "model" and loaded.skip
    assert sample_main([str(FIXTURE), "--out", str(tmp_path / "s"), "--per-class", "1", "--steps", "3",
                        "--quiet", "--no-png"]) == 0
    assert "step 3, ema weights" in capsys.readouterr().out
    with np.load(tmp_path / "s" / "samples.npz") as data:
        assert data["arr_0"].shape == (10, 8, 8, 3)


def test_the_old_checkpoint_resumes_training(digits8, tmp_path):
    """The run that wrote it continues from step 3 with the weights it saved (the checksums in its
    record are checked on load), its Adam state and its data position."""
    run_dir = tmp_path / "runs" / "t"
    shutil.copytree(FIXTURE, run_dir / "checkpoints")
    cfg = tiny_config(digits8, str(tmp_path / "runs"), run={"total_steps": 5},
                      model={"name": "MaskDiT-S/2", "skip": True, "options": TINY_MODEL}, checkpoint={"every": 5},
                      monitor={"log_every": 1, "peak_tflops": 1.0, "sample_count": 4, "sample_steps": 2})
    proc = run(deepspeed_command(write_config(cfg, tmp_path / "c.yaml"), free_port()), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (f"resumed from {run_dir / 'checkpoints' / 'step00000003'} at step 3 (weights match the saved checksums), "
            "optimizer state: Adam step 3") in proc.stdout
    assert sorted(losses(proc.stdout)) == [4, 5]
    record = read_record(str(run_dir / "checkpoints" / "step00000005"))
    assert isinstance(record, CheckpointRecord) and record.step == 5 and record.format_version == FORMAT_VERSION
    assert record.state.images_seen == 80 and record.ema_updates == 5
    assert record.state.train_flops > 0 and record.state.train_seconds > 0  # counted from the resume on
