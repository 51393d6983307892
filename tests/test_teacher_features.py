"""Teacher features in the shards (`mdt-data encode --features`): stored as the teacher computes
them, for the mirrored image too, reduced by a recorded PCA, streamed with the latents through
flips and resume, and a run that asks for alignment without them is refused before launch."""

import os

import numpy as np
import pytest
import torch

from data_tools.check import verify_dataset
from data_tools.cli import main as data_main
from data_tools.encode import EncodeSettings, encode_part
from data_tools.format import MANIFEST_NAME
from data_tools.manifest import Manifest
from data_tools.sources import center_crop_resize, open_source
from data_tools.teacher import Projection, Teacher, fit_projection
from data_tools.testing import make_tiny_teacher
from trainer.config import ConfigError, DataConfig
from trainer.training.data import build_latent_loader, check_shards


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_tiny_teacher(str(tmp_path_factory.mktemp("teacher") / "tiny-dinov2"))


def _encode(out, teacher, **kw):
    base = dict(source="digits", out=str(out), resolution=16, encoder="pixels", shard_size=12, batch_size=8,
                loader_workers=0, limit=48, progress=False, hflip=True, features=teacher)
    base.update(kw)
    settings = EncodeSettings(**base)
    assert encode_part(settings) == 48
    return Manifest.load(os.path.join(str(out), MANIFEST_NAME))


def _loader(out, **kw):
    opts = dict(num_workers=0, seed=5, shuffle_buffer=20, features=True, return_keys=True, return_draws=True)
    opts.update(kw)
    return build_latent_loader(str(out), 8, **opts)


@pytest.fixture(scope="module")
def full_features(tmp_path_factory, teacher_dir):
    out = tmp_path_factory.mktemp("feat")
    return out, _encode(out, teacher_dir)


def test_features_round_trip_with_their_flips(full_features, teacher_dir):
    out, man = full_features
    assert man.features["shape"] == [16, 8, 8] and man.features["projection"] is None
    assert man.features["fields"] == ["feat.npy", "feat_flip.npy"] and man.has_flip
    assert verify_dataset(str(out), progress=False) == []
    teacher = Teacher(teacher_dir)
    by_key = {}
    source = open_source("digits", 48)
    for i in range(len(source)):
        image, _, _ = source.load(i)
        by_key[i] = torch.from_numpy(center_crop_resize(image, 16)).permute(2, 0, 1)
    loader = _loader(out)
    flips_seen = set()
    for batch in loader:
        z, y, feats, keys, draws = batch.latents, batch.labels, batch.features, batch.keys, batch.draws
        assert feats.dtype == torch.float16 and feats.shape == (len(y), 16, 8, 8)
        for j, key in enumerate(keys):
            image = by_key[int(key[1:])]
            flip = bool(draws.flip[j])
            flips_seen.add(flip)
            # the latent and the features come from the same (mirrored or not) image
            expect_z = image.flip(2) if flip else image
            assert torch.equal(z[j], expect_z.float().div(127.5).sub(1.0).half().float())
            expect = teacher.features(expect_z[None], 8)[0]
            # computed in a batch of 8 when encoded: equal up to float16 rounding
            torch.testing.assert_close(feats[j].float(), expect, rtol=2e-3, atol=2e-3)
    assert flips_seen == {True, False}
    # a mirror's features are the teacher's on the mirrored image, not the mirrored grid
    img = next(iter(by_key.values()))[None]
    assert not torch.allclose(teacher.features(img.flip(3), 8), teacher.features(img, 8).flip(3), atol=1e-3)


def test_a_resumed_stream_gives_the_same_features(full_features):
    out, _ = full_features
    whole = [(b.latents, b.features, b.keys) for b in _loader(out)]
    first = _loader(out)
    it = iter(first)
    for _ in range(2):
        next(it)
    state = first.state_dict()
    resumed = _loader(out)
    resumed.load_state_dict(state)
    rest = [(b.latents, b.features, b.keys) for b in resumed]
    assert len(rest) == len(whole) - 2
    for (z1, f1, k1), (z2, f2, k2) in zip(whole[2:], rest):
        assert k1 == k2 and torch.equal(z1, z2) and torch.equal(f1, f2)


def test_reduced_features_apply_the_recorded_pca(tmp_path, teacher_dir):
    man = _encode(tmp_path / "pca", teacher_dir, features_dim=4, features_fit=20, hflip=False)
    proj = man.features["projection"]
    assert man.features["shape"] == [4, 8, 8] and man.features["teacher_dim"] == 16
    assert proj["file"] == "features_projection.npz" and proj["fit_images"] == 20 and 0 < proj["explained"] <= 1
    projection = Projection.load(str(tmp_path / "pca" / proj["file"]))
    rows = projection.components.double()
    assert torch.allclose(rows @ rows.T, torch.eye(4, dtype=torch.float64), atol=1e-5)
    teacher = Teacher(teacher_dir)
    batch = next(iter(build_latent_loader(str(tmp_path / "pca"), 8, num_workers=0, features=True, return_keys=True,
                                          shuffle_buffer=0)))
    feats, keys = batch.features, batch.keys
    source = open_source("digits", 48)
    image = torch.from_numpy(center_crop_resize(source.load(int(keys[0][1:]))[0], 16)).permute(2, 0, 1)
    expect = projection.apply(teacher.features(image[None], 8))[0]
    torch.testing.assert_close(feats[0].float(), expect, rtol=2e-3, atol=2e-3)
    # the same fit from the same features gives the same file content (signs fixed)
    sample = teacher.features(image[None].repeat(3, 1, 1, 1) + torch.arange(3).view(3, 1, 1, 1).byte(), 8)
    a, b = fit_projection(sample, 3), fit_projection(sample.clone(), 3)
    assert torch.equal(a.components, b.components)
    # a projection fitted for other settings is never reused
    settings = EncodeSettings(source="digits", out=str(tmp_path / "pca"), resolution=16, encoder="pixels",
                              limit=48, progress=False, hflip=False, features=teacher_dir, features_dim=4,
                              features_fit=10, loader_workers=0)
    with pytest.raises(Exception, match="was fitted for"):
        encode_part(settings)


def test_feature_options_are_checked(tmp_path, teacher_dir, capsys):
    args = ["encode", "--source", "digits", "--out", str(tmp_path / "x"), "--resolution", "16", "--encoder",
            "pixels", "--limit", "8", "--quiet"]
    assert data_main(args + ["--features-dim", "4"]) == 2
    assert "--features-dim needs --features TEACHER" in capsys.readouterr().err
    assert data_main(args + ["--features", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--features" in err and "not a ViT" in err and len(err.splitlines()) == 1
    assert data_main(args + ["--features", teacher_dir, "--features-dim", "99"]) == 2
    assert "--features-dim 99 must be in 1..16" in capsys.readouterr().err


def test_alignment_on_shards_without_features_is_refused_before_launch(digits8, full_features, tmp_path, capsys):
    with pytest.raises(ConfigError, match="hold none: encode them with `mdt-data encode --features"):
        check_shards(DataConfig(shards=digits8), features=True)
    check_shards(DataConfig(shards=str(full_features[0])), features=True)
    with pytest.raises(ValueError, match="hold no teacher features"):
        build_latent_loader(digits8, 8, num_workers=0, features=True)
    from trainer.cli import main as train_main

    from launcher import tiny_config, write_config

    cfg = write_config(tiny_config(digits8, str(tmp_path), align={"lambda_align": 0.5}), tmp_path / "c.yaml")
    assert train_main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "align.lambda_align > 0 needs teacher features" in err[0] and digits8 in err[0]


def test_the_digits_teacher_trains_on_the_train_split_and_loads_as_a_teacher(tmp_path):
    from data_tools.small_teacher import train_teacher

    report = train_teacher(str(tmp_path / "t"), steps=3, heldout=None, progress=False, width=16, depth=1, heads=2)
    assert report["source"] == "digits:train" and report["images"] == len(open_source("digits:train"))
    teacher = Teacher(str(tmp_path / "t"))
    assert teacher.dim == 16 and teacher.patch == 2
    feats = teacher.features(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), 8)
    assert feats.shape == (2, 16, 8, 8) and torch.isfinite(feats).all()
    assert np.allclose(teacher.mean.flatten().numpy(), 0.5)
