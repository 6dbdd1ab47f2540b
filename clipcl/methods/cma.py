"""``cma``: cross-modality mixture-of-experts adapters with representation alignment (Chee, Hsu, Lee, ECAI 2025),
built on the MoE-Adapters recipe (Yu et al., CVPR 2024); docs/methods.md says where this departs from the papers.

A mixture of ``experts`` bottleneck adapters (down to ``width``, ReLU, dropout, up, times ``scale``; up-projection
and biases start at zero, so untrained adapters compute exactly the frozen image encoder) sits beside the MLP of
the upper half of the image-encoder blocks (``blocks``; MoE-Adapters adapts every block, which forgot more on
validation), reading the block's residual stream (``adapter_input``). Per block a router
scores the experts from the image's class token (``router_input=image``; ``image+text`` also reads the mean text of
every seen class, a constant that moves whenever a task is added and so re-routes old images); in training its
scores get Shazeer's learned Gaussian noise (``router_noise``; router and noise weights start at zero). Each image
uses its ``top_k`` experts, weighted by the softmax of their scores.

After a task, the ``freeze_per_task`` experts of each block chosen most often by its training images
(``freeze_by=count``) are frozen with their router rows (``freeze_router_rows``): later tasks never change them
(they are left out of the optimiser), so an old image keeps its experts and its routing. With 22 experts and 2
frozen a task, a block has free experts through task 10; once a block has none, only its routing to frozen experts
is left and nothing in it learns (the task's metadata says so).

The classifier is each class's text from a learned context (CoOp, trained with its task and frozen after it;
``class_prompts=false`` uses the fixed template). Old and new classes are calibrated against each other
(``calibration``): ``ce`` takes the cross-entropy over every seen class with the image features detached in the
old-class columns, so the new prompts learn to beat the old ones on new images without the encoder being pushed off
old classes; ``replay`` ends the task with ``replay_steps`` steps that train only the new task's prompts against
draws from the old classes' stored feature statistics (mean and covariance of each class's features, kept per task
as ``dmc`` keeps them). From the second task on, with the model as it stood after the previous task (rebuilt from
the workspace's stored tensors when the task begins, never kept across processes), the loss adds:

* ``kd_weight`` x KL(previous model's softmax over the old classes at ``kd_temperature`` || the new one's),
* ``align_weight`` x the symmetric image–text InfoNCE between the batch's images and their classes' texts,
* ``relation_weight`` x the mean squared difference between the batch's image–image cosine-similarity matrices
  under the new and the previous model.

Inference is one pass, with no task id. Each task stores every expert and router as they stood after it (restoring
tasks 1..i in order rebuilds the model after task i), the mask of frozen experts, its prompts and (with replay) its
classes' statistics. Workspaces made before the recipe keep their options (``CMAConfig.stored_defaults``) and their 5
epochs a task.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone, vision_blocks
from ..errors import ClipclError
from .base import (
    CrossEntropyClassesConfig,
    Method,
    MethodConfig,
    PromptContextConfig,
    TaskInfo,
    TemplateConfig,
    clip_probabilities,
    register_method,
)
from .catalog import builtin_summary
from .components import ClassPrompts, TextAnchors
from .gaussian import STATS_CLASSES_KEY, GaussianBank, estimate
from .losses import cross_entropy_over, distillation, relation_preservation, symmetric_image_text_contrastive

FROZEN_KEY = "moe.frozen"
REPLAY_BATCH = 64  # new-class features per replay step, with as many old-class draws
REPLAY_SHRINKAGE = 0.1  # of each class covariance toward a scaled identity (dmc's default)
CALIBRATIONS = ("none", "ce", "replay", "ce+replay")
CLASSIFIERS = ("text", "gaussian", "text+gaussian")
ROUTER_INPUTS = ("image", "image+text")
ADAPTER_INPUTS = ("residual", "normalized")
FREEZE_BY = ("count", "weight")


@dataclass
class CMAConfig(TemplateConfig, PromptContextConfig, CrossEntropyClassesConfig):
    """cma's options: the mixture of adapters, how it is routed and frozen, old/new calibration, the loss terms."""

    # options added with the MoE-Adapters recipe: workspaces made before it keep training the way they started
    stored_defaults: ClassVar[dict[str, Any]] = {
        "adapter_input": "normalized", "scale": 1.0, "dropout": 0.0, "router_input": "image+text",
        "router_noise": False, "freeze_router_rows": False, "freeze_by": "weight", "calibration": "none",
        "classifier": "text",
    }

    blocks: int = field(default=0, metadata={"help": "top image-encoder blocks that get adapters (0: the upper "
                                                     "half, -1: every block)"})
    experts: int = field(default=22, metadata={"help": "bottleneck adapters (experts) per adapted block"})
    top_k: int = field(default=2, metadata={"help": "experts each image uses per block"})
    width: int = field(default=64, metadata={"help": "bottleneck width of each expert"})
    adapter_input: str = field(default="residual", metadata={
        "help": "what the experts read: 'residual' (the block's residual stream, as MoE-Adapters) or 'normalized' "
                "(the MLP's layer-normed input)"})
    scale: float = field(default=0.1, metadata={"help": "factor on the mixture's output"})
    dropout: float = field(default=0.1, metadata={"help": "dropout inside each expert while training"})
    router_input: str = field(default="image", metadata={
        "help": "what the router reads: 'image' (the image's class token) or 'image+text' (and the mean text of "
                "the classes seen so far, a constant that moves whenever a task is added)"})
    router_noise: bool = field(default=True, metadata={"help": "noisy top-k gating while training, router and "
                                                                "noise starting at zero (MoE-Adapters)"})
    freeze_per_task: int = field(default=2, metadata={"help": "experts per block frozen after each task"})
    freeze_by: str = field(default="count", metadata={"help": "which experts freeze: the most chosen ('count') or "
                                                              "those with most routing weight ('weight')"})
    freeze_router_rows: bool = field(default=True, metadata={"help": "freeze a frozen expert's router row with it, "
                                                                      "so old images keep their routing"})
    calibration: str = field(default="replay", metadata={
        "help": "old/new calibration: 'ce' (cross-entropy over every seen class, image features detached in the "
                "old-class columns), 'replay' (after training, the new prompts learn against draws of the old "
                "classes' stored feature statistics), 'ce+replay', or 'none'"})
    classifier: str = field(default="gaussian", metadata={
        "help": "how classes are scored: 'text' (each class's prompt), 'gaussian' (a shared-covariance Gaussian "
                "of each class's adapted features, from the statistics kept after its task) or 'text+gaussian' "
                "(both log-probabilities added)"})
    replay_steps: int = field(default=100, metadata={"help": "steps of the replay calibration"})
    replay_lr: float = field(default=1e-3, metadata={"help": "learning rate of the replay calibration"})
    kd_weight: float = field(default=1.0, metadata={"help": "weight of distillation from the previous model"})
    kd_temperature: float = field(default=2.0, metadata={"help": "temperature of the distillation"})
    align_weight: float = field(default=0.5, metadata={"help": "weight of the symmetric image-text InfoNCE"})
    relation_weight: float = field(default=1.0, metadata={"help": "weight of the batch relation preservation"})
    class_prompts: bool = field(default=True, metadata={"help": "learn a context per class (CoOp, frozen after "
                                                                "its task) instead of the fixed template's text"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocks < -1 or not 1 <= self.top_k <= self.experts or self.width < 1:
            raise ClipclError("needs blocks >= -1, 1 <= top_k <= experts and width >= 1")
        if not 0 <= self.freeze_per_task <= self.experts:
            raise ClipclError("needs 0 <= freeze_per_task <= experts")
        if min(self.kd_weight, self.align_weight, self.relation_weight) < 0 or self.kd_temperature <= 0:
            raise ClipclError("the loss weights must be >= 0 and kd_temperature > 0")
        for option, value, allowed in (("calibration", self.calibration, CALIBRATIONS),
                                       ("router_input", self.router_input, ROUTER_INPUTS),
                                       ("adapter_input", self.adapter_input, ADAPTER_INPUTS),
                                       ("freeze_by", self.freeze_by, FREEZE_BY),
                                       ("classifier", self.classifier, CLASSIFIERS)):
            if value not in allowed:
                raise ClipclError(f"{option} must be one of {', '.join(allowed)}, not {value!r}")
        if not 0 <= self.dropout < 1 or self.scale <= 0:
            raise ClipclError("needs 0 <= dropout < 1 and scale > 0")
        if self.replay_steps < 0 or self.replay_lr <= 0:
            raise ClipclError("needs replay_steps >= 0 and replay_lr > 0")
        if "replay" in self.calibration and not self.class_prompts:
            raise ClipclError("calibration by replay trains the class prompts: it needs class_prompts=true")

    @property
    def replays(self) -> bool:
        return "replay" in self.calibration

    @property
    def keeps_statistics(self) -> bool:
        """Whether each task stores its classes' feature statistics (for replay, or for the Gaussian classifier)."""
        return self.replays or self.classifier != "text"


class ExpertRows(nn.Module):
    """A linear map with one output per expert (the router's scores), each expert's row its own parameter, so the
    rows of frozen experts can be left out of the optimiser. Stored as one ``weight`` ``[experts, in]`` (and
    ``bias``), the layout of the ``nn.Linear`` it replaces, so older workspaces load unchanged."""

    def __init__(self, in_features: int, experts: int, bias: bool, zero: bool, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        linear = nn.Linear(in_features, experts, bias=bias, device=device, dtype=dtype)  # its initialisation
        self.experts, self.has_bias = experts, bias
        for e in range(experts):
            self.register_parameter(f"weight_{e}", nn.Parameter(linear.weight[e].detach().clone() * (not zero)))
            if bias:
                self.register_parameter(f"bias_{e}", nn.Parameter(linear.bias[e].detach().clone() * (not zero)))

    def weight(self) -> torch.Tensor:
        return torch.stack([getattr(self, f"weight_{e}") for e in range(self.experts)])

    def bias(self) -> torch.Tensor | None:
        return torch.stack([getattr(self, f"bias_{e}") for e in range(self.experts)]) if self.has_bias else None

    def row_parameters(self, expert: int) -> list[nn.Parameter]:
        return [getattr(self, f"{name}_{expert}") for name in (("weight", "bias") if self.has_bias else ("weight",))]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, self.weight(), self.bias())

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight() if keep_vars else self.weight().detach()
        if self.has_bias:
            bias = self.bias()
            assert bias is not None
            destination[prefix + "bias"] = bias if keep_vars else bias.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        for name in ("weight", "bias") if self.has_bias else ("weight",):
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            current = getattr(self, name)()
            if value.shape != current.shape:
                error_msgs.append(f"{key}: stored shape {tuple(value.shape)}, this model needs {tuple(current.shape)}")
                continue
            with torch.no_grad():
                for e in range(self.experts):
                    getattr(self, f"{name}_{e}").copy_(value[e])


class BottleneckExperts(nn.Module):
    """The experts and the router of one block. Each expert owns its parameters (and its router row), so a frozen
    one can be left out of the optimiser entirely (a masked gradient would still let a stateful optimiser move it)."""

    def __init__(self, width: int, text_dim: int, config: CMAConfig, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        experts, hidden = config.experts, config.width
        bound = 1 / math.sqrt(width)  # nn.Linear's default initialisation of the down-projection

        def parameters(shape: tuple[int, ...], init: float) -> nn.ParameterList:
            return nn.ParameterList(
                nn.Parameter(torch.empty(shape, device=device, dtype=dtype).uniform_(-init, init))
                for _ in range(experts))

        self.down = parameters((width, hidden), bound)
        self.down_bias = parameters((hidden,), 0.0)
        self.up = parameters((hidden, width), 0.0)  # zero: the mixture adds nothing until trained
        self.up_bias = parameters((width,), 0.0)
        self.with_text = config.router_input == "image+text"
        self.router = ExpertRows(width + text_dim * self.with_text, experts, bias=True, zero=config.router_noise,
                                 device=device, dtype=dtype)
        # Shazeer et al.'s noisy top-k gating, noise weights starting at zero (MoE-Adapters' router)
        self.noise = ExpertRows(width, experts, bias=False, zero=True, device=device, dtype=dtype) \
            if config.router_noise else None
        self.top_k, self.scale = config.top_k, config.scale
        self.dropout = nn.Dropout(config.dropout)
        self.register_buffer("frozen", torch.zeros(experts, dtype=torch.bool, device=device))

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        return [self.down[expert], self.down_bias[expert], self.up[expert], self.up_bias[expert]]

    def router_parameters(self, expert: int) -> list[nn.Parameter]:
        noise = self.noise.row_parameters(expert) if self.noise is not None else []
        return [*self.router.row_parameters(expert), *noise]

    def forward(self, tokens: torch.Tensor, text_context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens`` ``[batch, length, width]`` (class token first) -> the mixture's output of the same shape, and
        each image's routing weights ``[batch, experts]`` (zero outside its top-k)."""
        batch = tokens.shape[0]
        image = F.normalize(tokens[:, 0], dim=-1)
        route_input = image
        if self.with_text:
            if text_context is None:
                raise RuntimeError("cma's router ran without a text context")
            route_input = torch.cat([image, F.normalize(text_context, dim=-1).to(tokens.dtype).expand(batch, -1)],
                                    dim=-1)
        scores = self.router(route_input)
        if self.noise is not None and self.training:
            spread = F.softplus(self.noise(image)) + 1e-2
            scores = scores + torch.randn_like(scores) * spread
        top, chosen = scores.topk(self.top_k, dim=-1)  # [batch, k]
        gates = top.float().softmax(dim=-1).to(tokens.dtype)
        # each image's experts, picked by a one-hot product rather than indexing: the backward of an index gather
        # accumulates in a thread-dependent order on the CPU, and resumed runs must reproduce uninterrupted ones
        pick = F.one_hot(chosen, len(self.down)).to(tokens.dtype)  # [batch, k, experts]

        def select(parameters: nn.ParameterList) -> torch.Tensor:
            stacked = torch.stack(list(parameters))
            return torch.einsum("bke,e...->bk...", pick, stacked)

        hidden = torch.einsum("blw,bkwh->bklh", tokens, select(self.down)) + select(self.down_bias)[:, :, None]
        hidden = self.dropout(F.relu(hidden)) * gates[:, :, None, None]
        out = torch.einsum("bklh,bkhw->blw", hidden, select(self.up))
        out = out + torch.einsum("bk,bkw->bw", gates, select(self.up_bias))[:, None]
        weights = torch.zeros_like(scores, dtype=torch.float32).scatter(1, chosen, gates.float())
        return out * self.scale if self.scale != 1 else out, weights


class MixtureOfAdapters(nn.Module):
    """One :class:`BottleneckExperts` per adapted block (``blocks`` holds the encoder block indices)."""

    def __init__(self, backbone: Backbone, config: CMAConfig) -> None:
        super().__init__()
        blocks, _ = vision_blocks(backbone.model.visual, backbone.spec.name)
        depth = len(blocks)
        count = depth if config.blocks == -1 else min(config.blocks or depth // 2 or 1, depth)
        self.block_indices = list(range(depth - count, depth))
        weight = blocks[0].mlp[0].weight if isinstance(blocks[0].mlp, nn.Sequential) else None
        if weight is None:
            raise ClipclError(f"{backbone.spec.name}: cma needs open_clip's MLP blocks in the image tower")
        text_dim = backbone.encode_texts(["a"]).shape[-1]
        self.freeze_router_rows = config.freeze_router_rows
        self.layers = nn.ModuleList(
            BottleneckExperts(weight.shape[1], text_dim, config, weight.device, weight.dtype)
            for _ in self.block_indices)

    def trainable(self) -> list[nn.Parameter]:
        """Every expert not frozen yet and its router row (every router row without ``freeze_router_rows``)."""
        params: list[nn.Parameter] = []
        for layer in self.layers:
            free = torch.nonzero(~layer.frozen).flatten().tolist()
            routed = free if self.freeze_router_rows else range(len(layer.frozen))
            for expert in routed:
                params.extend(layer.router_parameters(expert))
            for expert in free:
                params.extend(layer.expert_parameters(expert))
        return params

    def free_experts(self) -> list[int]:
        """Experts not frozen yet, per adapted block."""
        return [int((~layer.frozen).sum()) for layer in self.layers]

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
    inference_options = ("classifier",)
    default_epochs = 1  # MoE-Adapters' one pass a task; workspaces made before it keep 5 (default_training)
    default_lr = 1e-3
    summary = builtin_summary("cma")

    config: CMAConfig

    def __init__(self, backbone: Backbone, config: CMAConfig) -> None:
        super().__init__(backbone, config)
        self.adapters = MixtureOfAdapters(backbone, config)
        self.previous: MixtureOfAdapters | None = None  # the model after the previous task, for the old-model terms
        self.anchors = TextAnchors(backbone, config.template)  # the router's text side, and the classifier without
        self.prompts = ClassPrompts(backbone, config.context_tokens, config.context_init) if config.class_prompts \
            else None
        self.bank = GaussianBank()  # each class's feature statistics, for calibration by replay or the classifier
        self._active: MixtureOfAdapters = self.adapters
        self._text_context: torch.Tensor | None = None
        self._routing: list[torch.Tensor] | None = None  # routing weight (or choices) per expert while recording
        self._residual: dict[int, torch.Tensor] = {}  # each adapted block's residual stream entering its MLP
        self.newly_frozen: dict[str, list[int]] = {}
        self.replay_report: dict[str, Any] = {}
        blocks, batch_first = vision_blocks(backbone.model.visual, backbone.spec.name)
        for layer_index, block_index in enumerate(self.adapters.block_indices):
            if config.adapter_input == "residual":
                blocks[block_index].ln_2.register_forward_pre_hook(self._residual_hook(layer_index))
            blocks[block_index].mlp.register_forward_hook(self._mixture_hook(layer_index, batch_first))

    @classmethod
    def default_training(cls, config: MethodConfig) -> tuple[int, float]:
        """Workspaces made before the MoE-Adapters recipe (their experts read the MLP's normalised input) keep the
        5 epochs a task they were trained with."""
        legacy = isinstance(config, CMAConfig) and config.adapter_input == "normalized"
        return (5 if legacy else cls.default_epochs), cls.default_lr

    def train(self, mode: bool = True) -> CMA:
        super().train(mode)
        if self.previous is not None:
            self.previous.eval()  # the teacher: no routing noise, no dropout
        return self

    def _residual_hook(self, layer_index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            self._residual[layer_index] = args[0]
        return hook

    def _mixture_hook(self, layer_index: int, batch_first: bool) -> Callable[..., torch.Tensor]:
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            source = self._residual.pop(layer_index) if self.config.adapter_input == "residual" else args[0]
            tokens = source if batch_first else source.transpose(0, 1)
            delta, weights = self._active.layers[layer_index](tokens, self._text_context)
            if self._routing is not None:
                self._routing[layer_index] += (weights > 0).float().sum(dim=0) if self.config.freeze_by == "count" \
                    else weights.sum(dim=0)
            return output + (delta if batch_first else delta.transpose(0, 1))
        return hook

    @contextmanager
    def _using(self, adapters: MixtureOfAdapters, tasks: list[TaskInfo]) -> Iterator[None]:
        """Run the image encoder with ``adapters``, routed (with ``router_input=image+text``) with the mean text of
        ``tasks``' classes."""
        self._active, self._text_context = adapters, self.anchors.of(tasks).mean(dim=0)
        try:
            yield
        finally:
            self._active, self._text_context = self.adapters, None
            self._residual.clear()

    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self.anchors.add(task)
        self.adapters.load(tensors)
        if self.prompts is not None:
            self.prompts.add(task, tensors)
        if STATS_CLASSES_KEY in tensors:
            self.bank.load(tensors, self.device)

    def begin_task(self, task: TaskInfo) -> None:
        # the model after the previous task, exactly as restored from the workspace: the old-model terms' teacher
        self.previous = copy.deepcopy(self.adapters).requires_grad_(False).eval() if len(self.tasks) > 1 else None
        self.anchors.add(task)
        if self.prompts is not None:
            self.prompts.add(task)
        self.newly_frozen, self.replay_report = {}, {}

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
        old_classes = self.tasks[-1].offset
        if "ce" in config.calibration.split("+") and old_classes:
            # every seen class competes, but the images learn only from the new classes' columns: an old class's
            # column moves nothing (its prompt is frozen, the image features are detached there), so the new
            # prompts learn to win against the old ones without the encoder being pushed off old classes
            calibrated = torch.cat([scale * features.detach() @ text[:old_classes].T, logits[:, old_classes:]], dim=1)
            loss = F.cross_entropy(calibrated, labels)
        else:
            classes = self.tasks[-1].class_slice if config.ce_classes == "current" else None
            loss = cross_entropy_over(logits, labels, classes)
        if config.align_weight:
            loss = loss + config.align_weight * symmetric_image_text_contrastive(features, text, labels, scale)
        if self.previous is not None and (config.kd_weight or config.relation_weight):
            old_tasks = self.tasks[:-1]
            with torch.no_grad():
                old_features = self.encode(images, self.previous, old_tasks)
            if config.kd_weight:
                old_logits = scale * old_features @ text[:old_classes].T
                loss = loss + config.kd_weight * distillation(logits[:, :old_classes], old_logits,
                                                              config.kd_temperature)
            if config.relation_weight:
                loss = loss + config.relation_weight * relation_preservation(features, old_features)
        return loss

    @torch.no_grad()
    def end_task(self, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Encode the task's training images once: freeze, per block, the experts chosen most (or with most routing
        weight); with replay, calibrate the new prompts against the old classes' statistics, then keep the new
        classes' statistics."""
        self.previous = None
        self._routing = [torch.zeros(len(layer.frozen), device=self.device) for layer in self.adapters.layers]
        keep = self.config.keeps_statistics
        features, labels = [], []
        try:
            for images, batch_labels in batches:
                encoded = self.encode(images.to(self.device))
                if keep:  # the task's features are held only when its statistics are kept
                    features.append(encoded.float())
                    labels.append(batch_labels.to(self.device))
            routing = self._routing
        finally:
            self._routing = None
        if keep:
            features_all, labels_all = torch.cat(features), torch.cat(labels)
            if task.offset and self.config.replays:
                self.replay_report = self._calibrate_by_replay(task, features_all, labels_all)
            for c in range(len(task.classes)):
                mine = features_all[labels_all == task.offset + c]
                self.bank.set(task.offset + c, estimate(mine, "full", REPLAY_SHRINKAGE))
            # as stored (half precision): the evaluation after this task sees what a later load restores
            self.bank.load(self._task_statistics(task), self.device)
        if self.prompts is not None:
            self.prompts.freeze(task)
        self.newly_frozen = {}
        for layer, block_index, weights in zip(self.adapters.layers, self.adapters.block_indices, routing,
                                               strict=True):
            top = weights.topk(self.config.freeze_per_task).indices.tolist() if self.config.freeze_per_task else []
            fresh = sorted(e for e in top if not layer.frozen[e])
            layer.frozen[top] = True
            self.newly_frozen[f"block {block_index}"] = fresh

    @torch.enable_grad()
    def _calibrate_by_replay(self, task: TaskInfo, features: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Train only the new task's prompts with cross-entropy over every seen class: the new classes from their
        images' features, the old ones from draws of their stored Gaussians (as many as the batch's images)."""
        assert self.prompts is not None
        context = self.prompts.context(task)
        context.requires_grad_(True)
        optimizer = torch.optim.AdamW([context], lr=self.config.replay_lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(task.index)
        old_text = self.prompts.features(self.tasks[:-1])
        scale = self.backbone.logit_scale().detach()
        batch = min(REPLAY_BATCH, len(features))
        losses = []
        for _ in range(self.config.replay_steps):
            rows = torch.randint(len(features), (batch,), generator=generator).to(features.device)
            old_labels = torch.randint(task.offset, (batch,), generator=generator).to(features.device)
            replayed = F.normalize(self.bank.draw(old_labels).to(features.dtype), dim=-1)
            inputs = torch.cat([features[rows], replayed])
            targets = torch.cat([labels[rows], old_labels])
            logits = scale * inputs @ torch.cat([old_text, self.prompts.encode(task)]).T
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        context.requires_grad_(False)
        return {"replay_loss": f"{losses[0]:.3f} -> {losses[-1]:.3f}"} if losses else {}

    def _task_statistics(self, task: TaskInfo) -> dict[str, torch.Tensor]:
        """``task``'s classes' statistics as its tensor file stores them."""
        return self.bank.tensors(list(range(len(self.classes)))[task.class_slice])

    def task_tensors(self) -> dict[str, torch.Tensor]:
        task = self.tasks[-1]
        prompts = self.prompts.tensors(task) if self.prompts is not None else {}
        stats = self._task_statistics(task) if self.config.keeps_statistics else {}
        return {**self.adapters.tensors(), **prompts, **stats}

    def task_metadata(self, task: TaskInfo) -> dict[str, Any]:
        frozen = sum(int(layer.frozen.sum()) for layer in self.adapters.layers)
        total = sum(len(layer.frozen) for layer in self.adapters.layers)
        free = self.adapters.free_experts()
        facts: dict[str, Any] = {"frozen_experts": self.newly_frozen, "experts_frozen_so_far": f"{frozen}/{total}",
                                 "fewest_free_experts_in_a_block": min(free)}
        if min(free) < self.config.top_k:
            # what happens then: that block's later tasks train only through experts frozen for earlier tasks'
            # images... nothing of it learns once no expert is free
            facts["blocks_out_of_free_experts"] = sum(f == 0 for f in free)
        return {**facts, **self.replay_report}

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        text = self.inference_text(lambda: self.anchors.of(self.tasks) if self.prompts is None
                                   else self.prompts.features(self.tasks))
        if self.config.classifier == "text":
            with self._using(self.adapters, self.tasks):
                return clip_probabilities(self.backbone, images, text)
        if len(self.bank.classes) != len(self.classes):
            raise ClipclError(f"classifier={self.config.classifier} needs the class statistics that tasks keep with "
                              "calibration=replay or a Gaussian classifier; this workspace's tasks did not keep them")
        features = self.encode(images).float()
        scores = self.bank.log_likelihoods(features, len(self.classes)).float()
        if self.config.classifier == "text+gaussian":
            scores = scores.log_softmax(dim=-1) + (self.backbone.logit_scale() * features @ text.T).log_softmax(dim=-1)
        return scores.softmax(dim=-1)
