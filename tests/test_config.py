"""Launch configs: every shipped YAML parses, bad input names the key, DeepSpeed JSON generation."""

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import main
from trainer.cli.train import dry_run
from trainer.config import ConfigError, TrainConfig, load_config, to_deepspeed_json, validate
from trainer.training.data import check_shards
from trainer.training.engine import deepspeed_config

CONFIGS = sorted((Path(__file__).parents[1] / "launch_configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.name for p in CONFIGS}
    assert {"digits_demo.yaml", "maskdit_xl2_256.yaml", "maskdit_xl2_512.yaml", "dit_xl2_256_baseline.yaml",
            "maskdit_skip_b2_256.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_validates(path):
    cfg = load_config(str(path))
    world = 2 if path.name == "digits_demo.yaml" else 8
    validate(cfg, world)
    text = dry_run(cfg, world)
    assert "# phase plan" in text and '"zero_optimization"' in text


def test_defaults_are_valid():
    validate(TrainConfig(), 1)


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=5e-5", "model.options={depth: 3}", "phases.end_mask_ratio=0.25",
                             "deepspeed.extra={zero_optimization: {reduce_bucket_size: 1000}}"])
    assert cfg.optim.lr == 5e-5 and cfg.model.options == {"depth": 3} and cfg.phases.end_mask_ratio == 0.25
    assert to_deepspeed_json(cfg, 1, "cuda")["zero_optimization"] == {
        "stage": 2, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 1000}


def test_engine_defaults_follow_the_device(monkeypatch):
    # On CPU a contiguous gradient buffer is one more copy of every gradient (+8% step time measured
    # in benchmarks/bench_zero.py overhead); on GPUs it prevents fragmentation. Explicit values win.
    cfg = load_config(None, ["optim.torch_adam=true"])
    assert to_deepspeed_json(cfg, 1, "cpu")["zero_optimization"]["contiguous_gradients"] is False
    assert to_deepspeed_json(cfg, 1, "cuda")["zero_optimization"]["contiguous_gradients"] is True
    import trainer.training.engine

    for device, contiguous in (("cpu", False), ("cuda", True)):  # the training run passes DeepSpeed's accelerator
        monkeypatch.setattr(trainer.training.engine, "accelerator_name", lambda d=device: d)
        assert deepspeed_config(cfg, 1)["zero_optimization"]["contiguous_gradients"] is contiguous
    cfg = load_config(None, ["optim.torch_adam=true", "deepspeed.contiguous_gradients=true"])
    assert to_deepspeed_json(cfg, 1, "cpu")["zero_optimization"]["contiguous_gradients"] is True
    assert to_deepspeed_json(cfg, 1, "cpu")["optimizer"]["params"]["fused"] is True
    assert "fused" not in to_deepspeed_json(load_config(None, []), 1, "cpu")["optimizer"]["params"]


@pytest.mark.parametrize("overrides,match", [
    (["optim.lrr=1"], r"unknown key 'optim.lrr'; valid keys in optim: lr, betas"),
    (["trainer.lr=1"], r"unknown key 'trainer'; valid keys: run, model"),
    (["optim.lr=fast"], r"optim.lr: expected a number, got 'fast'"),
    (["run.total_steps=1.5"], r"run.total_steps: expected an integer"),
    (["model.skip=3"], r"model.skip: expected true or false"),
    (["optim.betas=[0.9]"], r"optim.betas: expected a list of 2 numbers"),
    (["optim"], r"must look like section.key=value"),
])
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides,world,match", [
    (["data.batch_size=100", "data.micro_batch_size=32"], 2, r"data.batch_size 100 is not divisible"),
    (["phases.mask_ratio=1.0"], 1, r"phases.mask_ratio must be in \[0, 1\)"),
    (["phases.mask_ratio=-0.1"], 1, r"phases.mask_ratio must be in \[0, 1\)"),
    (["model.name=DiT-XL/2"], 1, r"phases.mask_ratio must be 0 for DiT-XL/2"),
    (["model.name=MaskDiT-XXL/2"], 1, r"model.name: unknown model"),
    (["diffusion.weighting=minsnr"], 1, r"diffusion.weighting: 'minsnr' is not one of"),
    (["deepspeed.zero_stage=4"], 1, r"deepspeed.zero_stage must be 0-3"),
    (["phases.unmask_every=10", "phases.unmask_steps=10"], 1, r"phases.unmask_steps 10 must be <"),
    (["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"], 1, r"offload_optimizer needs"),
])
def test_semantic_errors_name_the_key(overrides, world, match):
    with pytest.raises(ConfigError, match=match):
        validate(load_config(None, overrides), world)


def test_missing_shards_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="data.shards is empty"):
        check_shards(TrainConfig().data)
    cfg = load_config(None, [f"data.shards={tmp_path}/nothing-{{000..009}}.tar"])
    with pytest.raises(ConfigError, match=r"data.shards: .*no manifest"):
        check_shards(cfg.data)


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "--config", str(CONFIGS[0]), "--set",
                           "optim.lrr=3"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown key 'optim.lrr'" in proc.stderr
    assert main(["--config", str(tmp_path / "absent.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1, 2")
    assert main(["--config", str(bad)]) == 2


def test_dry_run_prints_config_plan_and_deepspeed_json(capsys, digits8):
    assert main(["--config", str(CONFIGS[0]), "--set", f"data.shards={digits8}", f"data.val_shards={digits8}",
                 "optim.lr_schedule=linear", "optim.warmup_steps=10", "run.total_steps=111", "phases.unmask_every=0",
                 "phases.final_unmask_steps=10", "--world-size", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "final_unmask" in out and '"train_batch_size": 64' in out and "data: shards found" in out
    assert ("lr schedule: linear warm-up over the first 10 steps, then linear decay to x0 at the last step (x phase "
            "scale; factor at step 0: 0.1, 10: 1, 60: 0.5, 110: 0)") in out


@pytest.mark.parametrize("stage,precision,offload", [(0, "fp32", False), (1, "bf16", False), (2, "fp16", True),
                                                     (3, "bf16", True)])
def test_deepspeed_json(stage, precision, offload):
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                             f"deepspeed.offload_optimizer={str(offload).lower()}", "data.batch_size=256",
                             "data.micro_batch_size=16", "optim.grad_clip=0.5"])
    ds = to_deepspeed_json(cfg, 4, "cpu")
    assert ds["train_batch_size"] == 256 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["fp16"]["enabled"] == (precision == "fp16")
    assert ("offload_optimizer" in ds["zero_optimization"]) == offload
    assert ds["gradient_clipping"] == 0.5


def test_readme_config_reference_is_current():
    import importlib.util

    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("update_readme", root / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (root / "README.md").read_text()
    assert module.render(text) == text, "run: python scripts/update_readme.py"
    assert "`optim.lr`" in text and "`phases.final_unmask_steps`" in text
