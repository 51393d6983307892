"""Inception-v3 in the standard FID configuration, without torchvision.

This is the network of the TensorFlow FID graph (inception-2015-12-05, the graph behind TTUR's FID
and ADM's evaluator, which DiT and MaskDiT report) with its preprocessing: torchvision's Inception3
layout with 1008 classes, no auxiliary head, average pools that do not count padding, and a max
pool in the last block. RGB values in 0..255 are resized to 299x299 with TensorFlow 1.x's bilinear
resize (`tf1_resize_bilinear`), mapped to [-1, 1] by (x - 128) / 128, and the last block's 8x8 map
is averaged into the 2048-d pool features. The tests check the features against torch-fidelity's
port of that graph (which its authors check bit for bit against TensorFlow) on the same weights
and images.

pytorch-fid resizes with `F.interpolate(bilinear, align_corners=False)` instead (half-pixel
centres) and maps 0..255 to [-1, 1] by 2x/255 - 1, so its numbers differ slightly from these and
from the ADM evaluator's.

The weights are read from a local file (the `.pth` state dict, or the same tensors as
`.safetensors`) given as an argument or through $MDT_INCEPTION_WEIGHTS; nothing is downloaded.
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` and torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` use the same key names as this module.
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

WEIGHTS_ENV = "MDT_INCEPTION_WEIGHTS"
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
INPUT_SIZE = 299


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights are missing or do not fit the network; the message is one line."""


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # The TF graph averages over the valid pixels only at the borders.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded 1x3 / 3x1 branches; `max_pool` in the last block of the TF graph."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


def _source_taps(in_size: int, out_size: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output index: the lower and upper input index and the weight of the upper one."""
    # TF1's legacy scaler: source = dst * (in / out) in float32, with no half-pixel offset, so
    # output pixel 0 samples input pixel 0 exactly and the right / bottom edge is clamped.
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    src = torch.arange(out_size, dtype=torch.float32, device=device) * scale.to(device)
    lower = src.floor()
    frac = src - lower
    lower = lower.long()
    return lower, (lower + 1).clamp(max=in_size - 1), frac


def tf1_resize_bilinear(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of float images [N, C, H, W] to `size` (height, width) as TensorFlow 1.x's
    `tf.image.resize_bilinear(align_corners=False)` computes it: the resize inside the FID graph.
    It is not `F.interpolate(bilinear, align_corners=False)`, which samples at half-pixel centres;
    at the input size it is the identity."""
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected float images [N, C, H, W], got {x.dtype} {list(x.shape)}")
    top, bottom, dy = _source_taps(x.shape[2], size[0], x.device)
    left, right, dx = _source_taps(x.shape[3], size[1], x.device)
    dy, dx = dy.to(x.dtype).view(-1, 1), dx.to(x.dtype)

    def along_x(rows: torch.Tensor) -> torch.Tensor:
        a = rows.index_select(3, left)
        return a + (rows.index_select(3, right) - a) * dx

    # TF's order of operations (along x in both rows, then along y) keeps the result bit-equal.
    top_row, bottom_row = along_x(x.index_select(2, top)), along_x(x.index_select(2, bottom))
    return top_row + (bottom_row - top_row) * dy


class FIDInceptionV3(nn.Module):
    """forward(RGB images [N, 3, H, W], values 0..255) -> pool features [N, 2048] (FID's pool3 layer)."""

    def __init__(self, num_classes: int = 1008):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, num_classes)  # kept so the published state dict loads strictly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool features [N, 2048] of RGB images [N, 3, H, W] with values in 0..255 (uint8 or float)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB images [N, 3, H, W], got shape {list(x.shape)}")
        # Resize and normalise in float32, as the TF graph does, whatever dtype the weights have.
        x = tf1_resize_bilinear(x.to(torch.float32), (INPUT_SIZE, INPUT_SIZE))
        x = ((x - 128) / 128).to(self.fc.weight.dtype)  # the graph's Sub 128, Mul 1/128 (exact in float)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))  # pool_3: the graph's 8x8 average pool over the whole map


def resolve_weights(path: str | None = None) -> str:
    """The weights file: `path`, else $MDT_INCEPTION_WEIGHTS; InceptionWeightsError if neither exists."""
    path = path or os.environ.get(WEIGHTS_ENV)
    hint = (f"pass --inception PATH or set ${WEIGHTS_ENV} to a local copy of {WEIGHTS_NAME} "
            f"(pytorch-fid's FID weights; torch-fidelity's copy loads too; nothing is downloaded)")
    if not path:
        raise InceptionWeightsError(f"no Inception weights given: {hint}")
    if not os.path.isfile(path):
        raise InceptionWeightsError(f"Inception weights {path} not found: {hint}")
    return path


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same one-line error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InceptionWeightsError(f"cannot read Inception weights {path}: {first}") from None
    if not isinstance(state, dict):
        raise InceptionWeightsError(f"Inception weights {path} do not hold a state dict")
    return state


def load_state(model: FIDInceptionV3, state: Dict[str, torch.Tensor], where: str = "state dict") -> None:
    """Strict load (BatchNorm step counters aside), naming the first missing / unexpected / misfit key."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        kind = "missing" if missing else "unexpected"
        raise InceptionWeightsError(f"Inception weights {where}: {kind} key {key!r} "
                                    f"({len(missing)} missing, {len(unexpected)} unexpected): not {WEIGHTS_NAME}?")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise InceptionWeightsError(f"Inception weights {where}: {k} has shape {tuple(state[k].shape)}, "
                                        f"expected {tuple(v.shape)}")
    model.load_state_dict(state, strict=False)


def load_fid_inception(path: str | None = None,
                       device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception network with weights from `path` or $MDT_INCEPTION_WEIGHTS, in eval mode."""
    weights = resolve_weights(path)
    model = FIDInceptionV3()
    load_state(model, _read_state_dict(weights), weights)
    return model.eval().requires_grad_(False).to(device)
