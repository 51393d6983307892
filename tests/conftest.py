"""Shared test fixtures."""


import pytest
import torch

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
