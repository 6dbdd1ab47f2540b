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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..errors import ClipclError
from .base import Method, TaskInfo, clip_probabilities, register_method
from .components import ImageLoRA, LoraPromptConfig, SharedPrompt
from .gaussian import COVARIANCE_KINDS, GaussianBank, calibrate, estimate

SHARED_ADAPTER = "shared"
PREVIOUS_ADAPTER = "previous"
IMAGE_STAGE = "stage 1 (image encoder)"
TEXT_STAGE = "stage 2 (text prompts)"


@dataclass
class DMCConfig(LoraPromptConfig):
    """dmc's options: the shared LoRA and context, the class statistics, and replay."""

    cov: str = field(default="full", metadata={"help": "class covariance: full (shrunk) or diag"})
    shrinkage: float = field(default=0.1, metadata={"help": "shrinkage of each full class covariance toward "
                                                            "a scaled identity"})
    replay_ratio: float = field(default=1.0, metadata={"help": "old-class samples per image in a stage-2 step"})
    task_tokens: int = field(default=0, metadata={"help": "task-specific prompt tokens per task (K)"})
    ot_samples: int = field(default=256, metadata={"help": "samples per old class in the OT calibration"})
    ot_reg: float = field(default=0.05, metadata={"help": "entropic regularisation of the OT plan"})
    ot_relaxation: float = field(default=0.1, metadata={"help": "KL weight of the OT plan's feature marginal "
                                                                "(inf: balanced OT)"})

    def __post_init__(self) -> None:
        super().__post_init__()
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


@register_method
class DMC(Method):
    name = "dmc"
    config_class = DMCConfig
    default_epochs = 5
    default_lr = 1e-3
    summary = "two stages per task: shared LoRA on images, then a shared text prompt with Gaussian replay"
    stages = (IMAGE_STAGE, TEXT_STAGE)
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

    # --- tasks ----------------------------------------------------------------------------------------------------
    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self.lora.ensure(SHARED_ADAPTER)
        self.lora.load(SHARED_ADAPTER, tensors)
        self.prompt.add(task, tensors)
        self.bank.load(tensors, self.device)

    def begin_task(self, task: TaskInfo) -> None:
        self.lora.ensure(SHARED_ADAPTER)
        self.prompt.add(task)
        self.changed = []
        if self.calibrates and len(self.tasks) > 1:  # keep the encoder as it is now, to measure the drift
            self.lora.ensure(PREVIOUS_ADAPTER)
            self.lora.load(PREVIOUS_ADAPTER, self.lora.state(SHARED_ADAPTER))
            self.lora.activate(SHARED_ADAPTER)

    def begin_stage(self, stage: str) -> None:
        self.stage = stage
        if stage == IMAGE_STAGE:
            with torch.no_grad():
                self.stage1_text = self.prompt.encode([self.tasks[-1]]).detach()

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.stage == IMAGE_STAGE:
            return self.lora.parameters_of(SHARED_ADAPTER)
        task_context = self.prompt.task_context(self.tasks[-1])
        return [self.prompt.shared, *([task_context] if task_context.numel() else [])]

    # --- training -------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        scale = self.backbone.logit_scale()
        if self.stage == IMAGE_STAGE:
            assert self.stage1_text is not None
            logits = scale * self.backbone.encode_images(images) @ self.stage1_text.T
            return F.cross_entropy(logits, labels - self.tasks[-1].offset)
        with torch.no_grad():
            features = self.backbone.encode_images(images)
        old_classes = self.tasks[-1].offset
        n_replay = round(self.config.replay_ratio * len(images)) if old_classes else 0
        if n_replay:
            replay_labels = torch.randint(old_classes, (n_replay,)).to(labels.device)
            replayed = F.normalize(self.bank.draw(replay_labels).to(features.dtype), dim=-1)
            features = torch.cat([features, replayed])
            labels = torch.cat([labels, replay_labels])
        return F.cross_entropy(scale * features @ self.prompt.encode().T, labels)

    @torch.no_grad()
    def end_stage(self, stage: str, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """After stage 1: the new classes' statistics under the updated encoder, and for ``dmc-ot`` the calibration
        of every old class by the drift between the encoder before and after the stage."""
        task = self.tasks[-1]
        calibrating = self.calibrates and task.offset > 0
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
            drift = features - before
            for c in range(task.offset):
                self.bank.set(c, calibrate(self.bank.classes[c], before, drift, self.config.ot_samples,
                                           self.config.ot_reg, self.config.ot_relaxation, self.config.shrinkage))
            self.changed = list(range(task.offset + len(task.classes)))

    def end_task(self, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.stage1_text = None

    def task_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.lora.state(SHARED_ADAPTER), **self.prompt.tensors(self.tasks[-1]),
                **self.bank.tensors(self.changed)}

    def task_metadata(self, task: TaskInfo) -> dict[str, Any]:
        return {"statistics": self.config.cov, "statistics_classes": len(self.changed),
                "statistics_bytes_per_class": self.bank.stored_bytes(self.changed[0])}

    # --- inference ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        return clip_probabilities(self.backbone, images, self.inference_text(self.prompt.encode))


@register_method
class DMCOT(DMC):
    name = "dmc-ot"
    config_class = DMCOTConfig
    summary = "dmc + optimal-transport calibration of old class statistics and task-specific prompt tokens"
    calibrates = True
