"""Class-wise Gaussian statistics of image features: estimation, storage, sampling, and optimal-transport calibration.

Used by ``dmc`` and ``dmc-ot`` (docs/methods.md) to replay old classes without keeping their images: each
class is summarised by the mean and covariance of its image features (full, shrunk toward a scaled identity, or
diagonal), and stage 2 of every later task draws features of the old classes from ``N(mean, covariance)``.

When the image encoder keeps learning, old statistics describe an encoder that no longer exists. ``calibrate``
moves them the way the encoder moved: the current task's images, encoded before and after the update, give paired
drift vectors; for each old class, samples of its Gaussian are matched to the old-encoder features by an entropic
optimal-transport plan (POT's Sinkhorn), each sample moves by the plan-weighted drift of the features it is matched
with, and the class's mean and covariance are re-estimated from the moved samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ClipclError
from .base import gaussian_log_likelihoods, shrink

COVARIANCE_KINDS = ("full", "diag")
STATS_MEAN_KEY = "stats.mean"
STATS_FACTOR_KEY = "stats.cov_factor"
STATS_CLASSES_KEY = "stats.classes"


@dataclass
class ClassGaussian:
    """One class's statistics: ``mean`` ``[D]``; ``cov`` ``[D, D]`` (full) or ``[D]`` (diagonal variances)."""

    mean: torch.Tensor
    cov: torch.Tensor
    _factor: torch.Tensor | None = None  # the covariance's Cholesky factor, computed on the first draw

    @property
    def diagonal(self) -> bool:
        return self.cov.dim() == 1

    def factor(self) -> torch.Tensor:
        """``L`` with ``L @ L.T = cov`` (float64), or the standard deviations for a diagonal covariance."""
        if self._factor is None:
            cov = self.cov.double()
            self._factor = cov.clamp_min(0).sqrt() if self.diagonal else _cholesky(cov)
        return self._factor


def estimate(features: torch.Tensor, kind: str = "full", shrinkage: float = 0.1) -> ClassGaussian:
    """The mean and (shrunk full, or diagonal) covariance of one class's features ``[N, D]``."""
    if kind not in COVARIANCE_KINDS:
        raise ClipclError(f"covariance must be one of {', '.join(COVARIANCE_KINDS)}, got {kind!r}")
    x = features.double()
    mean = x.mean(dim=0)
    centred = x - mean
    denominator = max(len(x) - 1, 1)
    if kind == "diag":
        return ClassGaussian(mean.float(), (centred.pow(2).sum(dim=0) / denominator).float())
    return ClassGaussian(mean.float(), shrink(centred.T @ centred / denominator, shrinkage).float())


def sample(gaussian: ClassGaussian, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws ``[n, D]`` of ``N(mean, cov)`` (float32, on the statistics' device)."""
    mean = gaussian.mean.double()
    noise = torch.randn(n, mean.shape[0], dtype=torch.float64, generator=generator).to(mean.device)
    spread = noise * gaussian.factor() if gaussian.diagonal else noise @ gaussian.factor().T
    return (mean + spread).float()


def _cholesky(covariance: torch.Tensor) -> torch.Tensor:
    """Cholesky factor, with a growing diagonal jitter for a matrix that rounding left not quite positive definite."""
    jitter = 0.0
    scale = float(covariance.diagonal().mean().clamp_min(1e-12))
    for _ in range(9):
        factor, info = torch.linalg.cholesky_ex(covariance + jitter * torch.eye(len(covariance), dtype=covariance.dtype,
                                                                                device=covariance.device))
        if int(info) == 0:
            return factor
        jitter = scale * 1e-6 if jitter == 0 else jitter * 10
    raise ValueError("a stored class covariance is not positive definite")


def transport_plan(source: torch.Tensor, target: torch.Tensor, reg: float = 0.05,
                   relaxation: float = math.inf) -> torch.Tensor:
    """Entropic OT plan ``[S, N]`` from uniform weights on ``source`` ``[S, D]`` to uniform weights on ``target``
    ``[N, D]`` under the squared Euclidean cost (scaled to a maximum of 1, so ``reg`` means the same at any scale).

    ``relaxation`` = inf is the balanced plan (``ot.sinkhorn``): both marginals are exact. A finite value keeps the
    source marginal exact and lets the target marginal deviate at that KL cost (``ot.sinkhorn_unbalanced``,
    semi-relaxed): each source point then goes to the targets near it, instead of spreading over all of them.
    """
    import ot  # POT pulls in scipy and networkx (most of a second): only dmc-ot's calibration needs it

    source64, target64 = source.double().cpu(), target.double().cpu()
    cost = torch.cdist(source64, target64).pow(2)
    cost = cost / cost.max().clamp_min(1e-12)
    a = torch.full((len(source64),), 1.0 / len(source64), dtype=torch.float64)
    b = torch.full((len(target64),), 1.0 / len(target64), dtype=torch.float64)
    if math.isinf(relaxation):
        return ot.sinkhorn(a, b, cost, reg, numItermax=2000, stopThr=1e-9)
    return ot.unbalanced.sinkhorn_unbalanced(a, b, cost, reg, reg_m=(math.inf, relaxation), numItermax=2000,
                                             stopThr=1e-9)


def calibrate(gaussian: ClassGaussian, old_features: torch.Tensor, drift: torch.Tensor, n_samples: int = 256,
              reg: float = 0.05, relaxation: float = 0.1, shrinkage: float = 0.1,
              generator: torch.Generator | None = None) -> ClassGaussian:
    """Move a class's statistics by the encoder's drift, as seen on paired (old feature, drift) vectors.

    Samples of the class are matched to ``old_features`` by :func:`transport_plan` and each moves by the
    plan-weighted drift of its matches. ``relaxation`` is the plan's: balanced OT (inf) has to spread every class's
    samples over all of the task's features, so every class would move by nearly the average drift; the default
    semi-relaxed plan lets them follow the drift around them.

    The new mean and covariance are the stored ones plus the change the drift makes to the samples' mean and
    covariance (the same samples before and after moving, so sampling noise cancels): with no drift, the statistics
    come back unchanged.
    """
    samples = sample(gaussian, n_samples, generator).double()
    plan = transport_plan(samples, old_features, reg, relaxation)
    weights = plan / plan.sum(dim=1, keepdim=True).clamp_min(1e-300)
    moved = samples + weights.to(samples.device) @ drift.double().to(samples.device)
    mean = gaussian.mean.double() + (moved.mean(dim=0) - samples.mean(dim=0))
    if gaussian.diagonal:
        cov = gaussian.cov.double() + moved.var(dim=0) - samples.var(dim=0)
        return ClassGaussian(mean.float(), cov.clamp_min(0).float())
    change = torch.cov(moved.T) - torch.cov(samples.T)
    covariance = gaussian.cov.double() + change
    eigenvalues, vectors = torch.linalg.eigh((covariance + covariance.T) / 2)
    if float(eigenvalues.min()) < 0:  # a large drift can leave the sum not quite positive semi-definite
        covariance = shrink(vectors @ torch.diag(eigenvalues.clamp_min(0)) @ vectors.T, shrinkage)
    return ClassGaussian(mean.float(), covariance.float())


class GaussianBank(nn.Module):
    """The statistics of every class seen so far, by global class index, stored per task as fp16 safetensors.

    A covariance is stored as its Cholesky factor (standard deviations for a diagonal one): half precision keeps a
    factor's values in range where the covariance's (often 1e-6 for unit-norm features) would round to a matrix
    that is no longer positive definite, and ``L @ L.T`` is positive semi-definite whatever the rounding.
    """

    def __init__(self) -> None:
        super().__init__()
        self.classes: dict[int, ClassGaussian] = {}
        self._pooled: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None  # (key, means, precision)

    def set(self, index: int, gaussian: ClassGaussian) -> None:
        self.classes[index] = gaussian
        self._pooled = None

    def log_likelihoods(self, features: torch.Tensor, n_classes: int) -> torch.Tensor:
        """``[batch, n_classes]``: each feature's Gaussian log-likelihood under classes ``0..n_classes-1``, with one
        covariance, the classes' covariances averaged (linear discriminant analysis on the kept statistics; the
        precision is cached until a class's statistics change)."""
        missing = [c for c in range(n_classes) if c not in self.classes]
        if missing:
            raise ClipclError(f"no statistics kept for {len(missing)} of the {n_classes} classes")
        key = (n_classes, id(self.classes[n_classes - 1]))
        if self._pooled is None or self._pooled[0] != key:
            means = torch.stack([self.classes[c].mean for c in range(n_classes)]).float()
            pooled = torch.stack([self._full_cov(self.classes[c]) for c in range(n_classes)]).mean(dim=0)
            self._pooled = (key, means, torch.linalg.inv(pooled))
        return gaussian_log_likelihoods(features, self._pooled[1].to(features.device),
                                        self._pooled[2].to(features.device))

    @staticmethod
    def _full_cov(gaussian: ClassGaussian) -> torch.Tensor:
        cov = gaussian.cov.double()
        return torch.diag(cov) if gaussian.diagonal else cov

    def tensors(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The statistics of ``indices`` as a task's tensor file stores them (half precision)."""
        return {
            STATS_CLASSES_KEY: torch.tensor(indices, dtype=torch.int64),
            STATS_MEAN_KEY: torch.stack([self.classes[i].mean for i in indices]).half(),
            STATS_FACTOR_KEY: torch.stack([self.classes[i].factor() for i in indices]).half(),
        }

    def load(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """Set the classes a task's tensor file holds (a later task's copy replaces an earlier one)."""
        self._pooled = None
        for row, index in enumerate(tensors[STATS_CLASSES_KEY].tolist()):
            factor = tensors[STATS_FACTOR_KEY][row].double().to(device)
            cov = factor.pow(2) if factor.dim() == 1 else factor @ factor.T
            self.classes[int(index)] = ClassGaussian(tensors[STATS_MEAN_KEY][row].float().to(device), cov.float(),
                                                     factor)

    def stored_bytes(self, index: int) -> int:
        """Bytes a class's mean and covariance factor take in a tensor file (half precision)."""
        gaussian = self.classes[index]
        return 2 * (gaussian.mean.numel() + gaussian.factor().numel())

    def draw(self, indices: torch.Tensor) -> torch.Tensor:
        """One sample ``[len(indices), D]`` of the class named at each position of ``indices`` (a replay batch)."""
        drawn: torch.Tensor | None = None
        for index in torch.unique(indices).tolist():
            rows = (indices == index).nonzero().squeeze(1)
            samples = sample(self.classes[index], len(rows))
            if drawn is None:
                drawn = torch.empty(len(indices), samples.shape[1], device=samples.device)
            drawn[rows.to(samples.device)] = samples
        assert drawn is not None
        return drawn


def fit_linear_map(before: torch.Tensor, after: torch.Tensor, ridge: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` with ``after ~ before @ W.T + b``: least squares on paired features ``[N, D]``, regularised toward
    the identity by ``ridge`` (relative to the features' mean variance), so a map fitted on a few hundred images of
    one task stays close to "no change" in the directions those images do not span. Identical pairs give exactly
    ``(I, 0)``.
    """
    x, y = before.double(), after.double()
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - x_mean, y - y_mean
    dim = x.shape[1]
    strength = ridge * float(xc.pow(2).sum()) / dim
    identity = torch.eye(dim, dtype=torch.float64, device=x.device)
    weight_t = torch.linalg.solve(xc.T @ xc + strength * identity, xc.T @ yc + strength * identity)
    weight = weight_t.T
    return weight.float(), (y_mean - x_mean @ weight_t).float()


def map_gaussian(gaussian: ClassGaussian, weight: torch.Tensor, bias: torch.Tensor) -> ClassGaussian:
    """A class's statistics carried through ``x -> W x + b``: mean ``W mu + b``, covariance ``W S W^T`` (the
    diagonal of it for a diagonal covariance)."""
    w = weight.double().to(gaussian.mean.device)
    mean = w @ gaussian.mean.double() + bias.double().to(w.device)
    cov = torch.diag(gaussian.cov.double()) if gaussian.diagonal else gaussian.cov.double()
    mapped = w @ cov @ w.T
    return ClassGaussian(mean.float(), (mapped.diagonal() if gaussian.diagonal else (mapped + mapped.T) / 2).float())
