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
LORA_PREFIX = "lora."
CONTEXT_KEY = "prompt.context"


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
        self._visual = [visual]  # the tower before peft wraps it; peft's wrapper (self.peft) registers it
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

    def ensure(self, name: str) -> None:
        """Create adapter ``name`` unless it exists (a shared adapter is created by the first task only)."""
        if name not in self.names:
            self.add(name)

    def activate(self, name: str) -> None:
        assert self.peft is not None
        self.peft.base_model.set_adapter(name)

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        assert self.peft is not None
        return [p for n, p in self.peft.named_parameters() if f".{name}." in n and "lora_" in n]

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors, keyed ``lora.<peft key>`` as a task's tensor file stores them."""
        assert self.peft is not None
        return {LORA_PREFIX + k: v for k, v in get_peft_model_state_dict(self.peft, adapter_name=name).items()}

    def load(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Load adapter ``name`` from a task's tensors (the ``lora.`` keys); a state lacking any tensor is refused."""
        assert self.peft is not None
        state = {k[len(LORA_PREFIX):]: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
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

    def add(self, task: TaskInfo, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Add ``task``'s classes, with the context stored in its tensors, or the initial one."""
        if task.index != len(self.contexts) + 1:
            raise ValueError(f"prompts of task {task.index} added out of order")
        context = None if tensors is None else tensors[CONTEXT_KEY]
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

    def tensors(self, task: TaskInfo) -> dict[str, torch.Tensor]:
        """What a task's tensor file stores of its prompts."""
        return {CONTEXT_KEY: self.context(task).detach()}

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
        missing = [key for key in (self.MEANS_KEY, self.SCATTER_KEY, self.COUNT_KEY) if key not in tensors]
        if missing:
            raise ValueError(f"task {task.index} lacks the router statistics {', '.join(missing)} (it was stored by "
                             "an earlier clipcl): re-create the workspace")
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


SHARED_CONTEXT_KEY = "prompt.shared"
TASK_CONTEXT_KEY = "prompt.task"


class SharedPrompt(nn.Module):
    """One learnable context shared by every class (CoOp), optionally preceded by ``task_tokens`` tokens of the
    class's own task: ``[task tokens] [shared context] <class name>.``

    The shared context starts from the embedding of ``init_phrase`` (so it reads "a photo of a" right before the
    class name); task tokens start as N(0, 0.02). A task stores the shared context as it stood after that task and
    its own task tokens; restoring tasks in order leaves the newest shared context in place.
    """

    def __init__(self, backbone: Backbone, n_tokens: int, init_phrase: str, task_tokens: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_task_tokens = task_tokens
        device = backbone.token_embedding().weight.device
        self.shared = nn.Parameter(initial_context(backbone, 1, n_tokens, init_phrase)[0].to(device))
        self.task_contexts = nn.ParameterList()
        self.tasks: list[TaskInfo] = []

    def add(self, task: TaskInfo, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Add ``task``'s classes; with stored ``tensors``, also take the shared context and task tokens stored."""
        if task.index != len(self.tasks) + 1:
            raise ValueError(f"prompts of task {task.index} added out of order")
        device = self.shared.device
        width = self.shared.shape[-1]
        if tensors is not None:
            with torch.no_grad():
                self.shared.copy_(tensors[SHARED_CONTEXT_KEY].to(device))
            task_context = tensors[TASK_CONTEXT_KEY] if self.n_task_tokens else torch.zeros(0, width)
        else:
            task_context = torch.randn(self.n_task_tokens, width) * 0.02  # the engine seeds the generator
        self.task_contexts.append(nn.Parameter(task_context.to(device)))
        n_context = self.n_task_tokens + self.shared.shape[0]
        tokens = context_tokens(self.backbone, list(task.classes), n_context).to(device)
        self.register_buffer(f"tokens_{task.index}", tokens, persistent=False)
        self.tasks.append(task)

    def task_context(self, task: TaskInfo) -> nn.Parameter:
        return self.task_contexts[task.index - 1]

    def encode(self, tasks: list[TaskInfo] | None = None) -> torch.Tensor:
        """Text features of every class of ``tasks`` (default: all) from the current contexts (differentiable)."""
        tasks = self.tasks if tasks is None else tasks
        tokens = torch.cat([getattr(self, f"tokens_{task.index}") for task in tasks])
        contexts = torch.cat([
            torch.cat([self.task_context(task), self.shared]).unsqueeze(0).expand(len(task.classes), -1, -1)
            for task in tasks
        ])
        return encode_text_with_context(self.backbone, tokens, contexts)

    def tensors(self, task: TaskInfo) -> dict[str, torch.Tensor]:
        """What a task's tensor file stores of the prompts: the shared context now, and the task's own tokens."""
        stored = {SHARED_CONTEXT_KEY: self.shared.detach()}
        if self.n_task_tokens:
            stored[TASK_CONTEXT_KEY] = self.task_context(task).detach()
        return stored


class TextAnchors(nn.Module):
    """Each class's frozen text embedding of ``template`` (the fixed classifier and anchors of tppt and cma), added
    task by task as buffers, so they follow the method across devices and are never stored: the frozen text tower
    recomputes them exactly."""

    def __init__(self, backbone: Backbone, template: str) -> None:
        super().__init__()
        self.backbone = [backbone]  # not a submodule: the method already registers the model
        self.template = template
        self.count = 0

    def add(self, task: TaskInfo) -> None:
        anchors = self.backbone[0].encode_texts([self.template.format(name) for name in task.classes])
        self.register_buffer(f"task_{task.index}", anchors, persistent=False)
        self.count += 1

    def of(self, tasks: list[TaskInfo]) -> torch.Tensor:
        """``[classes, dim]`` anchors of ``tasks``' classes, in task order."""
        return torch.cat([getattr(self, f"task_{task.index}") for task in tasks])
