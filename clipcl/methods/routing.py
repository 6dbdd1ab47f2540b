"""Task-aware inference for methods that keep one adapter per task (``dma``): which tasks an image may belong to,
and how the evidence of the candidate tasks' adapters is weighed against each other.

Two kinds of statistics are kept per task, each from the task's own training images, so that no task ever rewrites
another's:

* in the **frozen** space (:class:`TaskRouter`): the mean frozen feature of each class and the task's within-class
  scatter, pooled over every task into one Gaussian model of all classes (linear discriminant analysis). One pass
  of the frozen encoder scores every class of every task on one scale; a task's score is its best class's.
* in the task's **own adapted** space (:class:`AdaptedSpaces`): the class means and within-class scatter of the
  task's images encoded with its own adapter, and the mean and spread of the *fit* those images get (the
  log-likelihood of their best class, under the task's covariance). An image's fit to a task, in units of the
  spread of the task's own images, says how well it belongs there (the task-incremental-plus-out-of-distribution
  view of class-incremental learning: Kim et al., NeurIPS 2022; TPL, Lin et al., ICLR 2024). Adapted spaces differ
  from task to task, so raw scores are not comparable across tasks; the normalised fit is.

The frozen pass picks each image's ``K`` most likely tasks; only their adapters run (K + 1 encoder passes instead
of T + 1). :func:`combine_evidence` then scores every class of the candidate tasks:

    score(c) = frozen log-likelihood of c
               + text_weight    * log softmax over the task's classes of CLIP's logits under the task's adapter
               + adapted_weight * log softmax over the task's classes of their Gaussian in the adapted space
               + fit_weight     * the image's normalised fit to the task

and the class probabilities are the softmax of these scores. The frozen term carries what makes classes of
different tasks comparable; the adapter terms carry what the task's training taught. The weights were chosen on
validation images (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ClipclError
from .base import PerTaskBuffers, TaskInfo, gaussian_log_likelihoods, shrink
from .components import PooledGaussian


class TaskRouter(PerTaskBuffers):
    """Which tasks an image belongs to, from one pass of the frozen image encoder.

    Each task keeps the mean frozen feature of each of its classes and the within-class scatter of its training
    images. A class's score is, with ``mahalanobis``, its Gaussian log-likelihood under the within-class covariance
    pooled over every task so far (:class:`~clipcl.methods.components.PooledGaussian`); with ``class-covariance``,
    under the class's own covariance mixed with the pooled one (``class_mix`` is the pooled one's weight; regularised
    discriminant analysis, Friedman 1989), which needs each class's scatter stored too (``C x D x D`` per task);
    with ``cosine``, the cosine to its mean at CLIP's logit scale. A task's score is its best class's, and the
    softmax over tasks is the router's belief in each task.
    """

    KINDS = ("mahalanobis", "class-covariance", "cosine")
    MEANS_KEY = "router.feature_means"
    SCATTER_KEY = "router.scatter"
    COUNT_KEY = "router.count"
    CLASS_SCATTER_KEY = "router.class_scatter"
    CLASS_COUNT_KEY = "router.class_count"

    def __init__(self, kind: str = "mahalanobis", shrinkage: float | None = 0.01, class_mix: float = 0.9) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ClipclError(f"router must be one of {', '.join(self.KINDS)}, got {kind!r}")
        self.kind = kind
        self.class_mix = class_mix
        self.gaussian = PooledGaussian("router.", shrinkage)
        self._class_factors: tuple[tuple[int, torch.device], torch.Tensor, torch.Tensor] | None = None

    @property
    def n_tasks(self) -> int:
        return self.gaussian.n_tasks

    def add(self, task: TaskInfo, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """Add a task's statistics (the dict :meth:`statistics` made, or its stored copy)."""
        if self.kind == "class-covariance":
            missing = [k for k in (self.CLASS_SCATTER_KEY, self.CLASS_COUNT_KEY) if k not in tensors]
            if missing:
                raise ValueError(f"task {task.index} lacks the per-class statistics {', '.join(missing)} that router "
                                 "class-covariance needs (it was stored with another router)")
            for key in (self.CLASS_SCATTER_KEY, self.CLASS_COUNT_KEY):
                self.keep(key.split(".")[-1], task.index, tensors[key].to(device))
        self.gaussian.add(task, tensors, device)
        self._class_factors = None

    def statistics(self, features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict[str, torch.Tensor]:
        """A task's statistics from its frozen features and labels (0..n_classes-1)."""
        stats = PooledGaussian("router.", 0.0).statistics(features, labels, n_classes)
        if self.kind == "class-covariance":
            centred = features.double() - stats[self.MEANS_KEY].double()[labels]
            stats[self.CLASS_SCATTER_KEY] = torch.stack([centred[labels == c].T @ centred[labels == c]
                                                         for c in range(n_classes)]).float()
            stats[self.CLASS_COUNT_KEY] = torch.bincount(labels, minlength=n_classes).float()
        return stats

    def tensors(self, task: TaskInfo) -> dict[str, torch.Tensor]:
        stored = self.gaussian.tensors(task)
        if self.kind == "class-covariance":
            for key in (self.CLASS_SCATTER_KEY, self.CLASS_COUNT_KEY):
                stored[key] = self.kept(key.split(".")[-1], task.index)
        return stored

    def precision(self) -> torch.Tensor:
        """Inverse of the shrunk pooled within-class covariance (float64), cached until a task is added."""
        return self.gaussian.precision()

    def _class_cholesky(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cholesky factors ``[classes, D, D]`` of every class's regularised covariance and their log-determinants."""
        tasks = self.gaussian.indices
        key = (self.n_tasks, self.gaussian.means(tasks[0]).device)
        if self._class_factors is None or self._class_factors[0] != key:
            pooled = self.gaussian.covariance()
            scatters = self.kept_together("class_scatter", tasks).double()
            counts = self.kept_together("class_count", tasks).double()
            own = scatters / counts.clamp_min(1.0)[:, None, None]
            mixed = (1 - self.class_mix) * own + self.class_mix * pooled
            factors = torch.linalg.cholesky(torch.stack([shrink(c, self.gaussian.effective_shrinkage())
                                                         for c in mixed]))
            log_det = 2 * torch.log(torch.diagonal(factors, dim1=1, dim2=2)).sum(dim=1)
            self._class_factors = (key, factors, log_det)
        return self._class_factors[1], self._class_factors[2]

    @torch.no_grad()
    def class_scores(self, features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """``[batch, classes]`` score of every class for frozen ``features`` (float64 log-likelihoods, or scaled
        cosines)."""
        means = torch.cat([self.gaussian.means(i) for i in self.gaussian.indices])
        if self.kind == "cosine":
            return (logit_scale.float() * features.float() @ F.normalize(means.float(), dim=-1).T).double()
        if self.kind == "class-covariance":
            factors, log_det = self._class_cholesky()
            diff = features.double()[None] - means.double()[:, None]  # [classes, batch, D]
            solved = torch.linalg.solve_triangular(factors, diff.transpose(1, 2), upper=False)  # L^-1 (x - mu)
            return (-0.5 * solved.pow(2).sum(dim=1) - 0.5 * log_det[:, None]).T
        return self.gaussian.log_likelihoods(features)

    @torch.no_grad()
    def task_scores(self, features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """``[batch, tasks]`` log-scores of the best class of each task for frozen ``features``."""
        return self.gaussian.best_per_task(self.class_scores(features, logit_scale)).float()

    def weights(self, features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """``[batch, tasks]`` softmax of :meth:`task_scores`: how strongly each image belongs to each task."""
        return self.task_scores(features, logit_scale).softmax(dim=1)


class AdaptedSpaces(PerTaskBuffers):
    """Each task's classes as the task's own adapter sees them, and how well its own images fit there.

    Per task: the class means and within-class scatter of its training images encoded with its adapter, their
    count, and the mean and standard deviation of their *fit* (the log-likelihood of the best class under the
    task's within-class covariance, shrunk toward a scaled identity by ``shrinkage``). :meth:`fit` puts any image's
    fit in those units, so that tasks whose spaces differ become comparable.
    """

    MEANS_KEY = "router.adapted_means"
    SCATTER_KEY = "router.adapted_scatter"
    COUNT_KEY = "router.adapted_count"
    FIT_KEY = "router.adapted_fit"  # [mean, std] of the fit of the task's own training images
    KEYS = (MEANS_KEY, SCATTER_KEY, COUNT_KEY, FIT_KEY)

    def __init__(self, shrinkage: float) -> None:
        super().__init__()
        self.shrinkage = shrinkage
        self.n_tasks = 0
        self.last_index = 0  # numbers rise but may skip a removed task's
        self._precisions: dict[tuple[int, torch.device], torch.Tensor] = {}

    def statistics(self, features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict[str, torch.Tensor]:
        """A task's statistics from its training images encoded with its adapter (labels 0..n_classes-1)."""
        stats = PooledGaussian("", self.shrinkage).statistics(features, labels, n_classes)
        means, scatter, count = stats["feature_means"], stats["scatter"], stats["count"]
        precision = torch.linalg.inv(shrink(scatter.double() / float(count), self.shrinkage))
        fit = gaussian_log_likelihoods(features, means, precision).max(dim=1).values
        spread = fit.std() if len(fit) > 1 else torch.ones((), dtype=fit.dtype, device=fit.device)
        return {self.MEANS_KEY: means, self.SCATTER_KEY: scatter, self.COUNT_KEY: count,
                self.FIT_KEY: torch.stack([fit.mean(), spread.clamp_min(1e-6)]).float()}

    def add(self, task: TaskInfo, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """Add a task's statistics (the dict :meth:`statistics` made, or its stored copy)."""
        if task.index <= self.last_index:
            raise ValueError(f"adapted-space statistics of task {task.index} added out of order")
        missing = [key for key in self.KEYS if key not in tensors]
        if missing:
            raise ValueError(f"task {task.index} lacks the adapted-space statistics {', '.join(missing)}")
        for key in self.KEYS:
            self.keep(self._name(key), task.index, tensors[key].to(device))
        self.n_tasks += 1
        self.last_index = task.index

    @staticmethod
    def _name(key: str) -> str:
        return key.split(".")[-1]

    def _kept(self, key: str, index: int) -> torch.Tensor:
        return self.kept(self._name(key), index)

    def tensors(self, task: TaskInfo) -> dict[str, torch.Tensor]:
        return {key: self._kept(key, task.index) for key in self.KEYS}

    def precision(self, index: int) -> torch.Tensor:
        """Inverse of task ``index``'s shrunk within-class covariance in its adapted space (float64), cached."""
        scatter = self._kept(self.SCATTER_KEY, index)
        key = (index, scatter.device)
        if key not in self._precisions:
            count = float(self._kept(self.COUNT_KEY, index))
            self._precisions[key] = torch.linalg.inv(shrink(scatter.double() / max(count, 1.0), self.shrinkage))
        return self._precisions[key]

    @torch.no_grad()
    def class_log_likelihoods(self, index: int, features: torch.Tensor) -> torch.Tensor:
        """``[batch, classes of task index]`` log-likelihoods of adapted ``features`` (up to a shared constant)."""
        return gaussian_log_likelihoods(features, self._kept(self.MEANS_KEY, index), self.precision(index))

    def fit(self, index: int, log_likelihoods: torch.Tensor) -> torch.Tensor:
        """``[batch]``: the best class's log-likelihood (from :meth:`class_log_likelihoods`) in units of the spread
        of task ``index``'s own training images' fit."""
        mean, std = self._kept(self.FIT_KEY, index).double()
        return (log_likelihoods.max(dim=1).values - mean) / std
