"""mdt-eval: Frechet distance maths against scipy and closed forms, the FID Inception network (key
names, shapes, and features against torch-fidelity's port of the TensorFlow FID graph on the same
random weights), the digits classifier / digits FD / accuracy, image-set loading, and the CLI on
samples of a tiny checkpoint."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from model_zoo.digits_classifier import FEATURE_DIM
from model_zoo.inception import (
    WEIGHTS_ENV,
    FIDInceptionV3,
    InceptionWeightsError,
    load_fid_inception,
    tf1_resize_bilinear,
)
from trainer.cli import eval_main as main
from trainer.evaluation import digits as dc
from trainer.evaluation.digits import digits_accuracy, digits_fd
from trainer.evaluation.errors import EvalError
from trainer.evaluation.fid import fid, inception_features
from trainer.evaluation.frechet import fd_from_features, feature_stats, frechet_distance
from trainer.evaluation.images import load_images

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
    (BatchNorm counters left out, as in files saved before they existed).

    Convolutions are He-scaled and batch norms near identity so that the 2048 features still depend
    on the input after ~45 layers: with small weights everywhere they collapse to a constant, and a
    comparison of two implementations would pass whatever the preprocessing did."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, value in FIDInceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("conv.weight"):
            state[key] = torch.randn(value.shape, generator=gen) * math.sqrt(2 / value[0].numel())
        elif key.endswith("bn.weight"):
            state[key] = 1 + 0.1 * torch.randn(value.shape, generator=gen)
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=gen) * 0.1
    return state


@pytest.fixture(scope="module")
def fidelity():
    """torch-fidelity 0.4.0's InceptionV3 and TF1 resize modules (installed with --no-deps).

    Its package __init__ imports the CLIP extractor, which needs torchvision (not importable beside
    the CPU torch build), so a bare package module stands in for it while the two modules load."""
    spec = importlib.util.find_spec("torch_fidelity")
    assert spec is not None, "torch-fidelity is missing: pip install --no-deps torch-fidelity==0.4.0 (scripts/_env.sh)"
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    try:
        yield types.SimpleNamespace(
            inception=importlib.import_module("torch_fidelity.feature_extractor_inceptionv3"),
            resize=importlib.import_module("torch_fidelity.interpolate_compat_tensorflow"))
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)


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
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        feats = model(images)
        assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()
        with pytest.raises(ValueError, match=r"expected RGB images \[N, 3, H, W\], got shape \[2, 32, 32, 3\]"):
            model(images.permute(0, 2, 3, 1))
    # safetensors copies of the same tensors load too
    from safetensors.torch import save_file

    save_file(reference_state_dict(), str(tmp_path / "w.safetensors"))
    load_fid_inception(str(tmp_path / "w.safetensors"))


def test_inception_features_equal_torch_fidelitys_tf_graph_port(fidelity, tmp_path):
    """Same random weights, same uint8 images (smaller than, equal to and larger than 299 px): our
    features through `inception_features` (channel order, input range, TF1 resize, normalisation,
    pooling) equal torch-fidelity's '2048' features, which match the TensorFlow FID graph."""
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(reference_state_dict(), path)
    ref = fidelity.inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                         feature_extractor_weights_path=str(path))
    ours = load_fid_inception(str(path))
    # torch-fidelity's module has our key names: its weights file loads here, and ours there
    assert set(ref.state_dict()) == set(FIDInceptionV3().state_dict())
    rng = np.random.default_rng(0)
    shapes = [(2, 37, 41, 3), (1, 299, 299, 3), (1, 333, 320, 3)]  # smaller than, equal to, larger than 299
    sets = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]
    ours_features = []
    for images in sets:
        got = inception_features(images, ours, device=torch.device("cpu"))
        ours_features.append(got)
        with torch.no_grad():
            (want,) = ref(torch.from_numpy(images).permute(0, 3, 1, 2))
        # Measured on torch 2.13 CPU: bit-equal (max difference 0.0) on features of size ~1; the
        # tolerance leaves room for another reduction order in the final mean on other builds.
        np.testing.assert_allclose(got, want.double().numpy(), rtol=0, atol=1e-6)
    # The check can fail: the features depend on the image far beyond the tolerance, and pytorch-fid's
    # resize (F.interpolate, half-pixel centres) moves them by much more than it too.
    first = ours_features[0]
    assert np.abs(first[0] - first[1]).max() > 1e-2
    small = torch.from_numpy(sets[0]).permute(0, 3, 1, 2).float()
    with torch.no_grad():  # resized to 299 already, so our resize is the identity
        pytorch_fid_style = ours(F.interpolate(small, size=(299, 299), mode="bilinear", align_corners=False))
    assert np.abs(pytorch_fid_style.double().numpy() - first).max() > 1e-2


@pytest.mark.parametrize("size_in,size_out", [((37, 41), (299, 299)), ((333, 320), (299, 299)), ((9, 300), (299, 17)),
                                              ((299, 299), (299, 299))])
def test_tf1_resize_equals_torch_fidelitys(fidelity, size_in, size_out):
    x = torch.rand(2, 3, *size_in, generator=torch.Generator().manual_seed(0)) * 255
    want = fidelity.resize.interpolate_bilinear_2d_like_tensorflow1x(x, size=size_out, align_corners=False)
    got = tf1_resize_bilinear(x, size_out)
    assert got.shape == want.shape == (2, 3, *size_out)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # bit-equal: same float32 taps and lerp order
    if size_in != size_out:
        assert not torch.allclose(got, F.interpolate(x, size=size_out, mode="bilinear", align_corners=False))


def test_tf1_resize_closed_forms():
    x = torch.arange(2 * 8 * 6, dtype=torch.float32).reshape(1, 2, 8, 6)
    assert torch.equal(tf1_resize_bilinear(x, (8, 6)), x)  # identity at the input size
    # halving samples the even pixels exactly (source = 2 * dst, no half-pixel offset)
    assert torch.equal(tf1_resize_bilinear(x, (4, 3)), x[:, :, ::2, ::2])
    # doubling: even outputs are the inputs, odd ones the midpoints, the last column / row clamps
    row = torch.tensor([[[[0.0, 10.0, 30.0]]]])
    assert tf1_resize_bilinear(row, (1, 6)).flatten().tolist() == [0.0, 5.0, 10.0, 20.0, 30.0, 30.0]
    with pytest.raises(ValueError, match="expected float images"):
        tf1_resize_bilinear(x.to(torch.uint8), (4, 3))


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
    import trainer.evaluation.image_sets as metrics

    torch.manual_seed(0)
    stand_in = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 64))
    loaded = []
    monkeypatch.setattr(metrics, "load_fid_inception",
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
    assert result["num_generated"] == 40 and result["num_reference"] == 40
    assert f"fid: {result['fid']:.4f}" in capsys.readouterr().out

    def direct(images: np.ndarray) -> np.ndarray:
        """The stand-in's features of RGB values 0..255 in [N, 3, H, W], in one batch."""
        with torch.no_grad():
            return stand_in(torch.from_numpy(images).permute(0, 3, 1, 2).float()).double().numpy()

    # the exact value: a wrong channel order, input range or batching in the CLI's path changes it
    assert result["fid"] == pytest.approx(fd_from_features(direct(a), direct(b)), rel=1e-6)
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
    assert dc.features(images[:5], net).shape == (5, FEATURE_DIM)


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
    for bad, msg in [("nope.npz", "does not exist"), ("digits:test", "unknown digits split")]:
        with pytest.raises(EvalError, match=msg):
            load_images(str(tmp_path / bad) if bad.endswith("npz") else bad)
    np.savez(tmp_path / "float.npz", images.astype(np.float32))
    with pytest.raises(EvalError, match="uint8"):
        load_images(str(tmp_path / "float.npz"))


def test_eval_cli_on_samples_of_a_tiny_checkpoint(classifier, tmp_path, capsys):
    """mdt-sample then mdt-eval (digits metrics) on a checkpoint trained in the test."""
    from trainer.cli import sample_main

    from test_sample_cli import make_checkpoint

    make_checkpoint(tmp_path / "run", steps=40)
    assert sample_main([str(tmp_path / "run"), "--out", str(tmp_path / "s"), "--per-class", "2", "--steps", "6",
                        "--guidance-scale", "2", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "r.json"
    npz = str(tmp_path / "s" / "samples.npz")
    assert main([npz, "--metrics", "digits_fd,digits_acc", "--digits-classifier", classifier, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["num_generated"] == 20 and result["num_reference"] == 899
    assert f"digits_acc: {result['digits_acc']:.2%}" in printed
    # the CLI's values are the library's on the npz's images and labels
    net = dc.load_classifier(classifier)
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["arr_1"]
    train, _ = dc.real_digits("train", images.shape[1])
    assert result["digits_acc"] == dc.accuracy(images, labels, net)
    assert result["digits_fd"] == pytest.approx(digits_fd(images, train, net), rel=1e-9)
    # real digits through the same path: right labels score high, labels shifted by one low
    real, real_labels = dc.real_digits("train", 16)
    for shift in (0, 1):
        np.savez(tmp_path / "real.npz", real, (real_labels + shift) % 10)
        assert main([str(tmp_path / "real.npz"), "--metrics", "digits_acc", "--digits-classifier", classifier,
                     "--json", str(out)]) == 0
        acc = json.loads(out.read_text())["digits_acc"]
        assert (acc > 0.93) if shift == 0 else (acc < 0.1), (shift, acc)
    capsys.readouterr()
    # a PNG directory has no labels: accuracy needs them
    assert main([str(tmp_path / "s" / "images"), "digits:train", "--metrics", "digits_acc", "--digits-classifier",
                 classifier]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs labels" in err[0]
    assert main([npz, "--metrics", "is"]) == 2
    assert "unknown metric 'is'" in capsys.readouterr().err
