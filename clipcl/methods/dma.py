"""``dma``: dual-modality adaptation (Chen et al., Neural Networks 2025); docs/methods.md.

Each task gets its own LoRA on the image encoder's attention projections (a named peft adapter, frozen once the task
ends) and one learnable context per class, fed through the frozen text encoder (CoOp with class-specific context).
Training is cross-entropy over every class seen so far: earlier classes enter through their frozen prompts, whose
text features are computed once when the task begins, so only the current task's LoRA and prompts get gradients.
The defaults, 10 epochs at lr 3e-3, were chosen on validation images of the three benchmarks of ../shared/bench
(two-task probes of lr 1e-3 / 3e-3 / 1e-2 and 5 / 10 epochs, BENCHMARKS.md): at the former 5 epochs and 1e-3 a
task's LoRA and prompts classified its own classes worse than a linear discriminant on frozen features did.

Inference is task-aware (:mod:`clipcl.methods.routing`). One pass of the frozen encoder scores every class of
every task by its Gaussian log-likelihood (class means and one within-class covariance pooled over all tasks,
Ledoit-Wolf shrinkage) and picks each image's ``route`` most likely tasks (2 by default); only their LoRAs run, so
an image costs ``route + 1`` encoder passes however many tasks there are (``--route all``: every task's). With
``router=combined`` (the default) each candidate class's score adds to its frozen log-likelihood its task's
adapter evidence: the log-softmax of CLIP's logits under the task's LoRA, the log-softmax of the class Gaussians in
the task's own adapted space, and the image's fit to that space in units of the spread of the task's own images.
Each task stores, beside its LoRA and prompts, its frozen class means and within-class scatter and the same
statistics in its adapted space (``2 x D x D`` + ``2 x C x D`` numbers: 0.5 MiB at D = 256).

Why this combination (every choice on validation images, BENCHMARKS.md): the frozen router of the first versions
(its softmax over tasks weighting each task's softmax over all classes) left dma at or below ``lda``, the
training-free classifier made of the frozen part alone; the adapted-space fit alone (``router=adapted``, the
task-incremental-plus-out-of-distribution view of Kim et al. 2022 and TPL 2024) picks the task less often than the
frozen log-likelihood on these models, because every task's LoRA maps foreign images into its own classes; the sum
of both kinds of evidence beats each. ``route=2`` is as accurate as running every task's LoRA on the validation
images. ``router=mahalanobis`` (and ``cosine``, ``class-covariance``) keep the weighted vote, with every
task's LoRA for workspaces made before routing by default: those keep predicting as they did.

The context is initialised from the embedding of ``context_init`` ("a photo of a") in its last positions; positions
beyond the phrase's length start as N(0, 0.02) (CoOp's random initialisation). With ``context_tokens`` equal to the
phrase's length the initial prompts reproduce zero-shot CLIP exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..errors import ClipclError
from .base import FROZEN_IMAGE_EMBEDDING, ROUTE_ALL, Method, Prediction, Route, TaskInfo, register_method
from .catalog import builtin_summary
from .components import ClassPrompts, ImageLoRA, LoraPromptConfig, check_shrinkage, shrinkage_value
from .routing import AdaptedSpaces, TaskRouter

ROUTERS = ("combined", "adapted", "mahalanobis", "class-covariance", "cosine")
VOTING_ROUTERS = ("mahalanobis", "class-covariance", "cosine")  # the frozen router's weighted vote


@dataclass
class DMAConfig(LoraPromptConfig):
    """dma's options: each task's LoRA and its classes' prompts, and how inference weighs the tasks."""

    router: str = field(default="combined", metadata={
        "help": "task-aware inference: combined (frozen class log-likelihoods + each candidate task's adapter "
                "evidence), adapted (tasks weighted by the image's fit in each task's own adapted space), "
                "mahalanobis (tasks weighted by the frozen Gaussian router), class-covariance (the same with each "
                "class's own covariance mixed in), or cosine"})
    router_shrinkage: str = field(default="auto", metadata={
        "help": "shrinkage of the frozen router's pooled covariance: auto (Ledoit-Wolf) or a number in (0, 1]"})
    adapted_shrinkage: float = field(default=0.1, metadata={
        "help": "shrinkage of each task's covariance in its adapted space (routers combined and adapted)"})
    text_weight: float = field(default=1.0, metadata={
        "help": "combined: weight of the adapter's CLIP log-probabilities within its task"})
    adapted_weight: float = field(default=1.0, metadata={
        "help": "combined: weight of the adapted-space Gaussian log-probabilities within the task"})
    fit_weight: float = field(default=1.0, metadata={
        "help": "combined: weight of the image's normalised fit to the task in its adapted space"})
    class_mix: float = field(default=0.9, metadata={
        "help": "class-covariance: weight of the pooled covariance in each class's (1 = mahalanobis)"})
    route: int = field(default=2, metadata={
        "help": "adapters run per image by default (the best-matching tasks'; 0 = every task's); --route overrides"})

    # workspaces made before an option existed keep what it did then: every task's adapter ran
    stored_defaults: ClassVar[dict] = {"route": 0}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.router not in ROUTERS:
            raise ClipclError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        self.router_shrinkage = check_shrinkage(self.router_shrinkage, "router_shrinkage")
        if not 0 < self.adapted_shrinkage <= 1:
            raise ClipclError("needs 0 < adapted_shrinkage <= 1")
        if not 0 <= self.class_mix <= 1:
            raise ClipclError("needs 0 <= class_mix <= 1")
        if min(self.text_weight, self.adapted_weight, self.fit_weight) < 0:
            raise ClipclError("text_weight, adapted_weight and fit_weight cannot be negative")
        if self.route < 0:
            raise ClipclError("route is a number of tasks (0 = every task)")

    @property
    def uses_adapted_space(self) -> bool:
        return self.router in ("combined", "adapted")


@register_method
class DMA(Method):
    name = "dma"
    config_class = DMAConfig
    default_epochs = 10
    default_lr = 3e-3
    summary = builtin_summary("dma")
    routes_tasks = True
    independent_tasks = True  # each task's LoRA, prompts and statistics are its own; the router pools at restore
    inference_options = ("router", "router_shrinkage", "text_weight", "adapted_weight", "fit_weight", "class_mix",
                         "route")

    config: DMAConfig

    def __init__(self, backbone: Backbone, config: DMAConfig) -> None:
        super().__init__(backbone, config)
        self.lora = ImageLoRA(self.clip.visual, config.lora())
        self.prompts = ClassPrompts(backbone, config.context_tokens, config.context_init)
        frozen_kind = config.router if config.router in VOTING_ROUTERS else "mahalanobis"
        self.router = TaskRouter(frozen_kind, shrinkage_value(config.router_shrinkage), config.class_mix)
        self.adapted = AdaptedSpaces(config.adapted_shrinkage)

    @staticmethod
    def adapter_name(task: TaskInfo) -> str:
        return f"task-{task.index}"

    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self.lora.add(self.adapter_name(task))
        self.lora.load(self.adapter_name(task), tensors)
        self.router.add(task, tensors, self.device)
        if self.config.uses_adapted_space:
            try:
                self.adapted.add(task, tensors, self.device)
            except ValueError as exc:
                raise ValueError(f"{exc}; it was stored without them (router {self.config.router} needs them)"
                                 ) from exc
        self.prompts.add(task, tensors)

    def begin_task(self, task: TaskInfo) -> None:
        self.lora.add(self.adapter_name(task))
        self.prompts.add(task)

    def trainable_parameters(self) -> list[nn.Parameter]:
        current = self.tasks[-1]
        return [*self.lora.parameters_of(self.adapter_name(current)), self.prompts.context(current)]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        current = self.tasks[-1]
        image_features = self.backbone.encode_images(images)
        text_features = torch.cat([*map(self.prompts.cached, self.tasks[:-1]), self.prompts.encode(current)])
        logits = self.backbone.logit_scale() * image_features @ text_features.T
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def end_task(self, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Cache the task's text features; gather its classes' statistics in the frozen space (the router) and,
        for the routers that use them, in its own adapted space (the LoRA that just trained is the active one)."""
        self.prompts.freeze(task)
        frozen, adapted, labels = [], [], []
        for images, batch_labels in batches:
            images = images.to(self.device)
            with self.lora.disabled():
                frozen.append(self.backbone.encode_images(images).float())
            if self.config.uses_adapted_space:
                adapted.append(self.backbone.encode_images(images).float())
            labels.append(batch_labels.to(self.device) - task.offset)
        targets = torch.cat(labels)
        self.router.add(task, self.router.statistics(torch.cat(frozen), targets, len(task.classes)), self.device)
        if self.config.uses_adapted_space:
            self.adapted.add(task, self.adapted.statistics(torch.cat(adapted), targets, len(task.classes)),
                             self.device)

    def task_tensors(self) -> dict[str, torch.Tensor]:
        task = self.tasks[-1]
        adapted = self.adapted.tensors(task) if self.config.uses_adapted_space else {}
        return {**self.lora.state(self.adapter_name(task)), **self.prompts.tensors(task), **self.router.tensors(task),
                **adapted}

    # --- inference ------------------------------------------------------------------------------------------------
    def route_size(self, route: Route) -> int:
        """How many tasks' adapters run per image: ``route`` (``None``: the workspace's default)."""
        n_tasks = len(self.tasks)
        if route is None:
            route = self.config.route or ROUTE_ALL
        return n_tasks if route == ROUTE_ALL else max(1, min(int(route), n_tasks))

    def frozen_features_key(self) -> str:
        """The router's input is the frozen model's image embedding: the same for every task, so kept across
        evaluations (:meth:`Method.frozen_features_key`)."""
        return FROZEN_IMAGE_EMBEDDING

    @torch.no_grad()
    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised image features of the frozen encoder (every LoRA off): what the router scores."""
        with self.lora.disabled():
            return self.backbone.encode_images(images).float()

    @torch.no_grad()
    def task_weights(self, images: torch.Tensor) -> torch.Tensor:
        """``[batch, tasks]``: the frozen router's belief in each task, from one pass of the frozen image encoder."""
        return self.router.weights(self.frozen_features(images), self.backbone.logit_scale())

    @torch.no_grad()
    def candidates(self, frozen: torch.Tensor, route: Route = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen router's class scores ``[batch, classes]`` and which tasks' adapters each image needs: the
        ``route`` best tasks by their best class (``[batch, tasks]`` mask)."""
        class_scores = self.router.class_scores(frozen, self.backbone.logit_scale())
        task_scores = self.router.gaussian.best_per_task(class_scores)
        best = task_scores.topk(self.route_size(route), dim=1).indices
        return class_scores, torch.zeros_like(task_scores, dtype=torch.bool).scatter_(1, best, True)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, route: Route = None, frozen: torch.Tensor | None = None) -> Prediction:
        """One frozen pass picks each image's ``route`` most likely tasks, whose adapters then score their classes
        (:meth:`combine`; see :mod:`clipcl.methods.routing`). ``frozen``: :meth:`frozen_features` of ``images``
        computed earlier, which leaves only the adapters' passes to run (counted as ``route + 1`` all the same)."""
        if frozen is None:
            frozen = self.frozen_features(images)
        class_scores, selected = self.candidates(frozen, route)
        branches: dict[int, torch.Tensor] = {}
        passes = len(images)
        try:
            for i, task in enumerate(self.tasks):
                rows = selected[:, i].nonzero().squeeze(1)
                if rows.numel():
                    self.lora.select(self.adapter_name(task))  # cheap switch; peft's full one once, below
                    branches[i] = self.backbone.encode_images(images[rows]).float()
                    passes += len(rows)
        finally:
            self.lora.activate(self.adapter_name(self.tasks[-1]))
        prediction = self.combine(class_scores, selected, branches)
        prediction.encoder_passes = passes
        return prediction

    @torch.no_grad()
    def combine(self, class_scores: torch.Tensor, selected: torch.Tensor, branches: dict[int, torch.Tensor]
                ) -> Prediction:
        """The answer from the frozen class scores and each selected task's adapted features (``branches[i]``: the
        features of the rows ``selected[:, i]`` under task i's LoRA), as :attr:`config` says to weigh them."""
        cfg = self.config
        scale = self.backbone.logit_scale()
        text_features = self.prompts.features(self.tasks)
        task_scores = self.router.gaussian.best_per_task(class_scores)
        vote_weights = task_scores.float().softmax(dim=1)
        scores = torch.full_like(class_scores, -torch.inf)
        fits = torch.full_like(task_scores, -torch.inf)
        for i, features in branches.items():
            task = self.tasks[i]
            rows = selected[:, i].nonzero().squeeze(1)
            classes = task.class_slice
            logits = (scale * features @ text_features.T.to(features.dtype)).double()
            if cfg.router in VOTING_ROUTERS:  # the frozen router's weighted vote, as in the first versions
                probs = logits.softmax(dim=-1)[:, classes]
                scores[rows, classes] = (vote_weights[rows, i : i + 1].double() * probs).log()
                continue
            likelihoods = self.adapted.class_log_likelihoods(task.index, features)
            fits[rows, i] = self.adapted.fit(task.index, likelihoods)
            if cfg.router == "adapted":
                scores[rows, classes] = logits.log_softmax(dim=-1)[:, classes]
            else:
                scores[rows, classes] = (class_scores[rows, classes]
                                         + cfg.text_weight * logits[:, classes].log_softmax(dim=-1)
                                         + cfg.adapted_weight * likelihoods.log_softmax(dim=-1)
                                         + cfg.fit_weight * fits[rows, i : i + 1])
        if cfg.router == "adapted":
            scores = scores + torch.repeat_interleave(fits.log_softmax(dim=1), self._class_counts(), dim=1)
        if cfg.router in VOTING_ROUTERS:
            belief = vote_weights
        else:
            belief = self.router.gaussian.best_per_task(scores).softmax(dim=1).float()
        return Prediction(scores.softmax(dim=1).float(), task_scores=belief)

    def _class_counts(self) -> torch.Tensor:
        return torch.tensor([len(task.classes) for task in self.tasks], device=self.device)

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images).probs
