# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""In-domain check: is an image of the kind the generator was trained on?

The anomaly score is calibrated on the training domain only: an image of another modality, another body part or a
different acquisition (inverted, rotated, cropped) gets an arbitrary score, usually "abnormal". A
:class:`DomainDescriptor` describes the normal training images compactly and flags the images unlike them, so that
a caller can answer "outside the training domain: score not calibrated" instead.

Method (chosen by measurement, see ``scripts/benchmark_domain.py``): each image (B, C, H, W) in [-1, 1] becomes
:data:`NUM_FEATURES` image statistics that say "which kind of image" rather than "how abnormal":

- the 4x4 lowest-frequency coefficients of the orthonormal 2D DCT-II of the image divided by sqrt(H*W) (coarse
  layout and brightness: body part, orientation, polarity; 16 values);
- log mean squared horizontal and vertical differences at the scales H, H/2, H/4, H/8 (sharpness and direction of
  the structures: resolution, stretching, rotation; 8 values);
- the median intensity (exposure; 1 value).

The distance of an image is the squared Mahalanobis distance of its standardised features to those of the normal
training images, with a Ledoit-Wolf shrinkage covariance (Ledoit & Wolf 2004, the estimator of
``sklearn.covariance.ledoit_wolf``). The threshold is the ``quantile`` quantile of held-out distances of the normal
training images (K-fold cross-fitting: each image's distance comes from a descriptor fitted without it), so that
about ``1 - quantile`` of new normal images of the training domain are flagged. The descriptor holds about
NUM_FEATURES * (NUM_FEATURES + 2) numbers (675), stored as plain JSON-able lists in the model settings under
:data:`DOMAIN_SETTINGS_KEY`.

:func:`bottleneck_features` (the generator's bottleneck, pooled) is kept for comparison: it measured worse (it
separates fewer shifts and flags more abnormal images of the training domain).

Limits: the features see global appearance, so (1) a gamma / exposure change within the range of the training
images' exposures is not flagged (a gamma-2 curve on the chest set: about 5%); (2) a crop that keeps the look of the
anatomy is only partly flagged (one lung stretched to full width: about 80%); (3) when the normal training images
barely vary (the synthetic demo set: near copies of one template), a large lesion moves the statistics far outside
their spread and abnormal images are flagged too; on the chest set (natural variation) about 2-4% of the pneumonia
images are flagged, as many as the 0.5% quantile allows plus their shift in exposure and size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import Transform
from torch import nn

from .transforms.io import volume_slice

logger = logging.getLogger(__name__)

__all__ = [
    "DOMAIN_SETTINGS_KEY",
    "FEATURES_VERSION",
    "NUM_FEATURES",
    "DomainDescriptor",
    "domain_features",
    "bottleneck_features",
    "ledoit_wolf_covariance",
    "DomainRecord",
    "DomainCheckd",
    "OUT_OF_DOMAIN_MESSAGE",
]

OUT_OF_DOMAIN_MESSAGE = "outside the training domain: score not calibrated"

DOMAIN_SETTINGS_KEY = "domain"
FEATURES_VERSION = "image_statistics_v1"
NUM_FEATURES = 25
_DCT_SIZE = 4
_SCALES = 4


def _dct_matrix(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The first ``k`` rows of the orthonormal DCT-II matrix of size n: (k, n)."""
    i = torch.arange(n, dtype=torch.float64)
    f = torch.arange(k, dtype=torch.float64)
    m = torch.cos(math.pi * (i[None] + 0.5) * f[:, None] / n) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.to(dtype=dtype, device=device)


@torch.no_grad()
def domain_features(images: torch.Tensor) -> torch.Tensor:
    """Image statistics of a batch: (B, C, H, W) in [-1, 1] (the model input) -> (B, NUM_FEATURES) float32.

    The channels are averaged; H and W must be at least 16. These features do not depend on the trained weights, so
    a descriptor stays valid for any checkpoint of the same preprocessing. Values: the DCT coefficients are in
    [-1, 1] (the first is the mean intensity), the log energies in about [-14, 1.4], the median in [-1, 1].
    """
    if images.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}.")
    x = images.as_tensor() if hasattr(images, "as_tensor") else images  # a MetaTensor's metadata is not needed
    with torch.autocast(x.device.type, enabled=False):
        return _image_statistics(x.detach().float().mean(1))


def _image_statistics(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float32 -> (B, NUM_FEATURES), see :func:`domain_features`."""
    b, h, w = x.shape
    if h < 2 ** (_SCALES) or w < 2 ** (_SCALES):
        raise ValueError(f"images of {h}x{w} are too small for the domain features (at least 16x16).")
    ch = _dct_matrix(h, _DCT_SIZE, x.dtype, x.device)
    cw = _dct_matrix(w, _DCT_SIZE, x.dtype, x.device)
    dct = (ch @ x @ cw.T).reshape(b, -1) / math.sqrt(h * w)
    energies = []
    y = x[:, None]
    for _ in range(_SCALES):
        energies.append(torch.log((y[..., :, 1:] - y[..., :, :-1]).pow(2).mean((1, 2, 3)) + 1e-6))
        energies.append(torch.log((y[..., 1:, :] - y[..., :-1, :]).pow(2).mean((1, 2, 3)) + 1e-6))
        y = torch.nn.functional.avg_pool2d(y, 2)
    median = x.reshape(b, -1).median(1).values
    return torch.cat([dct, torch.stack(energies, 1), median[:, None]], 1)


@torch.no_grad()
def bottleneck_features(images: torch.Tensor, generator: nn.Module) -> torch.Tensor:
    """The generator's bottleneck (the output of its residual blocks), averaged over each patch's positions and
    concatenated over the N x N patches: (B, C, H, W) in [-1, 1] -> (B, N*N*8*conv_dim) float32 (unbounded).

    ``generator`` is a :class:`bundle.networks.SAGANGenerator` in eval mode. Kept for comparison with
    :func:`domain_features` (512 values for conv_dim 16: too many for a full covariance in the settings)."""
    from bundle.networks.generator import split_patches

    n = generator.patches_per_side
    p = split_patches(images, n)
    y0 = generator.stem(p)
    y1 = generator.down1[1](generator.down1[0](y0), None)
    y2 = generator.down2[1](generator.down2[0](y1), None)
    emb = generator.bottleneck[0](generator.down3(y2), None)
    for i, block in enumerate(generator.bottleneck):
        if i > 0:
            emb = block(emb)
    return emb.float().mean((2, 3)).reshape(images.shape[0], -1)


def ledoit_wolf_covariance(z: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf shrinkage covariance of centred samples z (n, p): ``((1 - s) S + s mu I, s)`` with S = z^T z / n,
    mu = trace(S) / p and the shrinkage s in [0, 1] estimated as in ``sklearn.covariance.ledoit_wolf``."""
    n, p = z.shape
    z = z.double()
    s_emp = z.T @ z / n
    mu = torch.trace(s_emp) / p
    z2 = z**2
    beta_sum = (z2.T @ z2).sum()
    delta_sum = (s_emp**2).sum()
    delta = (delta_sum - 2 * mu * torch.trace(s_emp) + p * mu**2) / p
    beta = torch.clamp((beta_sum / n - delta_sum) / (p * n), max=delta)
    shrinkage = 0.0 if float(delta) <= 0 else float(torch.clamp(beta / delta, 0.0, 1.0))
    return (1 - shrinkage) * s_emp + shrinkage * mu * torch.eye(p, dtype=z.dtype), shrinkage


class DomainDescriptor:
    """Mean, scale and shrinkage precision of the features of the normal training images, and a threshold.

    ``distance(f) = ((f - mean) / scale) @ precision @ ((f - mean) / scale)`` (squared Mahalanobis distance, >= 0;
    about NUM_FEATURES for a typical training image); ``in_domain(f) = distance(f) <= threshold``.

    Typical use::

        descriptor = DomainDescriptor()
        settings["domain"] = descriptor.fit(domain_features(normal_training_images))
        ...
        descriptor = DomainDescriptor.from_settings(settings["domain"])
        ok = descriptor.in_domain(domain_features(batch))        # (B,) bool
    """

    def __init__(self) -> None:
        self.mean: torch.Tensor | None = None  # (D,)
        self.scale: torch.Tensor | None = None  # (D,)
        self.precision: torch.Tensor | None = None  # (D, D)
        self.threshold: float | None = None
        self.info: dict[str, Any] = {}

    @property
    def fitted(self) -> bool:
        return self.precision is not None

    @staticmethod
    def _moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        f = features.double()
        mean = f.mean(0)
        scale = f.std(0).clamp_min(1e-6)
        cov, shrinkage = ledoit_wolf_covariance((f - mean) / scale)
        cov = cov + 1e-9 * torch.eye(cov.shape[0], dtype=cov.dtype)  # all-constant features: still invertible
        return mean, scale, torch.linalg.inv(cov), shrinkage

    @staticmethod
    def _distance(
        features: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, precision: torch.Tensor
    ) -> torch.Tensor:
        z = (features.double() - mean) / scale
        return ((z @ precision) * z).sum(1)

    def fit(
        self, features: torch.Tensor, quantile: float = 0.995, folds: int = 5, repeats: int = 5, seed: int = 0
    ) -> dict[str, Any]:
        """Fit on the features (n, D) of normal training images (n >= 4 * folds, D >= 1); returns
        :meth:`to_settings`.

        The threshold is the ``quantile`` quantile (linear interpolation) of held-out distances: the images are cut
        into ``folds`` random folds, each fold's distances come from a descriptor fitted on the other folds; this is
        done ``repeats`` times with other random folds (from ``seed``) and the n * repeats distances are pooled
        (which steadies the far quantile against the luck of one fold assignment). The stored descriptor is then
        fitted on all n images. Pass images that were not used to
        choose anything else when possible (any normal training images are fine: the features do not depend on
        the generator)."""
        if features.ndim != 2:
            raise ValueError(f"expected features (n, D), got shape {tuple(features.shape)}.")
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}.")
        if folds < 2:
            raise ValueError(f"folds must be at least 2, got {folds}.")
        n = features.shape[0]
        if n < 4 * folds:
            raise ValueError(
                f"{n} images are too few to fit a domain descriptor with {folds} folds (need {4 * folds})."
            )
        if not torch.isfinite(features).all():
            raise ValueError("the features hold non-finite values.")
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}.")
        held = torch.empty(repeats, n, dtype=torch.float64)
        rng = torch.Generator().manual_seed(seed)
        for r in range(repeats):
            for fold in torch.randperm(n, generator=rng).chunk(folds):
                keep = torch.ones(n, dtype=torch.bool)
                keep[fold] = False
                mean, scale, precision, _ = self._moments(features[keep])
                held[r, fold] = self._distance(features[fold], mean, scale, precision)
        held = held.flatten()
        self.mean, self.scale, self.precision, shrinkage = self._moments(features)
        self.threshold = float(torch.quantile(held, quantile))
        self.info = {
            "features": FEATURES_VERSION if features.shape[1] == NUM_FEATURES else f"custom_{features.shape[1]}",
            "n_fit": n,
            "quantile": quantile,
            "folds": folds,
            "repeats": repeats,
            "shrinkage": shrinkage,
            "heldout_median": float(held.median()),
        }
        return self.to_settings()

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("the domain descriptor is not fitted (call fit or from_settings first).")

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances (B,) float64 >= 0 of features (B, D)."""
        self._require_fitted()
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"expected features (B, {self.mean.shape[0]}), got shape {tuple(features.shape)}.")
        return self._distance(features.cpu(), self.mean, self.scale, self.precision)

    def in_domain(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) bool: True where ``distance(features) <= threshold`` (a non-finite feature is out of domain)."""
        d = self.distance(features)
        return torch.isfinite(d) & (d <= self.threshold)

    def features_of(self, images: torch.Tensor) -> torch.Tensor:
        """The features this descriptor was fitted on, of images (B, C, H, W) in [-1, 1]: (B, D). Raises
        ValueError for a descriptor of other features (a later feature version, or custom features)."""
        kind = self.info.get("features", FEATURES_VERSION)
        if kind != FEATURES_VERSION:
            raise ValueError(
                f"this descriptor was fitted on {kind!r} features; this bundle computes {FEATURES_VERSION!r}."
            )
        return domain_features(images)

    def to_settings(self) -> dict[str, Any]:
        """Plain JSON-able values: ``{"features", "mean", "scale", "precision" (list of rows), "threshold", ...}``."""
        self._require_fitted()
        return {
            **self.info,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "precision": self.precision.tolist(),
            "threshold": self.threshold,
        }

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> DomainDescriptor:
        """The descriptor stored by :meth:`to_settings` (e.g. ``model settings["domain"]``)."""
        d = cls()
        d.mean = torch.tensor(settings["mean"], dtype=torch.float64)
        d.scale = torch.tensor(settings["scale"], dtype=torch.float64)
        d.precision = torch.tensor(settings["precision"], dtype=torch.float64)
        d.threshold = float(settings["threshold"])
        n = d.mean.shape[0]
        if d.mean.ndim != 1 or d.scale.shape != (n,) or d.precision.shape != (n, n):
            raise ValueError(
                f"inconsistent domain descriptor: mean {n}, scale {tuple(d.scale.shape)}, "
                f"precision {tuple(d.precision.shape)}."
            )
        d.info = {k: v for k, v in settings.items() if k not in ("mean", "scale", "precision", "threshold")}
        return d


class DomainRecord:
    """Training record for the model savers (``training_record``): ``{"domain": descriptor settings}``, fitted once,
    at the first save, on the training images: a list of data sets of ``{"image": (C, H, W) in [-1, 1]}`` items,
    e.g. the ``ImageCache`` of ``train/0`` and of the unlabeled set. The unlabeled images belong to the training
    domain by the method's premise (the same source, normal and abnormal mixed), so fitting on them too keeps
    abnormal images of that domain inside; it matters where the normal images barely vary (the demo set: fitted on
    normals only, every lesion image measured outside).
    Fewer than 20 images: ``{}`` (no check stored), with a warning."""

    def __init__(self, images: Sequence[Any], enabled: bool = True) -> None:
        self.datasets = list(images)
        self.enabled = enabled
        self._settings: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        if self._settings is None:
            images = torch.stack([torch.as_tensor(ds[i]["image"]) for ds in self.datasets for i in range(len(ds))])
            try:
                self._settings = {DOMAIN_SETTINGS_KEY: DomainDescriptor().fit(domain_features(images))}
            except ValueError as e:
                logger.warning(f"no in-domain check stored with the model: {e}")
                self._settings = {}
        return self._settings


class DomainCheckd(Transform):
    """Adds ``in_domain`` (1,) (1.0 inside the training domain, 0.0 outside) and ``domain_distance`` (1,) to a
    decollated item from its preprocessed ``image`` (C, H, W) in [-1, 1], with the descriptor a model stores
    (``settings["domain"]``). Without one (models of bundle <= 0.8) the item is returned unchanged. An image outside
    is logged with :data:`OUT_OF_DOMAIN_MESSAGE` and its file name when the image's metadata has one (``log``; an
    evaluation counts them in its report instead)."""

    def __init__(self, domain: Mapping[str, Any] | None, image_key: str = "image", log: bool = True) -> None:
        self.descriptor = DomainDescriptor.from_settings(domain) if domain else None
        self.image_key, self.log = image_key, log

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.descriptor is None:
            return d
        image = torch.as_tensor(d[self.image_key]).detach().cpu()
        features = self.descriptor.features_of(image[None])
        distance = self.descriptor.distance(features)
        inside = bool(self.descriptor.in_domain(features)[0])
        d["in_domain"] = torch.tensor([float(inside)])
        d["domain_distance"] = distance.float().reshape(1)
        meta = getattr(d[self.image_key], "meta", {}) or {}
        if not inside and self.log and volume_slice(meta) is None:  # a volume's slices: one line per volume instead
            name = meta.get("filename_or_obj", "an image")
            logger.warning(
                f"{name}: {OUT_OF_DOMAIN_MESSAGE} (domain distance {float(distance[0]):.1f} > "
                f"{self.descriptor.threshold:.1f}: unlike the normal training images)"
            )
        return d
