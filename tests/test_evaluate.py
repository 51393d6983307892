"""mdt-eval: Frechet distance maths against scipy and closed forms, the FID Inception network (key
names, shapes, features) without its real weights, the digits classifier / digits FD / accuracy,
image-set loading, and the CLI on samples of a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from trainer import digits_classifier as dc
from trainer.evaluate import (digits_accuracy, digits_fd, fd_from_features, feature_stats, frechet_distance,
                              load_images, main)
from trainer.inception import WEIGHTS_ENV, FIDInceptionV3, InceptionWeightsError, load_fid_inception




# ----------------------------------------------------------------------------- Frechet distance


def scipy_reference(mu1, s1, mu2, s2):
    """The TTUR / pytorch-fid formula with scipy's matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    # W2^2 between diagonal Gaussians: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])) == \
        pytest.approx(9.0 + 1.0)


def test_frechet_distance_matches_scipy_sqrtm_on_full_covariances():
    rng = np.random.default_rng(1)
    for dim in (3, 17, 64):
        a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
        s1, s2 = a @ a.T + 0.1 * np.eye(dim), b @ b.T / dim + 0.05 * np.eye(dim)
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        ours = frechet_distance(mu1, s1, mu2, s2)
        assert ours == pytest.approx(scipy_reference(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)
        assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)  # symmetric
        assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8 * np.trace(s1))
    # commuting covariances have a closed form too: tr(sqrt(S1 S2)) = sum sqrt(eig1 * eig2)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    e1, e2 = rng.uniform(0.2, 2, 5), rng.uniform(0.2, 2, 5)
    s1, s2 = q @ np.diag(e1) @ q.T, q @ np.diag(e2) @ q.T
    assert frechet_distance(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(np.sum((np.sqrt(e1) - np.sqrt(e2)) ** 2))


def test_frechet_distance_from_samples_and_singular_covariances():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4000, 4)) * [1, 2, 0.5, 1] + [0, 1, 0, 0]
    b = rng.normal(size=(4000, 4))
    mu, sigma = feature_stats(a)
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False))
    expected = 1.0 + (1 - 1) ** 2 + (2 - 1) ** 2 + (0.5 - 1) ** 2 + 0
    assert fd_from_features(a, b) == pytest.approx(expected, abs=0.1)
    # fewer samples than dimensions: rank-deficient covariances still give a finite, non-negative value
    few = rng.normal(size=(5, 20))
    value = fd_from_features(few, few + 0.01)
    assert np.isfinite(value) and value >= -1e-9


# ----------------------------------------------------------------------------- Inception


def reference_state_dict() -> dict:
    """A random state dict with the key names and shapes of pt_inception-2015-12-05-6726825d.pth
    (BatchNorm counters left out, as in files saved before they existed)."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, value in FIDInceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=gen) * 0.1
    return state


def test_inception_has_the_published_fid_layout():
    state = FIDInceptionV3().state_dict()
    params = {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    # Keras' InceptionV3 (same TF graph, BN without scale, 1000 classes) has 23,817,352 trainable and
    # 34,432 non-trainable weights: conv kernels + 17,216 BN channels + fc. With BN scale and the TF
    # graph's 1008 classes that is 23,817,352 + 17,216 + 2048 * 8 + 8 = 23,850,960 parameters.
    assert sum(v.numel() for v in params.values()) == 23_850_960
    assert sum(v.numel() for k, v in state.items() if k.endswith(("running_mean", "running_var"))) == 34_432
    # spot checks against the key names / shapes of the pytorch-fid weights file
    expect = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in expect.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)


def test_inception_loads_reference_keys_and_gives_2048_features(tmp_path, monkeypatch):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(reference_state_dict(), path)
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    model = load_fid_inception()  # from the environment variable
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats = model(images)
        assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()
        # a different input size is resized to 299 first: same features as a pre-resized input
        big = torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(big), feats)
    # safetensors copies of the same tensors load too
    from safetensors.torch import save_file

    save_file(reference_state_dict(), str(tmp_path / "w.safetensors"))
    load_fid_inception(str(tmp_path / "w.safetensors"))


def test_inception_weight_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsError, match=f"--inception PATH or set \\${WEIGHTS_ENV}"):
        load_fid_inception()
    with pytest.raises(InceptionWeightsError, match="nope.pth not found"):
        load_fid_inception(str(tmp_path / "nope.pth"))
    bad = reference_state_dict()
    bad["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(InceptionWeightsError, match=r"fc.weight has shape \(1000, 2048\)"):
        load_fid_inception(str(tmp_path / "bad.pth"))
    del bad["fc.weight"]
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(InceptionWeightsError, match="missing key 'fc.weight'"):
        load_fid_inception(str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InceptionWeightsError, match="cannot read"):
        load_fid_inception(str(tmp_path / "junk.pth"))


def test_eval_cli_without_inception_weights_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    np.savez(tmp_path / "a.npz", np.zeros((4, 8, 8, 3), np.uint8))
    assert main([str(tmp_path / "a.npz"), str(tmp_path / "a.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mdt-eval: error: no Inception weights given")
    assert "--inception" in err[0]
    assert main([str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--inception", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.pth not found" in err[0]


def test_fid_cli_and_precomputed_reference_stats(tmp_path, monkeypatch, capsys):
    """The CLI's FID path; a small stand-in (64-d features) replaces the Inception network (tested above)."""
    import trainer.inception as inception

    torch.manual_seed(0)
    stand_in = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 64))
    loaded = []
    monkeypatch.setattr(inception, "load_fid_inception",
                        lambda path=None, device="cpu": loaded.append(path) or stand_in)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    b = (a // 2).astype(np.uint8)
    np.savez(tmp_path / "a.npz", a)
    np.savez(tmp_path / "b.npz", b)
    out = tmp_path / "r.json"
    assert main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--inception", "w.pth", "--batch-size", "7",
                 "--json", str(out)]) == 0
    assert loaded == ["w.pth"]
    result = json.loads(out.read_text())
    assert result["fid"] > 0 and result["num_generated"] == 40 and result["num_reference"] == 40
    assert f"fid: {result['fid']:.4f}" in capsys.readouterr().out
    from trainer.evaluate import fid, inception_features

    feats = inception_features(b, stand_in, batch_size=40)
    assert feats.shape == (40, 64)
    assert abs(fid(a, a, model=stand_in)) < 1e-6 * result["fid"] + 1e-4
    # precomputed reference statistics (mu / sigma, as pytorch-fid and the ADM reference batches store)
    mu, sigma = feature_stats(feats)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    assert main([str(tmp_path / "a.npz"), str(tmp_path / "stats.npz"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["fid"] == pytest.approx(result["fid"], rel=1e-6)


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A quick classifier (fewer steps than the default) saved like the cache file."""
    net = dc.train_classifier(steps=150, width=16)
    path = tmp_path_factory.mktemp("clf") / "digits.safetensors"
    dc.save_classifier(net, str(path))
    return str(path)


def test_digits_classifier_judges_real_and_wrong_labels(classifier):
    net = dc.load_classifier(classifier)
    assert net.width == 16
    images, labels = dc.real_digits("train", 16)  # the split the diffusion demo trains on: unseen here
    assert images.shape == (899, 16, 16, 3) and images.dtype == np.uint8
    assert digits_accuracy(images, labels, classifier) > 0.93
    assert digits_accuracy(images, (labels + 1) % 10, net) < 0.1
    small, _ = dc.real_digits("train", 8)
    assert digits_accuracy(small, labels, net) > 0.93  # any resolution: canonical 8x8 input
    assert dc.features(images[:5], net).shape == (5, dc.FEATURE_DIM)


def test_digits_fd_orders_real_noise_and_wrong_classes(classifier):
    net = dc.load_classifier(classifier)
    train, labels = dc.real_digits("train", 16)
    heldout, _ = dc.real_digits("heldout", 16)
    real = digits_fd(heldout[:400], train, net)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (400, 16, 16, 3), dtype=np.uint8)
    ones_only = train[labels == 1]
    assert real < digits_fd(ones_only, train, net) < digits_fd(noise, train, net)
    assert digits_fd(train[:300], None, net) < digits_fd(ones_only, None, net)  # default reference: digits:train


def test_image_sets_from_npz_dirs_and_digits(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images, np.array([2, 0, 1]))
    got, labels = load_images(str(tmp_path / "s.npz"))
    np.testing.assert_array_equal(got, images)
    assert labels.tolist() == [2, 0, 1]
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "d" / ("sub" if i else "") / f"{i}.png")
    got, labels = load_images(str(tmp_path / "d"))
    assert labels is None and got.shape == (3, 5, 5, 3)
    assert sorted(map(bytes, got)) == sorted(map(bytes, images))
    digits, labels = load_images("digits:heldout", 16)
    assert digits.shape == (898, 16, 16, 3) and labels[:3].tolist() == [1, 3, 5]
    from trainer.evaluate import EvalError

    for bad, msg in [("nope.npz", "does not exist"), ("digits:test", "unknown digits split")]:
        with pytest.raises(EvalError, match=msg):
            load_images(str(tmp_path / bad) if bad.endswith("npz") else bad)
    np.savez(tmp_path / "float.npz", images.astype(np.float32))
    with pytest.raises(EvalError, match="uint8"):
        load_images(str(tmp_path / "float.npz"))


def test_eval_cli_on_samples_of_a_tiny_checkpoint(classifier, tmp_path, capsys):
    """mdt-sample then mdt-eval (digits metrics) on a checkpoint trained in the test."""
    from test_sample_cli import make_checkpoint

    from trainer.generate import main as sample_main

    make_checkpoint(tmp_path / "run", steps=40)
    assert sample_main([str(tmp_path / "run"), "--out", str(tmp_path / "s"), "--per-class", "2", "--steps", "6",
                        "--guidance-scale", "2", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "r.json"
    npz = str(tmp_path / "s" / "samples.npz")
    assert main([npz, "--metrics", "digits_fd,digits_acc", "--digits-classifier", classifier, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert 0.0 <= result["digits_acc"] <= 1.0 and result["digits_fd"] > 0
    assert result["num_generated"] == 20 and result["num_reference"] == 899
    assert f"digits_acc: {result['digits_acc']:.2%}" in printed
    # a PNG directory has no labels: accuracy needs them
    assert main([str(tmp_path / "s" / "images"), "digits:train", "--metrics", "digits_acc", "--digits-classifier",
                 classifier]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs labels" in err[0]
    assert main([npz, "--metrics", "is"]) == 2
    assert "unknown metric 'is'" in capsys.readouterr().err
