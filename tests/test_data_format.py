"""The shard format spec: keys, npy coding without pickle, manifest validation, preprocessing."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_tools.format import (
    CLS_FIELD,
    FLIP_FIELD,
    LATENT_FIELD,
    DataToolsError,
    FastArrayDecoder,
    LatentSpec,
    decode_array,
    encode_array,
    encode_sample,
    make_key,
    split_member_name,
)
from data_tools.manifest import Manifest, ShardInfo
from data_tools.sources import center_crop_resize
from data_tools.tar_reader import iter_tar_files, iter_tar_samples


def test_keys_are_dot_free_and_split_like_webdataset():
    key = make_key(12)
    assert "." not in key and key == "s000000012"
    assert split_member_name(f"{key}.latent_flip.npy") == (key, "latent_flip.npy")
    assert split_member_name(f"dir.x/{key}.cls") == (f"dir.x/{key}", "cls")
    with pytest.raises(ValueError):
        encode_sample("img.0", np.zeros((1, 1, 1, 1), np.float16), 0)


def test_npy_round_trip_and_pickle_refused():
    a = np.arange(24, dtype=np.float16).reshape(2, 3, 2, 2)
    assert np.array_equal(decode_array(encode_array(a)), a)
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_array(buf.getvalue())


def test_fast_decoder_checks_shape_dtype_and_truncation():
    spec = LatentSpec((3, 2, 2))
    decode = FastArrayDecoder(spec)
    good = np.random.default_rng(0).standard_normal(spec.stored_shape).astype(np.float16)
    assert np.array_equal(decode(encode_array(good)), good)
    for bad in (good.astype(np.float32), good[:1], good.reshape(2, 3, 4)):
        with pytest.raises(ValueError):
            decode(encode_array(bad))
    with pytest.raises(ValueError, match="unreadable"):
        decode(encode_array(good)[:-5])


def test_tar_reader_groups_fields_and_selects():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            for field, data in encode_sample(make_key(i), np.zeros((2, 1, 1, 1), np.float16), i,
                                             {"i": i}, np.ones((2, 1, 1, 1), np.float16)).items():
                if field == "__key__":
                    continue
                info = tarfile.TarInfo(f"{make_key(i)}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    samples = list(iter_tar_samples(buf, frozenset([LATENT_FIELD, CLS_FIELD])))
    assert [k for k, _ in samples] == [make_key(i) for i in range(3)]
    assert set(samples[1][1]) == {LATENT_FIELD, CLS_FIELD} and samples[2][1][CLS_FIELD] == b"2"
    buf.seek(0)
    assert FLIP_FIELD in next(iter_tar_samples(buf))[1]


def _manifest_dict():
    m = Manifest(latent=dict(shape=[4, 2, 2], moments=["mean", "std"], dtype="float16"),
                 scaling_factor=0.18215, encoder=dict(kind="vae", id="x"), source=dict(spec="digits"),
                 resolution=4, has_flip=True, num_classes=10, num_samples=5,
                 shards=[ShardInfo("a.tar", 2, 10, "h"), ShardInfo("b.tar", 3, 10, "h")])
    return json.loads(m.to_json())


def test_manifest_round_trip_and_errors_name_the_key():
    data = _manifest_dict()
    m = Manifest.from_dict(data)
    assert m.spec.stored_shape == (2, 4, 2, 2) and m.shards[1].samples == 3
    assert Manifest.from_dict(json.loads(m.to_json())).to_json() == m.to_json()
    del data["scaling_factor"]
    with pytest.raises(DataToolsError, match="scaling_factor"):
        Manifest.from_dict(data)
    data = _manifest_dict()
    data["num_samples"] = 6
    with pytest.raises(DataToolsError, match="num_samples"):
        Manifest.from_dict(data)


@pytest.mark.parametrize("size", [(8, 8), (40, 30), (13, 90), (300, 200)])
def test_center_crop_resize(size):
    image = Image.new("L", size, 128)
    out = center_crop_resize(image, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and out.flags.writeable


def _tar_bytes(fmt, names, mtime=0):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("somedir"))  # a non-file member is passed over
        for i, name in enumerate(names):
            data = bytes([i]) * (100 + 700 * i)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt, mtime", [(tarfile.USTAR_FORMAT, 0), (tarfile.PAX_FORMAT, 1.5),
                                        (tarfile.GNU_FORMAT, 0)])
def test_tar_reader_agrees_with_tarfile(fmt, mtime):
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 90
    names = [f"{long_dir}/k{i}.{f}" for i in range(3) for f in ("cls", "latent.npy")] + ["x" * 150 + ".cls"] * (
        fmt != tarfile.USTAR_FORMAT)
    raw = _tar_bytes(fmt, names, mtime)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    assert list(iter_tar_files(io.BytesIO(raw))) == expected
    skipped = list(iter_tar_files(io.BytesIO(raw), want=lambda n: n.endswith(".cls")))
    assert [d is None for _, d in skipped] == [not n.endswith(".cls") for n, _ in expected]


def test_tar_reader_rejects_damage():
    raw = _tar_bytes(tarfile.USTAR_FORMAT, ["k0.cls", "k1.cls"])
    with pytest.raises(EOFError):
        list(iter_tar_files(io.BytesIO(raw[:1200])))  # inside a member
    with pytest.raises(EOFError):
        list(iter_tar_files(io.BytesIO(raw[:2048])))  # at a member boundary, no end marker
    damaged = bytearray(raw)
    damaged[512 + 5] ^= 0x20  # a header byte of the first file
    with pytest.raises(ValueError, match="checksum"):
        list(iter_tar_files(io.BytesIO(bytes(damaged))))
