"""``cma``: cross-modality mixture-of-experts adapters with representation alignment (Chee, Hsu, Lee, ECAI 2025);
docs/methods.md says where this departs from the paper.

A mixture of ``experts`` bottleneck adapters (down to ``width``, ReLU, up; the up-projection starts at zero) sits in
parallel to the MLP of each of the top ``blocks`` image-encoder blocks. Per block, a router scores the experts from
the cross-modal input: the image's class token entering the MLP, and the mean text embedding of every class seen so
far. Each image uses its ``top_k`` experts, weighted by the softmax of their router scores. The up-projections start
at zero, so untrained adapters compute exactly the frozen image encoder.

The classifier is each class's text. The first version used the frozen text of ``template``; on
split-imagenette that left cma below nearest-class-mean (the small model's text for class names it never saw is
poor, and only the image side could move), so by default each class gets a learned context (CoOp, as ``dma`` and
``finetune`` use), trained with its task and frozen after it (``class_prompts=false`` restores the fixed text; the
figures are in BENCHMARKS.md).

After a task, the ``freeze_per_task`` experts of each block that carried most routing weight on its training
images are frozen: later tasks never change them (they are left out of the optimiser), only the router and the
free experts keep learning. Which experts froze is recorded in the task's metadata and shown by ``clipcl tasks``.

The loss on a batch of the new task is cross-entropy over the task's own classes (``ce_classes=seen``, over every
class so far, drove the first task to 0.9 % after the second on split-imagenette; BENCHMARKS.md), plus, from the
second task on, with the model as it stood after the previous task (rebuilt from the workspace's stored tensors when
the task begins, never kept across processes):

* ``kd_weight`` x KL(previous model's softmax over the old classes at ``kd_temperature`` || the new one's),
* ``align_weight`` x the symmetric image–text InfoNCE between the batch's images and their classes' texts,
* ``relation_weight`` x the mean squared difference between the batch's image–image cosine-similarity matrices
  under the new and the previous model.

Inference is one pass, with no task id. Each task stores every expert and router as they stood after it (restoring
tasks 1..i in order rebuilds the model after task i), plus the mask of frozen experts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone, vision_blocks
from ..errors import ClipclError
from .base import (
    CrossEntropyClassesConfig,
    Method,
    PromptContextConfig,
    TaskInfo,
    TemplateConfig,
    clip_probabilities,
    register_method,
)
from .components import ClassPrompts, TextAnchors
from .losses import cross_entropy_over, distillation, relation_preservation, symmetric_image_text_contrastive

FROZEN_KEY = "moe.frozen"


@dataclass
class CMAConfig(TemplateConfig, PromptContextConfig, CrossEntropyClassesConfig):
    """cma's options: the mixture of adapters and the weight of each loss term."""

    blocks: int = field(default=0, metadata={"help": "top image-encoder blocks that get adapters (0: upper half)"})
    experts: int = field(default=8, metadata={"help": "bottleneck adapters (experts) per adapted block"})
    top_k: int = field(default=2, metadata={"help": "experts each image uses per block"})
    width: int = field(default=64, metadata={"help": "bottleneck width of each expert"})
    freeze_per_task: int = field(default=2, metadata={"help": "experts per block frozen after each task"})
    kd_weight: float = field(default=1.0, metadata={"help": "weight of distillation from the previous model"})
    kd_temperature: float = field(default=2.0, metadata={"help": "temperature of the distillation"})
    align_weight: float = field(default=0.5, metadata={"help": "weight of the symmetric image-text InfoNCE"})
    relation_weight: float = field(default=1.0, metadata={"help": "weight of the batch relation preservation"})
    class_prompts: bool = field(default=True, metadata={"help": "learn a context per class (CoOp, frozen after "
                                                                "its task) instead of the fixed template's text"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocks < 0 or not 1 <= self.top_k <= self.experts or self.width < 1:
            raise ClipclError("needs blocks >= 0, 1 <= top_k <= experts and width >= 1")
        if not 0 <= self.freeze_per_task <= self.experts:
            raise ClipclError("needs 0 <= freeze_per_task <= experts")
        if min(self.kd_weight, self.align_weight, self.relation_weight) < 0 or self.kd_temperature <= 0:
            raise ClipclError("the loss weights must be >= 0 and kd_temperature > 0")


class BottleneckExperts(nn.Module):
    """The experts and the router of one block. Each expert owns its parameters, so a frozen one can be left out of
    the optimiser entirely (a masked gradient would still let a stateful optimiser move it)."""

    def __init__(self, width: int, text_dim: int, experts: int, hidden: int, top_k: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        bound = 1 / math.sqrt(width)  # nn.Linear's default initialisation of the down-projection

        def parameters(shape: tuple[int, ...], init: float) -> nn.ParameterList:
            return nn.ParameterList(
                nn.Parameter(torch.empty(shape, device=device, dtype=dtype).uniform_(-init, init))
                for _ in range(experts))

        self.down = parameters((width, hidden), bound)
        self.down_bias = parameters((hidden,), bound)
        self.up = parameters((hidden, width), 0.0)  # zero: the mixture adds nothing until trained
        self.up_bias = parameters((width,), 0.0)
        self.router = nn.Linear(width + text_dim, experts, device=device, dtype=dtype)
        self.top_k = top_k
        self.register_buffer("frozen", torch.zeros(experts, dtype=torch.bool, device=device))

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        return [self.down[expert], self.down_bias[expert], self.up[expert], self.up_bias[expert]]

    def forward(self, tokens: torch.Tensor, text_context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens`` ``[batch, length, width]`` (class token first) -> the mixture's output of the same shape, and
        each image's routing weights ``[batch, experts]`` (zero outside its top-k)."""
        batch = tokens.shape[0]
        route_input = torch.cat([F.normalize(tokens[:, 0], dim=-1),
                                 F.normalize(text_context, dim=-1).to(tokens.dtype).expand(batch, -1)], dim=-1)
        scores = self.router(route_input)
        top, chosen = scores.topk(self.top_k, dim=-1)  # [batch, k]
        gates = top.float().softmax(dim=-1).to(tokens.dtype)
        # each image's experts, picked by a one-hot product rather than indexing: the backward of an index gather
        # accumulates in a thread-dependent order on the CPU, and resumed runs must reproduce uninterrupted ones
        pick = F.one_hot(chosen, len(self.down)).to(tokens.dtype)  # [batch, k, experts]

        def select(parameters: nn.ParameterList) -> torch.Tensor:
            stacked = torch.stack(list(parameters))
            return torch.einsum("bke,e...->bk...", pick, stacked)

        hidden = torch.einsum("blw,bkwh->bklh", tokens, select(self.down)) + select(self.down_bias)[:, :, None]
        hidden = F.relu(hidden) * gates[:, :, None, None]
        out = torch.einsum("bklh,bkhw->blw", hidden, select(self.up))
        out = out + torch.einsum("bk,bkw->bw", gates, select(self.up_bias))[:, None]
        weights = torch.zeros_like(scores, dtype=torch.float32).scatter(1, chosen, gates.float())
        return out, weights


class MixtureOfAdapters(nn.Module):
    """One :class:`BottleneckExperts` per adapted block (``blocks`` holds the encoder block indices)."""

    def __init__(self, backbone: Backbone, config: CMAConfig) -> None:
        super().__init__()
        blocks, _ = vision_blocks(backbone.model.visual, backbone.spec.name)
        depth = len(blocks)
        count = min(config.blocks or depth // 2 or 1, depth)
        self.block_indices = list(range(depth - count, depth))
        weight = blocks[0].mlp[0].weight if isinstance(blocks[0].mlp, nn.Sequential) else None
        if weight is None:
            raise ClipclError(f"{backbone.spec.name}: cma needs open_clip's MLP blocks in the image tower")
        text_dim = backbone.encode_texts(["a"]).shape[-1]
        self.layers = nn.ModuleList(
            BottleneckExperts(weight.shape[1], text_dim, config.experts, config.width, config.top_k, weight.device,
                              weight.dtype)
            for _ in self.block_indices)

    def trainable(self) -> list[nn.Parameter]:
        """The routers and every expert not frozen yet."""
        params: list[nn.Parameter] = []
        for layer in self.layers:
            params.extend(layer.router.parameters())
            for expert in torch.nonzero(~layer.frozen).flatten().tolist():
                params.extend(layer.expert_parameters(expert))
        return params

    def tensors(self) -> dict[str, torch.Tensor]:
        state = {f"moe.{key}": value.detach().clone() for key, value in self.state_dict().items()
                 if not key.endswith(".frozen")}
        state[FROZEN_KEY] = torch.stack([layer.frozen for layer in self.layers]).clone()
        return state

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        state = {key.removeprefix("moe."): value for key, value in tensors.items()
                 if key.startswith("moe.") and key != FROZEN_KEY}
        frozen = tensors[FROZEN_KEY]
        if frozen.shape != (len(self.layers), len(self.layers[0].frozen)):
            raise ClipclError(f"stored experts have shape {tuple(frozen.shape)} (blocks, experts), this model "
                              f"needs ({len(self.layers)}, {len(self.layers[0].frozen)})")
        for i in range(len(self.layers)):
            state[f"layers.{i}.frozen"] = frozen[i]
        self.load_state_dict(state)


@register_method
class CMA(Method):
    name = "cma"
    config_class = CMAConfig
    default_epochs = 5
    default_lr = 1e-3
    summary = "mixture of bottleneck adapters routed by image + text, experts frozen per task, KD + alignment"

    config: CMAConfig

    def __init__(self, backbone: Backbone, config: CMAConfig) -> None:
        super().__init__(backbone, config)
        self.adapters = MixtureOfAdapters(backbone, config)
        self.previous: MixtureOfAdapters | None = None  # the model after the previous task, for the old-model terms
        self.anchors = TextAnchors(backbone, config.template)  # the router's text side, and the classifier without
        self.prompts = ClassPrompts(backbone, config.context_tokens, config.context_init) if config.class_prompts \
            else None
        self._active: MixtureOfAdapters = self.adapters
        self._text_context: torch.Tensor | None = None
        self._routing: list[torch.Tensor] | None = None  # summed routing weights per block while recording
        self.newly_frozen: dict[str, list[int]] = {}
        blocks, batch_first = vision_blocks(backbone.model.visual, backbone.spec.name)
        for layer_index, block_index in enumerate(self.adapters.block_indices):
            blocks[block_index].mlp.register_forward_hook(self._mixture_hook(layer_index, batch_first))

    def _mixture_hook(self, layer_index: int, batch_first: bool) -> Callable[..., torch.Tensor]:
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._text_context is None:
                raise RuntimeError("cma's adapters ran without a text context")
            tokens = args[0] if batch_first else args[0].transpose(0, 1)
            delta, weights = self._active.layers[layer_index](tokens, self._text_context)
            if self._routing is not None:
                self._routing[layer_index] += weights.sum(dim=0)
            return output + (delta if batch_first else delta.transpose(0, 1))
        return hook

    @contextmanager
    def _using(self, adapters: MixtureOfAdapters, tasks: list[TaskInfo]) -> Iterator[None]:
        """Run the image encoder with ``adapters``, routed with the mean text of ``tasks``' classes."""
        self._active, self._text_context = adapters, self.anchors.of(tasks).mean(dim=0)
        try:
            yield
        finally:
            self._active, self._text_context = self.adapters, None

    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self.anchors.add(task)
        self.adapters.load(tensors)
        if self.prompts is not None:
            self.prompts.add(task, tensors)

    def begin_task(self, task: TaskInfo) -> None:
        # the model after the previous task, exactly as restored from the workspace: the old-model terms' teacher
        self.previous = copy.deepcopy(self.adapters).requires_grad_(False) if len(self.tasks) > 1 else None
        self.anchors.add(task)
        if self.prompts is not None:
            self.prompts.add(task)
        self.newly_frozen = {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        prompts = [self.prompts.context(self.tasks[-1])] if self.prompts is not None else []
        return [*self.adapters.trainable(), *prompts]

    def class_text(self) -> torch.Tensor:
        """Every seen class's text features: earlier tasks' as frozen, the current task's from its trainable context
        (differentiable), or the template's anchors without class prompts."""
        if self.prompts is None:
            return self.anchors.of(self.tasks)
        return torch.cat([*map(self.prompts.cached, self.tasks[:-1]), self.prompts.encode(self.tasks[-1])])

    def encode(self, images: torch.Tensor, adapters: MixtureOfAdapters | None = None,
               tasks: list[TaskInfo] | None = None) -> torch.Tensor:
        """Normalised image features through ``adapters`` (default: the current ones), routed with the text of
        ``tasks``' classes (default: every class seen so far)."""
        with self._using(adapters or self.adapters, tasks or self.tasks):
            return self.backbone.encode_images(images)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        config = self.config
        scale = self.backbone.logit_scale()
        text = self.class_text()
        features = self.encode(images)
        logits = scale * features @ text.T
        classes = self.tasks[-1].class_slice if config.ce_classes == "current" else None
        loss = cross_entropy_over(logits, labels, classes)
        if config.align_weight:
            loss = loss + config.align_weight * symmetric_image_text_contrastive(features, text, labels, scale)
        if self.previous is not None and (config.kd_weight or config.relation_weight):
            old_tasks = self.tasks[:-1]
            with torch.no_grad():
                old_features = self.encode(images, self.previous, old_tasks)
            if config.kd_weight:
                old_classes = self.tasks[-1].offset
                old_logits = scale * old_features @ text[:old_classes].T
                loss = loss + config.kd_weight * distillation(logits[:, :old_classes], old_logits,
                                                              config.kd_temperature)
            if config.relation_weight:
                loss = loss + config.relation_weight * relation_preservation(features, old_features)
        return loss

    @torch.no_grad()
    def end_task(self, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Freeze, per block, the experts that carried most routing weight on the task's training images."""
        self.previous = None
        if self.prompts is not None:
            self.prompts.freeze(task)
        self._routing = [torch.zeros(len(layer.frozen), device=self.device) for layer in self.adapters.layers]
        try:
            for images, _ in batches:
                self.encode(images.to(self.device))
            routing = self._routing
        finally:
            self._routing = None
        self.newly_frozen = {}
        for layer, block_index, weights in zip(self.adapters.layers, self.adapters.block_indices, routing,
                                               strict=True):
            top = weights.topk(self.config.freeze_per_task).indices.tolist() if self.config.freeze_per_task else []
            fresh = sorted(e for e in top if not layer.frozen[e])
            layer.frozen[top] = True
            self.newly_frozen[f"block {block_index}"] = fresh

    def task_tensors(self) -> dict[str, torch.Tensor]:
        prompts = self.prompts.tensors(self.tasks[-1]) if self.prompts is not None else {}
        return {**self.adapters.tensors(), **prompts}

    def task_metadata(self, task: TaskInfo) -> dict[str, Any]:
        frozen = sum(int(layer.frozen.sum()) for layer in self.adapters.layers)
        total = sum(len(layer.frozen) for layer in self.adapters.layers)
        return {"frozen_experts": self.newly_frozen, "experts_frozen_so_far": f"{frozen}/{total}"}

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        text = self.inference_text(lambda: self.anchors.of(self.tasks) if self.prompts is None
                                   else self.prompts.features(self.tasks))
        with self._using(self.adapters, self.tasks):
            return clip_probabilities(self.backbone, images, text)
