"""Shared test fixtures."""

import os
from pathlib import Path

# Before numpy loads: OpenBLAS would start a thread per core, and they spin while they wait; beside
# other work on 2 cores a 2048-wide eigh (an FID) took 5x as long as on one thread. The ranks the
# tests launch inherit it (their torch threads are set apart, in launcher.env).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests share 2 cores with the ranks they launch: more threads oversubscribe them (OpenMP barriers
# then cost a scheduler slice per op, making tiny steps ~50x slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits8(tmp_path_factory) -> str:
    """scikit-learn's digits as 3x8x8 pixel 'latents' in 18 shards (made once per session)."""
    from data_tools.cli import main

    out = tmp_path_factory.mktemp("digits8")
    assert main(["encode", "--source", "digits", "--out", str(out), "--resolution", "8", "--encoder", "pixels",
                 "--shard-size", "100", "--quiet"]) == 0
    return str(out)


@pytest.fixture(scope="session")
def vae_digits8(tmp_path_factory) -> str:
    """scikit-learn's digits at 16x16 through a tiny random VAE: 4x8x8 posterior moments (mean, std)
    with mirrored copies, in 18 shards, so launched runs draw z = (mean + std * eps) * scale and
    flips as a real ImageNet run does (made once per session)."""
    from data_tools.cli import main
    from data_tools.testing import make_tiny_vae

    root = tmp_path_factory.mktemp("vae_digits8")
    vae = make_tiny_vae(str(root / "tiny-vae"))
    out = root / "latents"
    assert main(["encode", "--source", "digits", "--out", str(out), "--resolution", "16", "--encoder", "vae",
                 "--vae", vae, "--hflip", "--shard-size", "100", "--loader-workers", "0", "--quiet"]) == 0
    return str(out)


@pytest.fixture(scope="session")
def zero_stage_runs(digits8, tmp_path_factory) -> dict:
    """30 steps on 2 ranks at each ZeRO stage 0-3 (fp32, EMA decay ~0 so it tracks the live
    weights), one after another in the ranks of one launch (made once per session; test_sample_cli
    samples one): stage -> its final checkpoint."""
    from trainer.checkpoints import COMPLETE

    from launcher import free_port, losses, run, runs_in, tiny_config, train_each_command, write_config

    tmp = tmp_path_factory.mktemp("zero_stages")
    configs = [write_config(tiny_config(digits8, str(tmp / f"stage{stage}"), deepspeed={"zero_stage": stage},
                                        run={"total_steps": 30}, ema={"decay": 1e-6, "warmup": False}),
                            tmp / f"stage{stage}.yaml") for stage in range(4)]
    port = free_port()
    proc = run(train_each_command(configs, port), tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU shm all-reduce op stays out: it leaked one /dev/shm segment per rank per run
    assert "deepspeed_shm_comm" not in proc.stdout + proc.stderr
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    outputs = runs_in(proc.stdout)
    assert len(outputs) == 4, proc.stdout[-3000:]
    checkpoints = {}
    for stage, output in enumerate(outputs):
        logged = losses(output)
        assert sorted(logged) == [5, 10, 15, 20, 25, 30], (stage, logged)
        assert logged[30] < 0.8 * logged[5], (stage, logged)
        checkpoints[stage] = tmp / f"stage{stage}" / "t" / "checkpoints" / "step00000030"
        assert (checkpoints[stage] / COMPLETE).exists()
    return checkpoints


@pytest.fixture(scope="session")
def features8(tmp_path_factory):
    """The digits as 3x8x8 pixels with a tiny random teacher's features on the 4x4 token grid."""
    from data_tools.cli import main
    from data_tools.testing import make_tiny_teacher

    root = tmp_path_factory.mktemp("features8")
    teacher = make_tiny_teacher(str(root / "teacher"), image_size=8, width=12)
    out = root / "shards"
    assert main(["encode", "--source", "digits", "--out", str(out), "--resolution", "8", "--encoder", "pixels",
                 "--shard-size", "100", "--features", teacher, "--loader-workers", "0", "--quiet"]) == 0
    return str(out)
