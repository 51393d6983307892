"""Evaluation inside the run: a 2-rank run evaluates every few steps and at its end (metrics.jsonl,
TensorBoard), the same checkpoint gives the same numbers twice and on 1 or 2 ranks, FID from
cached reference statistics equals FID from recomputed ones, a time budget ends a run early with
its final evaluation, and sample grids of VAE data are decoded images."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.checkpoints import find_resume, read_record
from trainer.distributed import DistInfo
from trainer.training.evaluator import keep_records_through
from trainer.training.stop import RunStopped

from launcher import ROOT, free_port, losses, run, runs_in, tiny_config, train_each_command, write_config

pytestmark = pytest.mark.timeout(900)

EVAL = {"every": 6, "metrics": ["val_loss", "digits"], "guidance_scales": [1.0, 2.0], "num_images": 20,
        "batch_size": 8, "steps": 4, "val_samples": 24, "val_sigmas": [0.1, 1.0, 5.0]}


def eval_command(checkpoint: Path, out: Path, ranks: int, *overrides: str) -> list:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
            str(free_port()), "--module", "eval_on_ranks", str(checkpoint), str(out), *overrides]


@pytest.fixture(scope="module")
def launched(digits8, tmp_path_factory):
    """Two 2-rank runs, one after the other in the ranks of one launch: "eval_run", 12 steps with an
    evaluation every 6 (and so at the end), 3 of the 18 shards held out; "budget", a time budget
    that ends it early. Name -> (its directory, rank 0's output of it)."""
    tmp = tmp_path_factory.mktemp("launched")
    eval_run = tiny_config(digits8, str(tmp / "eval_run" / "runs"), run={"total_steps": 12}, eval=EVAL, data={
        "shards": digits8, "batch_size": 16, "micro_batch_size": 8, "num_workers": 1, "shuffle_buffer": 50,
        "val_fraction": 0.15}, monitor={"log_every": 3, "peak_tflops": 1.0, "sample_count": 4, "sample_steps": 2})
    budget = tiny_config(digits8, str(tmp / "budget" / "runs"), run={"total_steps": 100000, "time_limit_s": 3},
                         eval={**EVAL, "every": 100000, "metrics": ["digits"], "guidance_scales": [1.0]},
                         monitor={"log_every": 50, "peak_tflops": 1.0, "sample_count": 4, "sample_steps": 2})
    names = ("eval_run", "budget")
    configs = [write_config(cfg, tmp / f"{name}.yaml") for name, cfg in zip(names, (eval_run, budget))]
    proc = run(train_each_command(configs, free_port()), tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: (tmp / name, out) for name, out in zip(names, runs_in(proc.stdout))}


@pytest.fixture(scope="module")
def eval_run(launched):
    return launched["eval_run"]


def test_a_run_evaluates_on_schedule_and_records_compute(eval_run):
    tmp, stdout = eval_run
    run_dir = tmp / "runs" / "t"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [6, 12] and [r["final"] for r in records] == [False, True]
    names = {"val_loss", "val_loss/sigma=0.1", "val_loss/sigma=1", "val_loss/sigma=5", "digits_fd", "digits_acc",
             "digits_fd@g2", "digits_acc@g2"}
    for r in records:
        assert set(r["metrics"]) == names and all(math.isfinite(v) for v in r["metrics"].values())
        assert r["metrics"]["val_loss"] == pytest.approx(np.mean([r["metrics"][f"val_loss/sigma={s}"]
                                                                  for s in ("0.1", "1", "5")]))
        assert 0 <= r["metrics"]["digits_acc"] <= 1 and r["images_seen"] == 16 * r["step"]
        assert r["accelerator_hours"] == pytest.approx(r["train_seconds"] * 2 / 3600)
        assert r["eval_seconds"] > 0
    # training compute only grows; the FLOPs of 6 masked steps of 16 images each (the counter's own)
    assert 0 < records[0]["train_flops"] < records[1]["train_flops"] == pytest.approx(2 * records[0]["train_flops"])
    assert 0 < records[0]["train_seconds"] < records[1]["train_seconds"]
    # the record in the final checkpoint carries the same counters
    final = read_record(find_resume(str(run_dir / "checkpoints"), "auto"))
    assert (final.step, final.state.train_flops, final.state.train_seconds) == (12, records[1]["train_flops"],
                                                                                 records[1]["train_seconds"])
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/val_loss")] == [6, 12]
    assert {"eval/digits_fd@g2", "eval/seconds", "eval/time_share"} <= set(events.Tags()["scalars"])
    assert "eval step 12: val_loss" in stdout and sorted(losses(stdout)) == [3, 6, 9, 12]


def test_the_same_checkpoint_evaluates_the_same_twice_and_on_one_or_two_ranks(eval_run):
    from eval_on_ranks import evaluate

    tmp, _ = eval_run
    ckpt = Path(find_resume(str(tmp / "runs" / "t" / "checkpoints"), "auto"))
    # one rank: twice in this process (no launch), the global RNG left in different states
    one = DistInfo(0, 1, 0, torch.device("cpu"))
    results = [evaluate(str(ckpt), [f"run.output_dir={tmp / name}"], one, rng_seed=seed)
               for name, seed in (("a", 12345), ("b", 54321))]
    out = tmp / "c.json"
    proc = run(eval_command(ckpt, out, 2, f"run.output_dir={tmp / 'c'}"), ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results.append(json.loads(out.read_text()))
    assert results[0] == results[1] == results[2]  # exactly: the work is dealt in whole batches
    # and the run's own final evaluation of that checkpoint (2 ranks, inside training) agrees
    records = [json.loads(line) for line in (tmp / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["metrics"] == results[0]


def test_fid_from_cached_reference_statistics_equals_recomputed(digits8, tmp_path):
    """In-process on one rank, with a random Inception (the real weights are not on this machine)."""
    import shutil

    from test_evaluate import reference_state_dict

    from model_zoo.registry import build_model
    from trainer.checkpoints import RunState
    from trainer.config import load_config
    from trainer.distributed import DistInfo
    from trainer.training.data import build_latent_loader
    from trainer.training.ema import EMA
    from trainer.training.evaluator import build_evaluator
    from trainer.training.monitor import Monitor

    torch.save(reference_state_dict(), tmp_path / "inception.pth")
    data = tmp_path / "data"
    shutil.copytree(digits8, data)
    cfg = load_config(None, [f"data.shards={data}", f"run.output_dir={tmp_path / 'runs'}", "eval.every=1",
                             "eval.metrics=[fid]", "eval.num_images=6", "eval.batch_size=3", "eval.steps=2",
                             f"eval.inception={tmp_path / 'inception.pth'}", "eval.fid_reference_images=6",
                             "monitor.tensorboard=false"])
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    net = build_model("MaskDiT-S/2", input_size=8, in_channels=3, num_classes=10, hidden_size=32, depth=2,
                      num_heads=2, decoder_depth=1, decoder_hidden_size=16, decoder_num_heads=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ema = EMA(net, cfg.ema, 16)
    loader = build_latent_loader(str(data), 8, 0, 1, num_workers=0)
    monitor = Monitor(cfg.monitor, cfg.run.run_dir(), 0, 10, info.device, 1.0)

    def fid() -> float:
        return build_evaluator(cfg, info, ema, loader, monitor, 0).run(RunState(step=1), "masked", False)["fid"]

    first = fid()  # computes the reference statistics and caches them beside the manifest
    cached = sorted(data.glob("fid_stats_n6_*.npz"))
    assert len(cached) == 1
    again = fid()  # from the cache
    with np.load(cached[0]) as stats:
        mu, sigma = stats["mu"].copy(), stats["sigma"].copy()
    cached[0].unlink()
    recomputed = fid()
    with np.load(sorted(data.glob("fid_stats_n6_*.npz"))[0]) as stats:
        assert np.array_equal(stats["mu"], mu) and np.array_equal(stats["sigma"], sigma)
    assert math.isfinite(first) and first > 0 and first == again == recomputed


def test_a_time_budget_ends_the_run_with_its_final_evaluation(launched):
    tmp, stdout = launched["budget"]
    run_dir = tmp / "runs" / "t"
    record = read_record(find_resume(str(run_dir / "checkpoints"), "auto"))
    assert 0 < record.step < 100000 and record.state.train_seconds >= 3
    assert f"run.time_limit_s=3 reached after {record.step} steps" in stdout
    (last,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert last["final"] and last["step"] == record.step and set(last["metrics"]) == {"digits_fd", "digits_acc"}


def test_sample_grids_of_vae_latents_are_decoded_images(vae_digits8, tmp_path):
    from model_zoo.registry import build_model
    from trainer.config import load_config
    from trainer.sample.preview import decode_latents
    from trainer.training.data import build_latent_loader
    from trainer.training.ema import EMA
    from trainer.training.monitor import Monitor
    from trainer.training.previews import SampleGrids

    loader = build_latent_loader(vae_digits8, 8, 0, 1, num_workers=0)
    man = loader.manifest
    assert man.encoder["kind"] == "vae" and list(man.spec.shape) == [4, 8, 8]
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "monitor.sample_count=4", "monitor.sample_steps=2",
                             "monitor.tensorboard=false"])
    net = build_model("DiT-S/2", input_size=8, in_channels=4, num_classes=10, hidden_size=32, depth=2, num_heads=2)
    monitor = Monitor(cfg.monitor, str(tmp_path), 0, 10, torch.device("cpu"), 1.0)
    grids = SampleGrids(cfg, EMA(net, cfg.ema, 8), man, man.spec.shape, torch.device("cpu"), monitor)
    from PIL import Image

    path = grids.make(1)
    image = np.asarray(Image.open(path))
    # 4 images of 16x16 pixels (the VAE upsamples 8x8 latents twice) in a 2x2 grid with 1-pixel gaps
    assert image.shape == (2 * 17 + 1, 2 * 17 + 1, 3)
    raw = decode_latents(torch.randn(4, 4, 8, 8), man.scaling_factor, man.encoder)  # no VAE: latent channels
    assert raw.shape[-1] == 8  # what a grid of raw latents would have been


def test_resume_keeps_the_records_through_its_step_and_drops_a_cut_line(tmp_path):
    # a crash while appending leaves half a line: resuming at step 10 must not trip over it
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "metrics": {"val_loss": 0.5}}\n{"step": 10, "metrics": {"val_loss": 0.4}}\n'
                    '{"step": 15, "metrics": {"val_loss": 0.3}}\n{"step": 20, "metr')
    keep_records_through(str(path), 10)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [5, 10]
    keep_records_through(str(tmp_path / "absent.jsonl"), 10)  # no file yet: nothing to do
    path.write_text('{"step": 5}\nnot json\n{"step": 10}\n')
    with pytest.raises(RunStopped, match=f"{path}:2: not an evaluation record"):
        keep_records_through(str(path), 10)
