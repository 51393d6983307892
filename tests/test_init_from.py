"""model.init_from: a run starts from existing weights. The plan (which tensors the source covers)
in one line and before launch; init_strict refuses a partial source; on 2 ranks at ZeRO-2 and
ZeRO-3 the built network and its EMA hold the source's tensors exactly, and the rest keep their
fresh initialisation (tests/init_on_ranks.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_zoo.registry import build_model
from trainer.checkpoints import COMPLETE, CheckpointRecord, RunState, make_tag, read_network, write_export, write_record
from trainer.cli import main as train_main
from trainer.config import ConfigError, config_from_dict
from trainer.training.init_from import check_init_from, check_init_from_config, plan_init

from launcher import free_port, run, tiny_config, write_config

pytestmark = pytest.mark.timeout(600)

HERE = Path(__file__).parent
TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2}


def tiny_dit_export(path: Path) -> Path:
    """A DiT the size of the tiny MaskDiT's encoder (3x8x8 latents, 10 classes), random weights
    (nothing zero, so a tensor left fresh cannot pass for a loaded one)."""
    kwargs = dict(input_size=8, in_channels=3, num_classes=10, **TINY)
    net = build_model("DiT-S/2", **kwargs)
    g = torch.Generator().manual_seed(7)
    sd = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}
    write_export(str(path), sd, "DiT-S/2", kwargs, {"preconditioning": "edm"},
                 {"latent_shape": [3, 8, 8], "num_classes": 10})
    return path


def test_the_plan_names_what_the_source_lacks_and_what_differs(tmp_path):
    source = read_network(str(tiny_dit_export(tmp_path / "dit.safetensors")))
    cfg = config_from_dict({"data": {"shards": "unused"}, "model": {
        "name": "MaskDiT-S/2", "skip": True, "init_from": str(tmp_path / "dit.safetensors"),
        "options": {**TINY, "decoder_depth": 1, "decoder_hidden_size": 16, "decoder_num_heads": 2}}})
    kwargs = cfg.model_kwargs((3, 8, 8), 10)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(cfg.model.name, **kwargs).state_dict().items()}
    plan = plan_init(shapes, source)
    # the encoder comes from the DiT: embedders and every block
    assert {"x_embedder.proj.weight", "y_embedder.embedding_table.weight", "blocks.blocks.1.attn.qkv.weight"} \
        <= set(plan.loaded)
    assert not any(k.startswith(("decoder", "final_layer", "blocks.fusions")) for k in plan.loaded)
    # skip branches, the mask token and the decoder are new; DiT's final layer has another shape
    assert {"blocks.fusions.0.linear.weight", "mask_token", "decoder_embed.weight"} <= set(plan.fresh)
    assert plan.reshaped["final_layer.linear.weight"] == ((24, 32), (12, 16))
    assert plan.unused == []
    line = plan.line()
    assert line.startswith(f"model.init_from: {len(plan.loaded)} of {len(shapes)} tensors from ")
    assert "mask_token, blocks.fusions.*, decoder_embed, decoder.blocks.* (17 tensors)" in line
    assert "final_layer.linear.weight [24, 32] vs ours [12, 16]" in line
    with pytest.raises(Exception, match=r"model\.init_strict: the source must cover the model exactly"):
        check_init_from(config_from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "init_strict": True}}),
                        kwargs)
    # the same DiT for a DiT: exact
    exact = check_init_from(config_from_dict({"data": {"shards": "unused"}, "model": {
        "name": "DiT-S/2", "options": TINY, "init_from": str(tmp_path / "dit.safetensors"), "init_strict": True}}),
        dict(input_size=8, in_channels=3, num_classes=10, skip=False, **TINY))
    assert exact.exact and not exact.fresh and not exact.notes
    vp = check_init_from(config_from_dict({"data": {"shards": "unused"}, "diffusion": {"preconditioning": "vp_eps"},
                                           "model": {"name": "DiT-S/2", "options": TINY,
                                                     "init_from": str(tmp_path / "dit.safetensors")}}),
                         dict(input_size=8, in_channels=3, num_classes=10, skip=False, **TINY))
    assert vp.line().endswith("note: the source was trained with diffusion.preconditioning edm, this run uses vp_eps "
                              "(its outputs mean something else until retrained)")


def test_bad_init_from_is_one_line_before_launch(digits8, tmp_path, capsys):
    cfg = tiny_config(digits8, str(tmp_path / "r"), model={"init_from": str(tmp_path / "nope.pt")})
    assert train_main(["--config", str(write_config(cfg, tmp_path / "a.yaml"))]) == 2
    missing = tmp_path / "nope.pt"
    assert capsys.readouterr().err.strip() == f"mdt-train: error: model.init_from: {missing} does not exist"
    tiny_dit_export(tmp_path / "dit.safetensors")
    cfg["model"].update(init_from=str(tmp_path / "dit.safetensors"), init_strict=True)
    assert train_main(["--config", str(write_config(cfg, tmp_path / "b.yaml"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "initialised as usual (not in the source): mask_token, blocks.fusions.*" in err[0], err
    assert err[0].endswith("(model.init_strict: the source must cover the model exactly)")


def test_a_resuming_run_does_not_need_its_init_from_source(digits8, tmp_path):
    """Once the run has its own checkpoint, init_from is ignored: a source deleted since (or a
    strict plan) must not block the resume."""
    cfg = config_from_dict(tiny_config(digits8, str(tmp_path / "r"),
                                       model={"init_from": str(tmp_path / "gone.pt"), "init_strict": True}))
    with pytest.raises(ConfigError, match="gone.pt does not exist"):
        check_init_from_config(cfg, 2)
    path = Path(cfg.run.run_dir()) / "checkpoints" / make_tag(10)
    path.mkdir(parents=True)
    write_record(str(path), CheckpointRecord(state=RunState(step=10, images_seen=160), world_size=2, model_name="m",
                                             model_kwargs={}, config={}))
    (path / COMPLETE).write_text("")
    assert check_init_from_config(cfg, 2) is None


def test_weights_start_as_the_source_at_zero_2_and_zero_3(digits8, tmp_path):
    """A tiny MaskDiT with skip branches from a tiny DiT, at ZeRO-2 and ZeRO-3: on both ranks every
    tensor the DiT holds is the DiT's, in the network and in the EMA; the others are the run's own
    initialisation (the same as a run without init_from builds)."""
    source = load_file(tiny_dit_export(tmp_path / "dit.safetensors"))
    configs = []
    for stage in (2, 3):
        for init in (True, False):
            cfg = tiny_config(digits8, str(tmp_path / f"z{stage}{init}"), deepspeed={"zero_stage": stage,
                                                                                    "precision": "fp32"})
            if init:
                cfg["model"]["init_from"] = str(tmp_path / "dit.safetensors")
            configs.append(write_config(cfg, tmp_path / f"z{stage}{init}.yaml"))
    prefix = tmp_path / "w"
    proc = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
                "--module", "init_on_ranks", str(prefix), *map(str, configs)], HERE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("model.init_from: ") == 2, proc.stdout[-3000:]
    for index, stage in ((0, 2), (2, 3)):
        plain = load_file(f"{prefix}.{index + 1}.0.safetensors")
        for rank in (0, 1):
            got = load_file(f"{prefix}.{index}.{rank}.safetensors")
            loaded = 0
            for key, value in got.items():
                name = key.split(".", 1)[1]
                if name in source and source[name].shape == value.shape:
                    assert torch.equal(value, source[name]), (stage, rank, key)
                    loaded += 1
                else:
                    assert torch.equal(value, plain[key]), (stage, rank, key)  # fresh, as without init_from
            # 27 of the DiT's 31 tensors fit (all but its final layer's), in the network and the EMA
            assert loaded == 2 * 27, (stage, rank, loaded)
