"""Resuming on another number of ranks: a 2-rank ZeRO-2 checkpoint converted with mdt-universal
continues on 1 rank (CPU, gloo) with its weights, optimizer, EMA, step and phase; the helper's
one-line errors; the data position for a new world size."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoints import (
    COMPLETE,
    EMA_FILE,
    STATE_FILE,
    UNIVERSAL_SUFFIX,
    CheckpointError,
    CheckpointRecord,
    RunState,
    for_world_size,
    network_weights,
    read_record,
    rotate,
    to_universal,
    write_record,
)
from trainer.cli import universal_main
from trainer.config import PhasesConfig
from trainer.config.phases import PhasePlan
from trainer.training.checkpointer import (
    optimizer_state_summary,
    rescale_data_state,
    resume_data_state,
    save_checkpoint,
)

from launcher import STEP_LINE, deepspeed_command, free_port, losses, run, tiny_config, write_config

pytestmark = pytest.mark.timeout(900)

PHASES = {"mask_ratio": 0.5, "unmask_every": 12, "unmask_steps": 3}


def logged_phases(output: str) -> dict:
    out = {}
    for line in output.splitlines():
        m = STEP_LINE.match(line.split("] ", 1)[-1] if line.startswith("[") else line)
        if m:
            out[int(m.group(1))] = m.group(2)
    return out


@pytest.fixture(scope="module")
def zero2_two_ranks(digits8, tmp_path_factory):
    """20 steps of ZeRO-2 on 2 ranks (checkpoint at step 20), converted with mdt-universal."""
    tmp = tmp_path_factory.mktemp("universal")
    cfg = tiny_config(digits8, str(tmp / "runs"), run={"total_steps": 20}, checkpoint={"every": 20},
                      phases=PHASES, monitor={"log_every": 1, "peak_tflops": 1.0, "sample_count": 4, "sample_steps": 4})
    config = write_config(cfg, tmp / "c.yaml")
    first = run(deepspeed_command(config, free_port()), tmp)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ckpt = tmp / "runs" / "t" / "checkpoints" / "step00000020"
    assert universal_main([str(ckpt)]) == 0
    return tmp, config, ckpt, Path(str(ckpt) + UNIVERSAL_SUFFIX), first.stdout


def consolidated_zero12_state(ckpt: Path) -> dict:
    """{parameter name: {"fp32", "exp_avg", "exp_avg_sq"}} from a ZeRO-1/2 checkpoint's per-rank flat
    partitions, put together here independently of DeepSpeed's universal converter: each
    parameter group is one flat vector split over the ranks in rank order, its parameters laid out
    in the order of the model-states file's param_shapes (any padding sits at the end)."""
    # DeepSpeed's own files of a run this test just made (its optimizer file pickles a loss-scaler
    # object, so weights_only cannot read it)
    shapes = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["param_shapes"]
    files = sorted(ckpt.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda f: int(f.name.split("_")[3]))
    parts = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    out = {}
    for g, group in enumerate(shapes):
        flat = {"fp32": torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])}
        for key in ("exp_avg", "exp_avg_sq"):
            flat[key] = torch.cat([p["base_optimizer_state"]["state"][g][key] for p in parts])
        offset = 0
        for name, shape in group.items():
            n = shape.numel()
            out[name] = {k: v[offset:offset + n].view(shape) for k, v in flat.items()}
            offset += n
    return out


def test_universal_copy_holds_the_adam_moments_of_the_original(zero2_two_ranks):
    """A loss that falls after resume proves little: it falls with zeroed moments too. The copy's
    moments must be the original's, parameter by parameter."""
    _, _, ckpt, uni, _ = zero2_two_ranks
    original = consolidated_zero12_state(ckpt)
    weights, _ = network_weights(str(ckpt), "model")  # DeepSpeed's consolidation of the same files
    assert {f"denoiser.net.{k}" for k in weights} == set(original)
    for name, entry in original.items():
        # the test's own reading of the partitions agrees with DeepSpeed's on the weights
        assert torch.equal(entry["fp32"], weights[name[len("denoiser.net."):]]), name
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            converted = torch.load(uni / "zero" / name / f"{key}.pt", weights_only=True)["param"]
            assert torch.equal(converted, entry[key]), (name, key)
        assert int(torch.load(uni / "zero" / name / "step.pt", weights_only=True)) == 20
    moved = sum(float(e["exp_avg"].abs().sum()) for e in original.values())
    assert moved > 0 and all(float(e["exp_avg_sq"].min()) >= 0 for e in original.values())


def test_universal_copy_holds_the_saved_state(zero2_two_ranks):
    _, _, ckpt, uni, _ = zero2_two_ranks
    assert (uni / COMPLETE).exists() and (uni / "zero" / "optimizer_state.pt").exists()
    assert not (ckpt.parent / "latest_universal").exists()  # DeepSpeed's pointer: we pass tags explicitly
    saved, converted = network_weights(str(ckpt), "model"), network_weights(str(uni), "model")
    assert set(saved[0]) == set(converted[0]) and len(saved[0]) > 10
    for k, v in saved[0].items():
        assert torch.equal(v, converted[0][k]), k
    copy, original = read_record(str(uni)), read_record(str(ckpt))
    assert copy.universal_from == str(ckpt) and original.universal_from is None
    assert dataclasses.replace(copy, universal_from=None) == original and copy.world_size == 2
    ema_a, ema_b = load_file(ckpt / EMA_FILE), load_file(uni / EMA_FILE)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    for r in (0, 1):
        assert (uni / f"data_rank{r}.json").read_text() == (ckpt / f"data_rank{r}.json").read_text()


def test_two_rank_zero2_checkpoint_resumes_on_one_rank(zero2_two_ranks):
    """Rerunning the same command on 1 rank takes the universal copy: step 20, the saved weights
    (checksums), a warned data restart, then 10 more steps through an unmask phase."""
    tmp, config, ckpt, uni, first_out = zero2_two_ranks
    proc = run(deepspeed_command(config, free_port(), ["--set", "run.total_steps=30"], ["--num_gpus", "1"]), tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the Adam moments and step came back too (a fresh optimizer would say "fresh")
    assert f"resumed from {uni} at step 20 (weights match the saved checksums), optimizer state: Adam step 20" \
        in proc.stdout
    # 20 steps x 2 ranks x 8 = 320 samples of epoch 0 = 40 micro batches of 8 on one rank
    assert "data stream restarts as drawn for 1 at epoch 0, batch 40" in proc.stdout
    first, resumed = losses(first_out), losses(proc.stdout)
    assert sorted(resumed) == list(range(21, 31))
    assert all(math.isfinite(v) for v in resumed.values())
    plan = PhasePlan(PhasesConfig(**PHASES), 30, 2)
    assert logged_phases(proc.stdout) == {s: plan.at(s - 1).phase for s in range(21, 31)}  # unmask at 22-24
    assert sum(resumed[s] for s in range(26, 31)) < 0.8 * sum(first[s] for s in range(1, 6)), (first, resumed)
    root = ckpt.parent
    for tag, images in (("step00000024-unmask", 384), ("step00000030", 480)):
        state = json.loads((root / tag / STATE_FILE).read_text())
        assert (root / tag / COMPLETE).exists() and state["world_size"] == 1 and state["state"]["images_seen"] == images
    assert json.loads((root / "step00000030" / "data_rank0.json").read_text())["batches_in_epoch"] == 60


def test_resume_stops_when_the_loaded_weights_are_not_the_saved_ones(zero2_two_ranks, tmp_path):
    tmp, config, _, uni, _ = zero2_two_ranks
    bad = tmp_path / "bad"
    shutil.copytree(uni, bad)
    fp32 = bad / "zero" / "denoiser.net.final_layer.linear.weight" / "fp32.pt"
    entry = torch.load(fp32, weights_only=True)
    entry["param"] = entry["param"] + 0.1
    torch.save(entry, fp32)
    proc = run(deepspeed_command(config, free_port(), ["--set", f"run.output_dir={tmp_path / 'runs'}",
                                                       "--set", f"checkpoint.resume={bad}"], ["--num_gpus", "1"]), tmp)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"mdt-train: stopped: weights loaded from {bad} differ from the saved ones" in proc.stderr


def fake_record(**fields) -> CheckpointRecord:
    """A checkpoint record with placeholder values, the given fields set."""
    base = dict(state=RunState(step=5, images_seen=80), world_size=1, model_name="MaskDiT-S/2", model_kwargs={},
                config={}, dataset={})
    return CheckpointRecord(**{**base, **fields})


def _fake_checkpoint(path: Path, world_size: int, partitioned: bool, sums=((1.0, 2.0),)) -> Path:
    path.mkdir(parents=True)
    write_record(str(path), fake_record(world_size=world_size, replica_checksums=[list(s) for s in sums]))
    (path / COMPLETE).write_text("")
    if partitioned:
        for r in range(world_size):
            (path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    return path


def test_world_size_change_needs_a_universal_copy(tmp_path):
    zero2 = _fake_checkpoint(tmp_path / "step00000005", 2, partitioned=True)
    assert for_world_size(str(zero2), 2) == str(zero2)
    with pytest.raises(CheckpointError, match=r"written by a world of 2 .* this run has 1: run `mdt-universal "):
        for_world_size(str(zero2), 1)
    uni = tmp_path / ("step00000005" + UNIVERSAL_SUFFIX)
    (uni / "zero").mkdir(parents=True)
    (uni / "zero" / "optimizer_state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError):  # an incomplete copy is not used
        for_world_size(str(zero2), 1)
    (uni / COMPLETE).write_text("")
    (uni / STATE_FILE).write_text(json.dumps({**json.loads((zero2 / STATE_FILE).read_text()),
                                              "universal_from": str(zero2)}))
    assert for_world_size(str(zero2), 1) == str(uni) and for_world_size(str(uni), 3) == str(uni)
    zero0 = _fake_checkpoint(tmp_path / "z0" / "step00000005", 2, partitioned=False)
    assert for_world_size(str(zero0), 1) == str(zero0)  # ZeRO-0 optimizer state is whole
    # rotation removes a tag's universal copy with it
    (tmp_path / "step00000010").mkdir()
    (tmp_path / "step00000010" / COMPLETE).write_text("")
    assert rotate(str(tmp_path), 1, True) == ["step00000005"]
    assert not zero2.exists() and not uni.exists()


def test_a_stale_universal_copy_is_not_used_and_a_rewrite_removes_it(tmp_path):
    """A run resumed from an older checkpoint rewrites later tags: their universal copies (made
    from the old tag) are stale. Resuming refuses one; saving the tag again removes it."""
    root = tmp_path / "checkpoints"
    tag = _fake_checkpoint(root / "step00000005", 2, partitioned=True, sums=[[1.0, 2.0], [1.0, 2.0]])
    uni = Path(str(tag) + UNIVERSAL_SUFFIX)
    (uni / "zero").mkdir(parents=True)
    (uni / "zero" / "optimizer_state.pt").write_bytes(b"")
    (uni / COMPLETE).write_text("")
    state = json.loads((tag / STATE_FILE).read_text())
    (uni / STATE_FILE).write_text(json.dumps({**state, "replica_checksums": [[1.5, 2.0]], "universal_from": str(tag)}))
    with pytest.raises(CheckpointError) as err:
        for_world_size(str(tag), 1)
    assert str(err.value) == (f"{uni} is stale (made from an earlier {tag}): remove it and rerun "
                              f"mdt-universal {tag}")
    older = {**state, "state": {**state["state"], "step": 4}, "universal_from": str(tag)}
    (uni / STATE_FILE).write_text(json.dumps(older))
    with pytest.raises(CheckpointError, match="is stale"):
        for_world_size(str(tag), 1)
    (uni / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="is stale"):
        for_world_size(str(tag), 1)

    class Engine:  # writes what DeepSpeed would, minus the tensors
        def save_checkpoint(self, root, tag, save_latest):
            (Path(root) / tag).mkdir()
            (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"")

    class Ema:
        def state_for_saving(self, rank):
            return {"w": torch.zeros(2)}

    Path(str(uni) + ".partial").mkdir()
    save_checkpoint(Engine(), Ema(), str(root), "step00000005", fake_record(world_size=2), {"epoch": 0}, 0,
                    lambda: None)
    assert (tag / COMPLETE).exists() and not (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step00000005"]


def test_resume_rescales_the_data_position_when_world_or_micro_batch_changes(tmp_path):
    ckpt = tmp_path / "step00000010"
    ckpt.mkdir()
    saved_data = [dict(samples_seen=80, epoch=1, batches_in_epoch=10, skipped=r) for r in (0, 1)]
    for r, d in enumerate(saved_data):
        (ckpt / f"data_rank{r}.json").write_text(json.dumps(d))
    saved = fake_record(world_size=2, config={"data": {"micro_batch_size": 8}})
    # the same (world size, micro batch size): the saved position as it is
    assert resume_data_state(saved, saved_data[1], str(ckpt), 1, 2, 8, 100) == (saved_data[1], False)
    # the same world size, micro batches of 16: 10 batches of 8 are 5 of 16
    data, rescaled = resume_data_state(saved, saved_data[1], str(ckpt), 1, 2, 16, 100)
    assert rescaled and data == dict(samples_seen=80, epoch=1, batches_in_epoch=5, skipped=1)
    # another world size: 2 ranks x 10 x 8 = 160 samples = 20 batches of 8 on 1 rank
    assert resume_data_state(saved, saved_data[1], str(ckpt), 0, 1, 8, 100) == (
        dict(samples_seen=160, epoch=1, batches_in_epoch=20, skipped=0), True)
    # a record without the micro batch size: only the world size decides (as before)
    legacy = fake_record(world_size=2, config={})
    assert resume_data_state(legacy, saved_data[0], str(ckpt), 0, 2, 16, 100) == (saved_data[0], False)
    assert resume_data_state(legacy, saved_data[0], str(ckpt), 0, 1, 16, 100)[0]["batches_in_epoch"] == 20  # as 16s


def test_optimizer_state_summary_reads_the_innermost_torch_optimizer():
    class Held(torch.optim.Optimizer):  # a torch optimizer's state without building one (~1.5 s of imports)
        def __init__(self):
            self.state, self.param_groups = {}, []

    adam = Held()
    wrapper = type("Wrapper", (), {})()  # as DeepSpeed's ZeRO / bf16 optimizers hold theirs
    wrapper.optimizer = adam
    assert optimizer_state_summary(wrapper) == optimizer_state_summary(adam) == "fresh"
    for i in range(2):  # as torch's AdamW leaves it after 3 steps
        adam.state[i] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
    assert optimizer_state_summary(wrapper) == "Adam step 3"
    # the real thing, end to end: the resume lines asserted in the launch tests


def _fake_ds_to_universal(monkeypatch, fail: bool = False):
    """Stand-in for DeepSpeed's conversion: writes a universal layout and, as DeepSpeed does,
    points `latest_universal` next to the output at it."""
    from deepspeed.checkpoint import ds_to_universal

    def main(args):
        out = Path(args.output_folder)
        (out / "zero").mkdir(parents=True)
        (out / "zero" / "optimizer_state.pt").write_bytes(b"")
        (out.parent / "latest_universal").write_text(out.name)
        if fail:
            raise RuntimeError("disk\nfull")

    monkeypatch.setattr(ds_to_universal, "main", main)


def test_mdt_universal_puts_latest_universal_back_and_cleans_up_after_errors(tmp_path, monkeypatch, capsys):
    root = tmp_path / "checkpoints"
    ckpt = _fake_checkpoint(root / "step00000005", 2, partitioned=True)
    (ckpt / "data_rank0.json").write_text("{}")
    _fake_ds_to_universal(monkeypatch)
    # no latest_universal before: none after (DeepSpeed's would name the renamed .partial)
    uni = Path(to_universal(str(ckpt)))
    assert uni == Path(str(ckpt) + UNIVERSAL_SUFFIX) and (uni / COMPLETE).exists()
    assert (uni / "data_rank0.json").read_text() == "{}" and not (root / "latest_universal").exists()
    # one that was there keeps its contents
    (root / "latest_universal").write_text("someone_elses")
    to_universal(str(ckpt), str(root / "other"))
    assert (root / "latest_universal").read_text() == "someone_elses"
    # an OSError while copying our files: one line naming the path and the error, no .partial left
    (ckpt / "data_rank1.json").mkdir()  # copying a directory as a file fails
    assert universal_main([str(ckpt), "--out", str(root / "third")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mdt-universal: error: could not write {root / 'third'} (from {ckpt}): ") and \
        "data_rank1.json" in err and err.count("\n") == 1, err
    assert not (root / "third").exists() and not (root / "third.partial").exists()
    assert (root / "latest_universal").read_text() == "someone_elses"
    # DeepSpeed failing after it wrote its pointer: the same
    (ckpt / "data_rank1.json").rmdir()
    _fake_ds_to_universal(monkeypatch, fail=True)
    assert universal_main([str(ckpt), "--out", str(root / "fourth")]) == 2
    assert "DeepSpeed could not convert" in capsys.readouterr().err
    assert not (root / "fourth.partial").exists() and (root / "latest_universal").read_text() == "someone_elses"


def test_rotation_removes_half_written_universal_copies(tmp_path):
    for step in (5, 10, 15):
        _fake_checkpoint(tmp_path / f"step{step:08d}", 2, partitioned=True)
    for name in ("step00000005_universal.partial", "step00000003_universal.partial", "step00000015_universal.partial"):
        (tmp_path / name).mkdir()
    assert rotate(str(tmp_path), 2, True) == ["step00000005"]
    # the doomed tag's and the orphan's go; the one of a kept tag may be a conversion under way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000010", "step00000015",
                                                          "step00000015_universal.partial"]


def test_mdt_universal_reports_bad_input_in_one_line(tmp_path, capsys):
    def error(argv) -> str:
        assert universal_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("mdt-universal: error: ") and err.count("\n") == 1, err
        return err

    assert "no such checkpoint directory" in error([str(tmp_path / "missing")])
    ckpt = _fake_checkpoint(tmp_path / "run" / "step00000005", 2, partitioned=True)
    assert f"pass one, e.g. {ckpt}" in error([str(ckpt.parent)])
    (tmp_path / "run" / "step00000005" / COMPLETE).unlink()
    assert "not a complete checkpoint (no COMPLETE file)" in error([str(ckpt)])
    (ckpt / COMPLETE).write_text("")
    (ckpt / STATE_FILE).unlink()
    assert "not a checkpoint of this trainer (no trainer_state.json)" in error([str(ckpt)])
    (ckpt / STATE_FILE).write_text(json.dumps({"world_size": 2}))
    assert "lacks step, images_seen, model_name" in error([str(ckpt)])  # not a record
    write_record(str(ckpt), fake_record(world_size=2))
    assert "DeepSpeed could not convert" in error([str(ckpt)])  # the shards are not DeepSpeed's
    assert not list(ckpt.parent.glob("*universal*"))  # nothing half-written left behind
    zero0 = _fake_checkpoint(tmp_path / "z0", 2, partitioned=False)
    assert "no conversion needed" in error([str(zero0)])
    (tmp_path / "taken").mkdir()
    assert "already exists" in error([str(ckpt), "--out", str(tmp_path / "taken")])
    with pytest.raises(SystemExit) as usage:  # a usage error, as argparse reports them
        universal_main([str(ckpt), "--workers", "0"])
    assert usage.value.code == 2 and capsys.readouterr().err == "mdt-universal: error: --workers must be >= 1, got 0\n"


def test_data_position_for_a_new_world_size():
    saved = [dict(samples_seen=160, epoch=2, batches_in_epoch=10, skipped=1),
             dict(samples_seen=160, epoch=2, batches_in_epoch=10, skipped=3)]
    # 2 ranks x 10 batches x 8 = 160 samples of epoch 2 -> 1 rank: 20 batches of 8, or 10 of 16
    assert rescale_data_state(saved, 8, 0, 1, 8, 224) == dict(samples_seen=320, epoch=2, batches_in_epoch=20, skipped=1)
    assert rescale_data_state(saved, 8, 0, 1, 16, 112)["batches_in_epoch"] == 10
    # 4 ranks: 160 // 32 = 5 batches; new ranks start with no skipped samples
    assert rescale_data_state(saved, 8, 3, 4, 8, 56) == dict(samples_seen=80, epoch=2, batches_in_epoch=5, skipped=0)
    # rounded down to whole batches; an epoch already used up moves to the next one
    assert rescale_data_state(saved, 8, 0, 3, 8, 74)["batches_in_epoch"] == 6
    assert rescale_data_state(saved, 8, 0, 4, 8, 5)["epoch"] == 3
