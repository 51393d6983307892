"""The encoder's teacher features: the (projected) patch features stored per sample, the PCA
projection fitted once per dataset, and the manifest's ``features`` entry.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .format import FEATURE_FIELD, FEATURE_FLIP_FIELD, FEATURE_PROJECTION, LATENT_DTYPE, DataToolsError
from .manifest import sha256_file
from .sources import Source, image_tensor
from .teacher import Projection, Teacher, fit_projection, projection_path

if TYPE_CHECKING:  # annotations only: encode.py imports this module
    from .encode import EncodeSettings


class FeatureMaker:
    """The teacher's (projected) features of image batches, as stored: float16 [B, D, G, G]."""

    def __init__(self, settings: EncodeSettings, source: Source, teacher: Teacher, encoder: Any):
        """Fit (or read the dataset's) projection when settings.features_dim asks for one."""
        self.teacher = teacher
        self.grid = settings.feature_grid(encoder.latent_shape(settings.resolution)[1])
        self.projection: Projection | None = None
        if settings.features_dim:
            path = projection_path(settings.out)
            if not os.path.exists(path):
                _fit_and_save(settings, source, teacher, self.grid, path)
            self.projection = Projection.load(path)
            want = _fitted_on(settings, source, teacher, self.grid)
            if self.projection.fitted_on != want or self.projection.dim != settings.features_dim:
                raise DataToolsError(f"{path} was fitted for {self.projection.fitted_on!r} with "
                                     f"{self.projection.dim} channels, not {want!r} with {settings.features_dim}: "
                                     "delete it to re-encode with these settings")

    @property
    def shape(self) -> list[int]:
        """The stored shape [D, G, G]."""
        return [self.projection.dim if self.projection else self.teacher.dim, self.grid, self.grid]

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """uint8 [B, 3, H, W] -> float16 numpy [B, D, G, G]."""
        features = self.teacher.features(images, self.grid)
        if self.projection is not None:
            features = self.projection.apply(features)
        return features.numpy().astype("float16")


def _fitted_on(settings: EncodeSettings, source: Source, teacher: Teacher, grid: int) -> str:
    """What a projection depends on besides its width: teacher, source, resolution, grid, fit size."""
    return (f"teacher={teacher.id} source={source.fingerprint()} resolution={settings.resolution} grid={grid} "
            f"fit={settings.features_fit}")


def _fit_and_save(settings: EncodeSettings, source: Source, teacher: Teacher, grid: int, path: str) -> None:
    """Fit the PCA on the features of features_fit evenly spaced source images and save it."""
    count = min(settings.features_fit, len(source))
    picks = sorted({i * len(source) // count for i in range(count)})
    batches = []
    for start in range(0, len(picks), settings.batch_size):
        chunk = picks[start:start + settings.batch_size]
        images = [image_tensor(source, index, settings.resolution)[0] for index in chunk]
        batches.append(teacher.features(torch.stack(images), grid))
    projection = fit_projection(torch.cat(batches), settings.features_dim, _fitted_on(settings, source, teacher, grid))
    projection.save(path)
    if settings.progress:
        print(f"[encode] feature projection {teacher.dim} -> {settings.features_dim} channels fitted on "
              f"{len(picks)} images ({100 * projection.explained:.1f}% of the variance): {path}",
              file=sys.stderr, flush=True)


def features_entry(settings: EncodeSettings, head: dict, flips: bool) -> dict | None:
    """The manifest's record of the stored teacher features (None without); ``head`` is the first
    shard's journal record."""
    if not settings.features:
        return None
    entry = dict(teacher=dict(kind=Teacher.kind, id=head["teacher_id"], path=settings.features),
                 shape=head["feature_shape"], dtype=LATENT_DTYPE, teacher_dim=head["teacher_dim"],
                 fields=[FEATURE_FIELD] + ([FEATURE_FLIP_FIELD] if flips else []), projection=None)
    if settings.features_dim:
        path = projection_path(settings.out)
        entry["projection"] = dict(file=FEATURE_PROJECTION, sha256=sha256_file(path), kind="pca",
                                   fit_images=settings.features_fit, explained=Projection.load(path).explained)
    return entry
