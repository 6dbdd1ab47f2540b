"""Building blocks that several methods share: LoRA on the image tower, and class prompts through the text tower.

They hold the mechanics (peft adapters by name, prompt tokens, cached text features) so that a method module says
only what is specific to it: which adapter trains when, what the loss is, and how inference combines the parts.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from ..backbone import Backbone, context_tokens, encode_text_with_context, linearize_attention, phrase_embedding
from ..errors import ClipclError
from .base import MethodConfig, TaskInfo, class_means, within_class_scatter

ATTENTION_PROJECTIONS = r".*\.attn\.(q_proj|k_proj|v_proj|out_proj|qkv|proj)"


@dataclass
class LoraPromptConfig(MethodConfig):
    """Options of methods that train a LoRA on the image encoder and class-specific text prompts."""

    lora_rank: int = field(default=8, metadata={"help": "rank of the LoRA"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / rank)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    context_tokens: int = field(default=8, metadata={"help": "learnable context tokens per class (M)"})
    context_init: str = field(default="a photo of a", metadata={"help": "phrase whose embedding starts the context"})

    def __post_init__(self) -> None:
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ClipclError("LoRA options need lora_rank >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1")
        if not 1 <= self.context_tokens <= 32:
            raise ClipclError("the prompt options need 1 <= context_tokens <= 32")

    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=ATTENTION_PROJECTIONS)


class ImageLoRA(nn.Module):
    """Named peft LoRA adapters on the attention projections of the image tower; one is active at a time.

    The tower's ``nn.MultiheadAttention`` layers are first rebuilt on ``nn.Linear`` projections
    (:func:`clipcl.backbone.linearize_attention`) so that LoRA never rewrites the frozen weights.
    """

    def __init__(self, visual: nn.Module, config: LoraConfig) -> None:
        super().__init__()
        linearize_attention(visual)
        self.lora_config = config
        self._visual = [visual]  # a list, so that the tower stays owned (and registered) by the CLIP model only
        self.peft: PeftModel | None = None
        self.names: list[str] = []

    def add(self, name: str) -> None:
        """Create adapter ``name`` (LoRA B at zero: the tower computes what it did) and make it the active one."""
        if self.peft is None:
            self.peft = get_peft_model(self._visual[0], self.lora_config, adapter_name=name)
        else:
            self.peft.add_adapter(name, self.lora_config)
        self.peft.to(next(self._visual[0].parameters()).device)
        self.names.append(name)
        self.activate(name)

    def activate(self, name: str) -> None:
        assert self.peft is not None
        self.peft.base_model.set_adapter(name)

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        assert self.peft is not None
        return [p for n, p in self.peft.named_parameters() if f".{name}." in n and "lora_" in n]

    def state(self, name: str) -> dict[str, torch.Tensor]:
        assert self.peft is not None
        return get_peft_model_state_dict(self.peft, adapter_name=name)

    def load(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Load a stored state into adapter ``name``; a state that lacks any of its tensors is refused."""
        assert self.peft is not None
        result = set_peft_model_state_dict(self.peft, state, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
        if missing:
            raise ValueError(f"stored LoRA {name!r} lacks {len(missing)} tensors")

    def disabled(self) -> AbstractContextManager:
        """Run the frozen tower, without any adapter."""
        assert self.peft is not None
        return self.peft.disable_adapter()


def initial_context(backbone: Backbone, n_classes: int, n_tokens: int, phrase: str) -> torch.Tensor:
    """``[n_classes, n_tokens, width]`` context: the phrase's embedding at the end, N(0, 0.02) before it."""
    phrase_vectors = phrase_embedding(backbone, phrase)[-n_tokens:] if phrase else None
    width = backbone.token_embedding().embedding_dim
    context = torch.randn(n_tokens, width) * 0.02  # the engine seeds the global generator
    if phrase_vectors is not None and len(phrase_vectors):
        context[n_tokens - len(phrase_vectors):] = phrase_vectors.cpu()
    return context.unsqueeze(0).repeat(n_classes, 1, 1)


class ClassPrompts(nn.Module):
    """One learnable context per class (CoOp with class-specific context), added task by task.

    Each task's classes get ``[classes, n_tokens, width]`` context vectors placed before the class-name tokens and fed
    through the frozen text encoder. The text features of a task whose training has ended are cached
    (:meth:`freeze`), so later tasks use them as constants.
    """

    def __init__(self, backbone: Backbone, n_tokens: int, init_phrase: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_tokens = n_tokens
        self.init_phrase = init_phrase
        self.contexts = nn.ParameterList()

    def add(self, task: TaskInfo, context: torch.Tensor | None = None) -> None:
        """Add ``task``'s classes, with a stored ``context`` or the initial one."""
        if task.index != len(self.contexts) + 1:
            raise ValueError(f"prompts of task {task.index} added out of order")
        if context is None:
            context = initial_context(self.backbone, len(task.classes), self.n_tokens, self.init_phrase)
        device = self.backbone.token_embedding().weight.device
        self.contexts.append(nn.Parameter(context.to(device)))
        tokens = context_tokens(self.backbone, list(task.classes), self.n_tokens).to(device)
        self.register_buffer(f"tokens_{task.index}", tokens, persistent=False)
        with torch.no_grad():
            self.register_buffer(f"features_{task.index}", self.encode(task).detach(), persistent=False)

    def context(self, task: TaskInfo) -> nn.Parameter:
        return self.contexts[task.index - 1]

    def encode(self, task: TaskInfo) -> torch.Tensor:
        """Text features of ``task``'s classes from the current context (differentiable)."""
        return encode_text_with_context(self.backbone, getattr(self, f"tokens_{task.index}"), self.context(task))

    @torch.no_grad()
    def freeze(self, task: TaskInfo) -> None:
        """Cache ``task``'s text features from its trained context."""
        getattr(self, f"features_{task.index}").copy_(self.encode(task))

    def cached(self, task: TaskInfo) -> torch.Tensor:
        """``task``'s text features as last cached (at :meth:`add` or :meth:`freeze`)."""
        return getattr(self, f"features_{task.index}")

    def features(self, tasks: list[TaskInfo]) -> torch.Tensor:
        """Cached text features of ``tasks``' classes, in task order."""
        return torch.cat([self.cached(task) for task in tasks])


class TaskRouter(nn.Module):
    """Which tasks an image belongs to, from one pass of the frozen image encoder (../shared/METHODS.md, "Task
    routing").

    Each task keeps the mean frozen feature of each of its classes and the within-class scatter of its training
    images. A task's score is the score of its best class: with ``mahalanobis``, the Gaussian log-likelihood under
    the class's mean and the within-class covariance pooled over every task so far (shrunk toward a scaled identity,
    so a few hundred images in a wide feature space still give an invertible matrix); with ``cosine``, the cosine to
    the class mean at CLIP's logit scale. The softmax over tasks is the router's belief in each task.
    """

    KINDS = ("mahalanobis", "cosine")
    MEANS_KEY = "router.feature_means"
    SCATTER_KEY = "router.scatter"
    COUNT_KEY = "router.count"

    def __init__(self, kind: str = "mahalanobis", shrinkage: float = 0.01) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ClipclError(f"router must be one of {', '.join(self.KINDS)}, got {kind!r}")
        self.kind = kind
        self.shrinkage = shrinkage
        self.n_tasks = 0
        self._precision: tuple[tuple[int, torch.device], torch.Tensor] | None = None  # ((tasks, device), matrix)

    def add(self, task: TaskInfo, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """Add a task's statistics (the dict :meth:`statistics` made, or its stored copy)."""
        if task.index != self.n_tasks + 1:
            raise ValueError(f"router statistics of task {task.index} added out of order")
        for key in (self.MEANS_KEY, self.SCATTER_KEY, self.COUNT_KEY):
            self.register_buffer(f"{key.split('.')[-1]}_{task.index}", tensors[key].to(device), persistent=False)
        self.n_tasks += 1

    @staticmethod
    def statistics(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict[str, torch.Tensor]:
        """A task's statistics from its frozen features and labels (0..n_classes-1)."""
        means = class_means(features, labels, n_classes)
        return {
            TaskRouter.MEANS_KEY: means,
            TaskRouter.SCATTER_KEY: within_class_scatter(features, labels, means).float(),
            TaskRouter.COUNT_KEY: torch.tensor([len(labels)], dtype=torch.float32, device=features.device),
        }

    def tensors(self, task: TaskInfo) -> dict[str, torch.Tensor]:
        return {key: getattr(self, f"{key.split('.')[-1]}_{task.index}")
                for key in (self.MEANS_KEY, self.SCATTER_KEY, self.COUNT_KEY)}

    def _means(self) -> list[torch.Tensor]:
        return [getattr(self, f"feature_means_{i}") for i in range(1, self.n_tasks + 1)]

    def precision(self) -> torch.Tensor:
        """Inverse of the shrunk pooled within-class covariance (float64), cached until a task is added."""
        key = (self.n_tasks, self.scatter_1.device)
        if self._precision is None or self._precision[0] != key:
            scatter = sum(getattr(self, f"scatter_{i}").double() for i in range(1, self.n_tasks + 1))
            count = sum(float(getattr(self, f"count_{i}")) for i in range(1, self.n_tasks + 1))
            covariance = scatter / max(count, 1.0)
            dim = covariance.shape[0]
            target = torch.eye(dim, dtype=covariance.dtype, device=covariance.device) * covariance.trace() / dim
            shrunk = (1 - self.shrinkage) * covariance + self.shrinkage * target
            self._precision = (key, torch.linalg.inv(shrunk))
        return self._precision[1]

    @torch.no_grad()
    def task_scores(self, features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """``[batch, tasks]`` log-scores of the best class of each task for frozen ``features``."""
        best = []
        if self.kind == "cosine":
            for means in self._means():
                cosine = features.float() @ F.normalize(means.float(), dim=-1).T
                best.append(logit_scale.float() * cosine.max(dim=1).values)
            return torch.stack(best, dim=1)
        precision = self.precision()
        x = features.double()
        x_precision = x @ precision
        x_term = (x_precision * x).sum(dim=1, keepdim=True)
        for means in self._means():
            mu = means.double()
            mu_term = ((mu @ precision) * mu).sum(dim=1)
            log_likelihood = -0.5 * (x_term - 2 * x_precision @ mu.T + mu_term)
            best.append(log_likelihood.max(dim=1).values)
        return torch.stack(best, dim=1).float()

    def weights(self, features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """``[batch, tasks]`` softmax of :meth:`task_scores`: how strongly each image belongs to each task."""
        return self.task_scores(features, logit_scale).softmax(dim=1)
