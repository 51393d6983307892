"""mdt-data encode/inspect/verify: round trips through a tiny VAE, parallel parts, crash + resume."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_tools.cli import main
from data_tools.encode import EncodeSettings, encode_part
from data_tools.encode_journal import JOURNAL_DIR
from data_tools.format import MANIFEST_NAME, FastArrayDecoder
from data_tools.manifest import Manifest, sha256_file
from data_tools.sources import center_crop_resize, open_source
from data_tools.tar_reader import iter_tar_samples
from data_tools.testing import make_image_folder, make_image_tars, make_tiny_vae
from trainer.training.data import build_latent_loader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return make_tiny_vae(str(tmp_path_factory.mktemp("vae") / "tiny-vae"))


def _settings(out, **kw):
    base = dict(source="digits", out=str(out), resolution=16, encoder="pixels", shard_size=20,
                batch_size=8, loader_workers=0, limit=60, progress=False, hflip=True)
    base.update(kw)
    return EncodeSettings(**base)


def _latents(out):
    """{key: (latent, flipped, label)} read back from every shard of a dataset."""
    man = Manifest.load(os.path.join(out, MANIFEST_NAME))
    decode, result = FastArrayDecoder(man.spec), {}
    for shard in man.shards:
        with open(os.path.join(out, shard.name), "rb") as f:
            for key, fields in iter_tar_samples(f):
                result[key] = (decode(fields["latent.npy"]), decode(fields["latent_flip.npy"]),
                               int(fields["cls"]))
    return man, result


def _shard_hashes(out):
    return {n: sha256_file(os.path.join(out, n)) for n in sorted(os.listdir(out)) if n.endswith(".tar")}


def test_digits_round_trip_through_tiny_vae(tmp_path, tiny_vae):
    from diffusers import AutoencoderKL

    out = tmp_path / "digits"
    assert encode_part(_settings(out, encoder="vae", vae=tiny_vae, limit=48)) == 48
    man, stored = _latents(out)
    assert man.num_samples == 48 and [s.samples for s in man.shards] == [20, 20, 8]
    assert man.latent["shape"] == [4, 8, 8] and man.latent["moments"] == ["mean", "std"]
    assert man.scaling_factor == pytest.approx(0.18215) and man.encoder["id"] == tiny_vae
    source = open_source("digits", 48)
    vae = AutoencoderKL.from_pretrained(tiny_vae)
    for index in (0, 17, 47):
        image, label, _ = source.load(index)
        x = torch.from_numpy(center_crop_resize(image, 16)).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            post = vae.encode(torch.cat([x, x.flip(3)])).latent_dist
        latent, flipped, stored_label = stored[f"s{index:09d}"]
        assert stored_label == label
        np.testing.assert_allclose(latent[0], post.mean[0].numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(latent[1], post.std[0].numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(flipped[0], post.mean[1].numpy(), atol=2e-3, rtol=2e-3)
    # The stream gives scale * mean when posterior sampling and flips are off.
    loader = build_latent_loader(str(out), 8, num_workers=0, resampled=False, hflip=False,
                                 sample_posterior=False, shuffle_buffer=0, return_keys=True)
    for batch in loader:
        z, y, keys = batch.latents, batch.labels, batch.keys
        assert z.shape == (len(keys), 4, 8, 8) and z.dtype == torch.float32 and y.dtype == torch.long
        for j, key in enumerate(keys):
            want = stored[key][0][0].astype(np.float32) * man.scaling_factor
            np.testing.assert_allclose(z[j].numpy(), want, rtol=1e-6)
            assert int(y[j]) == stored[key][2]


def test_image_folder_round_trip_with_workers(tmp_path, tiny_vae):
    root = make_image_folder(str(tmp_path / "images"), classes=3, per_class=4)
    out = tmp_path / "latents"
    encode_part(_settings(out, source=f"folder:{root}", encoder="vae", vae=tiny_vae, limit=None,
                          shard_size=3, batch_size=5, loader_workers=2, hflip=None))
    man = Manifest.load(os.path.join(out, MANIFEST_NAME))
    assert man.has_flip and man.latent["fields"] == ["latent.npy", "latent_flip.npy"]  # the default for photos
    assert man.num_samples == 12 and len(man.shards) == 4 and man.num_classes == 3
    assert man.source["class_names"] == ["class_0", "class_1", "class_2"]
    loader = build_latent_loader(str(out), 4, num_workers=2, seed=3, return_keys=True, return_draws=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 3 and loader.skipped == 0
    _, stored = _latents(out)
    scale = np.float32(man.scaling_factor)
    for batch in batches:
        z, y, keys, draws = batch.latents, batch.labels, batch.keys, batch.draws
        assert z.shape == draws.eps.shape == (4, 4, 8, 8) and z.dtype == torch.float32
        for j, key in enumerate(keys):
            latent, flipped, label = stored[key]
            mean, std = (flipped if draws.flip[j] else latent).astype(np.float32)
            # Bit for bit: the loader's float32 operations in the same order.
            assert np.array_equal(z[j].numpy(), (mean + std * draws.eps[j].numpy()) * scale), key
            assert int(y[j]) == label
    assert main(["verify", str(out), "--quiet"]) == 0


def test_digits_store_no_mirrored_copy_unless_asked(tmp_path):
    # A mirrored 2 or 7 is no digit: the default follows the source's mirror_safe; --hflip overrides.
    assert main(["encode", "--source", "digits", "--out", str(tmp_path / "d"), "--resolution", "8",
                 "--encoder", "pixels", "--limit", "20", "--quiet", "--loader-workers", "0"]) == 0
    man = Manifest.load(os.path.join(tmp_path / "d", MANIFEST_NAME))
    assert not man.has_flip and man.latent["fields"] == ["latent.npy"] and man.settings["hflip"] is False
    with open(os.path.join(tmp_path / "d", man.shards[0].name), "rb") as f:
        assert all("latent_flip.npy" not in fields for _, fields in iter_tar_samples(f))
    assert main(["encode", "--source", "digits", "--out", str(tmp_path / "f"), "--resolution", "8",
                 "--encoder", "pixels", "--limit", "20", "--quiet", "--loader-workers", "0", "--hflip"]) == 0
    assert Manifest.load(os.path.join(tmp_path / "f", MANIFEST_NAME)).has_flip


def test_tar_source_matches_folder_source(tmp_path):
    folder = make_image_folder(str(tmp_path / "folder"), classes=2, per_class=3, seed=1)
    pattern = make_image_tars(str(tmp_path / "tars"), classes=2, per_class=3, per_tar=4, seed=1)
    encode_part(_settings(tmp_path / "a", source=f"folder:{folder}", limit=None))
    encode_part(_settings(tmp_path / "b", source=f"tars:{pattern}", limit=None))
    (_, a), (man_b, b) = _latents(tmp_path / "a"), _latents(tmp_path / "b")
    assert man_b.num_classes == 2 and sorted(a) == sorted(b) and len(a) == 6
    for key in a:
        assert np.array_equal(a[key][0], b[key][0]) and a[key][2] == b[key][2]


def test_parts_write_manifest_last_and_pool_gives_same_shards(tmp_path, monkeypatch, capsys):
    out = tmp_path / "parts"
    # torchrun / deepspeed launcher style: RANK and WORLD_SIZE pick the slice.
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["encode", "--source", "digits", "--encoder", "pixels", "--resolution", "16", "--limit", "60",
            "--shard-size", "20", "--batch-size", "8", "--loader-workers", "0", "--quiet", "--out"]
    monkeypatch.setenv("RANK", "1")
    assert main(args + [str(out)]) == 0
    assert not (out / MANIFEST_NAME).exists()
    monkeypatch.setenv("RANK", "0")
    assert main(args + [str(out)]) == 0
    man = Manifest.load(str(out / MANIFEST_NAME))
    assert man.num_samples == 60 and [s.name[-15:-11] for s in man.shards] == ["0000", "0000", "0001", "0001"]
    # A local pool of 2 processes makes the same parts, hence the same bytes.
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    pool = tmp_path / "pool"
    assert main(args + [str(pool), "--procs", "2"]) == 0
    assert _shard_hashes(pool) == _shard_hashes(out)
    assert Manifest.load(str(pool / MANIFEST_NAME)).to_json() == man.to_json()


_KILLER = """
import json, os, signal, sys
from data_tools import vae
from data_tools.encode import EncodeSettings, encode_part
import torch
torch.set_num_threads(int(sys.argv[3]))  # CPU conv results may depend on the thread count
original, calls = vae.VaeEncoder.encode, [0]
def encode(self, images):
    calls[0] += 1
    if calls[0] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, images)
vae.VaeEncoder.encode = encode
encode_part(EncodeSettings(**json.loads(sys.argv[1])))
"""


def test_killed_encoder_rerun_produces_same_shards(tmp_path, tiny_vae):
    kw = dict(encoder="vae", vae=tiny_vae, limit=60)
    reference = tmp_path / "reference"
    encode_part(_settings(reference, **kw))
    crashed = tmp_path / "crashed"
    settings = json.dumps(vars(_settings(crashed, **kw)))
    # Two encode calls per batch (image + flip): call 9 is the 5th batch, mid-way into shard 1.
    proc = subprocess.run([sys.executable, "-c", _KILLER, settings, "9", str(torch.get_num_threads())], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (crashed / MANIFEST_NAME).exists()
    assert sorted(os.listdir(crashed / JOURNAL_DIR)) == ["latents-p0000-000000.json"]
    encode_part(_settings(crashed, **kw))
    assert _shard_hashes(crashed) == _shard_hashes(reference) and len(_shard_hashes(reference)) == 3
    assert (crashed / MANIFEST_NAME).read_text() == (reference / MANIFEST_NAME).read_text()


def test_rerun_replaces_a_damaged_complete_shard(tmp_path):
    out = tmp_path / "d"
    encode_part(_settings(out))
    before = _shard_hashes(out)
    path = out / "latents-p0000-000001.tar"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    encode_part(_settings(out))
    assert _shard_hashes(out) == before


def test_verify_names_bad_shards_and_exits_nonzero(tmp_path, capsys):
    out = tmp_path / "v"
    encode_part(_settings(out))
    assert main(["--local_rank=0", "verify", str(out)]) == 0  # as the deepspeed launcher calls it
    flipped = out / "latents-p0000-000001.tar"
    data = bytearray(flipped.read_bytes())
    data[1700] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = out / "latents-p0000-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[:3000])
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "000001.tar: sha256 mismatch" in lines[0]
    assert "000002.tar" in lines[1] and "size" in lines[1]


def test_inspect_prints_summary_and_channel_stats(tmp_path, capsys, tiny_vae):
    out = tmp_path / "i"
    encode_part(_settings(out, encoder="vae", vae=tiny_vae))
    # 25 samples: all 20 of the first shard and 5 of the second, in manifest order.
    assert main(["inspect", str(out), "--samples", "25"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("60 in 3 shards" in line for line in lines)
    assert any("scaling factor 0.18215" in line for line in lines)
    assert any("over 25 samples, z = (mean + std * eps) * 0.18215:" in line for line in lines)
    man, stored = _latents(out)
    moments = np.stack([latent for latent, _, _ in list(stored.values())[:25]]).astype(np.float64)
    # inspect draws its noise from default_rng(0), one standard normal per latent value.
    eps = np.random.default_rng(0).standard_normal((25, 4, 8, 8), dtype=np.float32)

    def stats(z):
        per_channel = z.transpose(1, 0, 2, 3).reshape(4, -1)
        return np.stack([per_channel.mean(1), per_channel.std(1)], axis=1)

    want = stats((moments[:, 0] + moments[:, 1] * eps) * man.scaling_factor)
    # The comparison below can tell a dropped std or scale apart (printed to 4 decimals).
    assert np.abs(stats(moments[:, 0] * man.scaling_factor) - want).max() > 1e-3
    assert np.abs(stats(moments[:, 0] + moments[:, 1] * eps) - want).max() > 1e-3
    head = lines.index("  channel      mean       std")
    printed = np.array([[float(v) for v in line.split()] for line in lines[head + 1:head + 5]])
    assert printed[:, 0].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(printed[:, 1:], want, rtol=0, atol=5.1e-5)
    overall = float(lines[head + 5].split()[2])
    assert overall == pytest.approx(np.sqrt((want[:, 1] ** 2).mean()), abs=5.1e-5)


@pytest.mark.parametrize("argv, culprit", [
    (["encode", "--source", "nowhere", "--out", "{tmp}"], "nowhere"),
    (["encode", "--source", "digits", "--out", "{tmp}", "--vae", "/no/such/sd-vae"], "--vae"),
    (["encode", "--source", "digits", "--out", "{tmp}", "--shard-size", "0"], "--shard-size"),
    (["encode", "--source", "folder:/no/such/dir", "--out", "{tmp}"], "/no/such/dir"),
    (["verify", "{tmp}"], "manifest.json"),
])
def test_cli_user_errors_are_one_line(tmp_path, capsys, argv, culprit):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and culprit in err and err.startswith("mdt-data: error:")


def test_bad_image_stops_with_its_name_or_is_left_out(tmp_path, capsys):
    root = make_image_folder(str(tmp_path / "images"), classes=2, per_class=3)
    (tmp_path / "images" / "class_1" / "img_001.png").write_bytes(b"not a png")
    args = ["encode", "--source", f"folder:{root}", "--encoder", "pixels", "--resolution", "8",
            "--loader-workers", "0", "--quiet", "--out"]
    assert main(args + [str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "image 4" in err and "--skip-bad-images" in err
    # --shard-bytes caps the payload per shard: 5 samples of ~1.2 kB each -> 3 shards.
    assert main(args + [str(tmp_path / "b"), "--skip-bad-images", "--shard-bytes", "2000"]) == 0
    man = Manifest.load(str(tmp_path / "b" / MANIFEST_NAME))
    assert man.num_samples == 5 and [s.samples for s in man.shards] == [2, 2, 1]
    assert "s000000004" not in _latents(tmp_path / "b")[1]


def test_uncached_hub_vae_without_a_route_fails_at_once(tmp_path, monkeypatch):
    import socket

    from data_tools.format import DataToolsError
    from data_tools.vae import load_autoencoder

    with socket.socket() as s:  # a local port nobody listens on stands in for an unreachable hub
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DataToolsError, match=rf"VAE someone/some-vae is not in the local .* hub is unreachable "
                                             rf"\(127.0.0.1:{port} accepted no connection"):
        load_autoencoder("someone/some-vae")
    from data_tools.vae import hub_unreachable

    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    assert hub_unreachable() is None  # behind a proxy the hub client decides
