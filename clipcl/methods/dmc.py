"""``dmc`` and ``dmc-ot``: decoupled modality training (Chen et al., arXiv 2511.10974); docs/methods.md.

Each task trains in two stages, each with the other modality frozen:

1. **image encoder** - one LoRA on the image encoder, shared by every task and updated in each, learns with
   cross-entropy over the current task's classes against their frozen text features (computed once from the
   current prompts). Afterwards the mean and covariance of the new classes' image features are stored.
2. **text prompts** - the image encoder is frozen; one soft context shared by all classes (M tokens, from
   "a photo of a") learns with cross-entropy over every class seen so far: the current classes from their images'
   features, the old classes from features drawn from their stored Gaussians (``replay_ratio`` old-class draws per
   image). The text side is where old and new classes are separated again after stage 1 moved the images.

``dmc-ot`` adds two things. After stage 1, the old classes' statistics describe the encoder before the update, so
they are calibrated: the task's images encoded before and after stage 1 give drift vectors, an entropic optimal
transport plan (POT's Sinkhorn) matches samples of each old class to the pre-update features, and each sample moves
by the plan-weighted drift (:func:`clipcl.methods.gaussian.calibrate`). And every task gets K task-specific prompt
tokens, placed before the shared context of its classes and trained in its stage 2 only.

Inference is one pass: the image through the shared LoRA, against every class's prompt.

What keeps the statistics true while the encoder moves, and gives stage 2 room to separate classes (issue 17,
BENCHMARKS.md):

* ``adapt=first``: stage 1 trains in the first task only; afterwards the encoder never moves, so every stored
  Gaussian stays exact and replay draws what the encoder really produces; ``adapt=none`` never trains it;
* ``later_lr`` and ``feature_kd``: stage 1 of later tasks at a share of the rate, with a distillation of the image
  features toward the encoder as it stood before the task (``1 - cos``, zero while the LoRA has not moved);
* ``class_residual``: a learned residual per class added to its prompt's text feature (zero at first, every class's
  trained in every stage 2 against the replayed old classes, all stored with each task): each class gets its own
  capacity beside the shared context;
* ``replay=balanced``: each stage-2 batch replays a few old classes (``replay_classes``) with many draws each,
  instead of one draw of a random class per image;
* dmc-ot's ``calibration=linear``: the old-to-new feature map is fitted on the task's paired features by ridge
  least squares toward the identity (as AdaGauss learns one) and carries every old class's mean and covariance;
  ``calibration=ot`` is the plan-weighted drift of the paper.

Why stage 1 sees only the current classes (the paper: "the frozen text features of the current prompts"):
with the old classes' text features among the negatives, the shared LoRA learns to push every image away from
the old classes, and stage 2 cannot undo it from replayed statistics. On split-imagenette that left old tasks at
0.0-1.9% after each new task (dmc Avg / Last 38.70 / 17.73, below naive fine-tuning's 44.83 / 16.92).

A task stores the shared LoRA and shared context as they stood after it, its task tokens, and the statistics it
changed: its own classes' for ``dmc``, every class's (calibrated) for ``dmc-ot``. No task file is rewritten.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..errors import ClipclError
from .base import HybridClassifierConfig, Method, TaskInfo, hybrid_probabilities, register_method
from .catalog import builtin_summary
from .components import ImageLoRA, LoraPromptConfig, SharedPrompt
from .gaussian import COVARIANCE_KINDS, GaussianBank, calibrate, estimate, fit_linear_map, map_gaussian

SHARED_ADAPTER = "shared"
PREVIOUS_ADAPTER = "previous"
IMAGE_STAGE = "stage 1 (image encoder)"
TEXT_STAGE = "stage 2 (text prompts)"
CLASS_RESIDUAL_KEY = "dmc.class_residual"
ADAPT_WHEN = ("every", "first", "none")
REPLAY_KINDS = ("uniform", "balanced")
CALIBRATIONS = ("ot", "linear")
CURRENT_FROM = ("images", "statistics")
REPLAY_PER = ("image", "class")


@dataclass
class DMCConfig(LoraPromptConfig, HybridClassifierConfig):
    """dmc's options: the shared LoRA and context, the class statistics, and replay."""

    # workspaces made before an option keep training as they started
    stored_defaults: ClassVar[dict[str, Any]] = {"adapt": "every", "later_lr": 1.0, "feature_kd": 0.0,
                                                 "class_residual": False, "replay": "uniform", "calibration": "ot",
                                                 "current_from": "images", "replay_per": "image",
                                                 "classifier": "text"}

    cov: str = field(default="full", metadata={"help": "class covariance: full (shrunk) or diag"})
    shrinkage: float = field(default=0.1, metadata={"help": "shrinkage of each full class covariance toward "
                                                            "a scaled identity"})
    replay_ratio: float = field(default=1.0, metadata={"help": "old-class samples per image in a stage-2 step"})
    task_tokens: int = field(default=0, metadata={"help": "task-specific prompt tokens per task (K)"})
    ot_samples: int = field(default=256, metadata={"help": "samples per old class in the OT calibration"})
    ot_reg: float = field(default=0.05, metadata={"help": "entropic regularisation of the OT plan"})
    ot_relaxation: float = field(default=0.1, metadata={"help": "KL weight of the OT plan's feature marginal "
                                                                "(inf: balanced OT)"})
    adapt: str = field(default="first", metadata={
        "help": "tasks whose stage 1 trains the shared LoRA: 'every', 'first' (later statistics never drift) or "
                "'none' (the frozen encoder: every statistic stays exact)"})
    later_lr: float = field(default=1.0, metadata={
        "help": "stage-1 learning rate of every task after the first, as a share of the first task's"})
    feature_kd: float = field(default=0.0, metadata={
        "help": "stage 1: weight of the distillation of image features toward the encoder before the task"})
    class_residual: bool = field(default=False, metadata={
        "help": "stage 2: a learned residual per class on its text feature, beside the shared context"})
    replay: str = field(default="uniform", metadata={
        "help": "stage-2 replay: 'uniform' (a random old class per draw) or 'balanced' (replay_classes old classes "
                "a batch, equally many draws each)"})
    replay_classes: int = field(default=8, metadata={"help": "replay=balanced: old classes replayed per batch"})
    replay_per: str = field(default="image", metadata={
        "help": "replay_ratio counts draws per 'image' of the batch, or per 'class': each old class drawn as often "
                "as a current class has images in the batch, so old and new classes weigh alike in the loss"})
    current_from: str = field(default="statistics", metadata={
        "help": "stage 2: the current classes' features from their 'images' or drawn from their 'statistics', as "
                "the old classes' are (both sides of the comparison then come from the same kind of Gaussian)"})
    calibration: str = field(default="ot", metadata={
        "help": "dmc-ot: how old statistics follow the encoder: 'ot' (plan-weighted drift) or 'linear' (a ridge "
                "least-squares feature map fitted on the task's paired features)"})
    map_ridge: float = field(default=0.1, metadata={"help": "calibration=linear: pull of the map toward identity"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapt not in ADAPT_WHEN or self.replay not in REPLAY_KINDS or self.calibration not in CALIBRATIONS:
            raise ClipclError(f"adapt must be one of {', '.join(ADAPT_WHEN)}, replay one of "
                              f"{', '.join(REPLAY_KINDS)} and calibration one of {', '.join(CALIBRATIONS)}")
        if self.replay_per not in REPLAY_PER:
            raise ClipclError(f"replay_per must be one of {', '.join(REPLAY_PER)}, got {self.replay_per!r}")
        if self.current_from not in CURRENT_FROM:
            raise ClipclError(f"current_from must be one of {', '.join(CURRENT_FROM)}, got {self.current_from!r}")
        if not 0 < self.later_lr <= 1 or self.feature_kd < 0 or self.replay_classes < 1 or self.map_ridge < 0:
            raise ClipclError("needs 0 < later_lr <= 1, feature_kd >= 0, replay_classes >= 1 and map_ridge >= 0")
        if self.cov not in COVARIANCE_KINDS:
            raise ClipclError(f"cov must be one of {', '.join(COVARIANCE_KINDS)}, got {self.cov!r}")
        if not 0 <= self.shrinkage <= 1 or self.replay_ratio < 0 or not 0 <= self.task_tokens <= 16:
            raise ClipclError("needs 0 <= shrinkage <= 1, replay_ratio >= 0 and 0 <= task_tokens <= 16")
        if self.ot_samples < 2 or not self.ot_reg > 0 or not self.ot_relaxation > 0:
            raise ClipclError("needs ot_samples >= 2, ot_reg > 0 and ot_relaxation > 0")


@dataclass
class DMCOTConfig(DMCConfig):
    """dmc-ot's options: dmc's, with K = 4 task-specific prompt tokens by default."""

    task_tokens: int = field(default=4, metadata={"help": "task-specific prompt tokens per task (K)"})
    calibration: str = field(default="linear", metadata={
        "help": "how old statistics follow the encoder after a stage 1 that moved it: 'linear' (a ridge least-squares "
                "feature map fitted on the task's paired features) or 'ot' (the paper's plan-weighted drift)"})


@register_method
class DMC(Method):
    name = "dmc"
    config_class = DMCConfig
    default_epochs = 5
    default_lr = 1e-3
    summary = builtin_summary("dmc")
    stages = (IMAGE_STAGE, TEXT_STAGE)
    inference_options = ("classifier", "text_weight")
    calibrates = False  # dmc-ot: move old class statistics by the encoder's drift after stage 1

    config: DMCConfig

    def __init__(self, backbone: Backbone, config: DMCConfig) -> None:
        super().__init__(backbone, config)
        self.lora = ImageLoRA(self.clip.visual, config.lora())
        self.prompt = SharedPrompt(backbone, config.context_tokens, config.context_init, config.task_tokens)
        self.bank = GaussianBank()
        self.stage = IMAGE_STAGE
        self.changed: list[int] = []  # classes whose statistics this task set
        self.stage1_text: torch.Tensor | None = None
        # with class_residual: [classes so far, dim], every class's residual; trained in every task's stage 2
        width = backbone.encode_texts(["a"]).shape[-1] if config.class_residual else 0
        self.class_residual = nn.Parameter(torch.zeros(0, width, device=self.device), requires_grad=False)
        self.calibration_report: dict[str, Any] = {}

    # --- tasks ----------------------------------------------------------------------------------------------------
    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self.lora.ensure(SHARED_ADAPTER)
        self.lora.load(SHARED_ADAPTER, tensors)
        self.prompt.add(task, tensors)
        self.bank.load(tensors, self.device)
        if self.config.class_residual:
            residual = tensors[CLASS_RESIDUAL_KEY]
            if residual.shape != (len(self.classes), self.class_residual.shape[1]):
                raise ValueError(f"task {task.index}'s class residuals have shape {tuple(residual.shape)}")
            self.class_residual = nn.Parameter(residual.float().to(self.device), requires_grad=False)

    def begin_task(self, task: TaskInfo) -> None:
        self.lora.ensure(SHARED_ADAPTER)
        self.prompt.add(task)
        self.changed = []
        self.calibration_report = {}
        if self.config.class_residual:
            new = torch.zeros(len(task.classes), self.class_residual.shape[1], device=self.device)
            self.class_residual = nn.Parameter(torch.cat([self.class_residual.detach(), new]), requires_grad=False)
        if (self.calibrates or self.config.feature_kd) and self.adapts():
            # keep the encoder as it is now: to measure its drift, and as the features' distillation teacher
            self.lora.ensure(PREVIOUS_ADAPTER)
            self.lora.load(PREVIOUS_ADAPTER, self.lora.state(SHARED_ADAPTER))
            self.lora.activate(SHARED_ADAPTER)

    def adapts(self) -> bool:
        """Whether stage 1 of the current task trains the shared LoRA, and it held earlier tasks before."""
        return len(self.tasks) > 1 and self.config.adapt == "every"

    def learning_rate_scale(self) -> float:
        return self.config.later_lr if self.stage == IMAGE_STAGE and len(self.tasks) > 1 else 1.0

    def begin_stage(self, stage: str) -> None:
        self.stage = stage
        if stage == IMAGE_STAGE:
            with torch.no_grad():
                self.stage1_text = self.prompt.encode([self.tasks[-1]]).detach()

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.stage == IMAGE_STAGE:
            if self.config.adapt == "none" or (len(self.tasks) > 1 and self.config.adapt == "first"):
                return []  # the encoder stays as it is (frozen, or as task 1 left it)
            return self.lora.parameters_of(SHARED_ADAPTER)
        task_context = self.prompt.task_context(self.tasks[-1])
        residuals = [self.class_residual] if self.config.class_residual else []
        return [self.prompt.shared, *([task_context] if task_context.numel() else []), *residuals]

    def class_text(self) -> torch.Tensor:
        """Every class's text feature: its prompt's, plus its own residual with ``class_residual``."""
        text = self.prompt.encode()
        if not self.config.class_residual:
            return text
        return F.normalize(text + self.class_residual.to(text.dtype), dim=-1)

    def replay_labels(self, n_replay: int, old_classes: int, device: torch.device) -> torch.Tensor:
        """Old classes to draw for one stage-2 batch: uniform, or ``replay_classes`` classes equally often."""
        if self.config.replay == "uniform":
            return torch.randint(old_classes, (n_replay,)).to(device)
        chosen = torch.randperm(old_classes)[: min(self.config.replay_classes, old_classes)]
        return chosen.repeat(n_replay // len(chosen) + 1)[:n_replay].to(device)

    # --- training -------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        scale = self.backbone.logit_scale()
        if self.stage == IMAGE_STAGE:
            assert self.stage1_text is not None
            features = self.backbone.encode_images(images)
            loss = F.cross_entropy(scale * features @ self.stage1_text.T, labels - self.tasks[-1].offset)
            if self.config.feature_kd and self.adapts():
                loss = loss + self.config.feature_kd * self.feature_distillation(images, features)
            return loss
        if self.config.current_from == "statistics":
            features = F.normalize(self.bank.draw(labels), dim=-1)
        else:
            with torch.no_grad():
                features = self.backbone.encode_images(images)
        old_classes = self.tasks[-1].offset
        per_class = old_classes / len(self.tasks[-1].classes) if self.config.replay_per == "class" else 1.0
        n_replay = round(self.config.replay_ratio * len(images) * per_class) if old_classes else 0
        if n_replay:
            replay_labels = self.replay_labels(n_replay, old_classes, labels.device)
            replayed = F.normalize(self.bank.draw(replay_labels).to(features.dtype), dim=-1)
            features = torch.cat([features, replayed])
            labels = torch.cat([labels, replay_labels])
        return F.cross_entropy(scale * features @ self.class_text().T, labels)

    def feature_distillation(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Mean ``1 - cos`` between ``features`` and the same images' features under the encoder as it stood before
        the task: zero while the shared LoRA has not moved."""
        with torch.no_grad():
            self.lora.activate(PREVIOUS_ADAPTER)
            try:
                teacher = self.backbone.encode_images(images)
            finally:
                self.lora.activate(SHARED_ADAPTER)
        return (1 - F.cosine_similarity(features.float(), teacher.float(), dim=-1)).mean()

    @torch.no_grad()
    def end_stage(self, stage: str, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """After stage 1: the new classes' statistics under the updated encoder, and for ``dmc-ot`` the calibration
        of every old class by the drift between the encoder before and after the stage."""
        task = self.tasks[-1]
        calibrating = self.calibrates and self.adapts()
        new, old, labels = [], [], []
        for images, batch_labels in batches:
            images = images.to(self.device)
            new.append(self.backbone.encode_images(images).float())
            if calibrating:
                self.lora.activate(PREVIOUS_ADAPTER)
                old.append(self.backbone.encode_images(images).float())
                self.lora.activate(SHARED_ADAPTER)
            labels.append(batch_labels.to(self.device) - task.offset)
        features, label = torch.cat(new), torch.cat(labels)
        for c in range(len(task.classes)):
            self.bank.set(task.offset + c, estimate(features[label == c], self.config.cov, self.config.shrinkage))
        self.changed = list(range(task.offset, task.offset + len(task.classes)))
        if calibrating:
            before = torch.cat(old)
            if self.config.calibration == "linear":
                weight, bias = fit_linear_map(before, features, self.config.map_ridge)
                for c in range(task.offset):
                    self.bank.set(c, map_gaussian(self.bank.classes[c], weight, bias))
                residual = (before @ weight.T + bias - features).norm(dim=-1).mean()
                self.calibration_report = {"map_residual": round(float(residual), 4),
                                           "mean_drift": round(float((features - before).norm(dim=-1).mean()), 4)}
            else:
                drift = features - before
                for c in range(task.offset):
                    self.bank.set(c, calibrate(self.bank.classes[c], before, drift, self.config.ot_samples,
                                               self.config.ot_reg, self.config.ot_relaxation, self.config.shrinkage))
            self.changed = list(range(task.offset + len(task.classes)))

    def end_task(self, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.stage1_text = None

    def task_tensors(self) -> dict[str, torch.Tensor]:
        residuals = {CLASS_RESIDUAL_KEY: self.class_residual.detach()} if self.config.class_residual else {}
        return {**self.lora.state(SHARED_ADAPTER), **self.prompt.tensors(self.tasks[-1]),
                **self.bank.tensors(self.changed), **residuals}

    def task_metadata(self, task: TaskInfo) -> dict[str, Any]:
        return {"statistics": self.config.cov, "statistics_classes": len(self.changed),
                "statistics_bytes_per_class": self.bank.stored_bytes(self.changed[0]), **self.calibration_report}

    # --- inference ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        return hybrid_probabilities(self.backbone, images, self.inference_text(self.class_text), self.config,
                                    lambda features: self.bank.log_likelihoods(features, len(self.classes)))


@register_method
class DMCOT(DMC):
    name = "dmc-ot"
    config_class = DMCOTConfig
    summary = builtin_summary("dmc-ot")
    calibrates = True
