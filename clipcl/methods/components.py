"""Building blocks that several methods share: LoRA on the image tower, and class prompts through the text tower.

They hold the mechanics (peft adapters by name, prompt tokens, cached text features, pooled class Gaussians, fixed
text anchors) so that a method module says
only what is specific to it: which adapter trains when, what the loss is, and how inference combines the parts.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from ..backbone import Backbone, context_tokens, encode_text_with_context, linearize_attention, phrase_embedding
from ..errors import ClipclError
from .base import (
    PerTaskBuffers,
    PromptContextConfig,
    TaskInfo,
    class_means,
    gaussian_log_likelihoods,
    shrink,
    within_class_scatter,
)

ATTENTION_PROJECTIONS = r".*\.attn\.(q_proj|k_proj|v_proj|out_proj|qkv|proj)"
LORA_PREFIX = "lora."
CONTEXT_KEY = "prompt.context"


@dataclass
class LoraPromptConfig(PromptContextConfig):
    """Options of methods that train a LoRA on the image encoder and text prompts."""

    lora_rank: int = field(default=8, metadata={"help": "rank of the LoRA"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / rank)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ClipclError("LoRA options need lora_rank >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1")

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
        self._layers: list[nn.Module] | None = None  # the LoRA layers, found once (select)

    def add(self, name: str) -> None:
        """Create adapter ``name`` (LoRA B at zero: the tower computes what it did) and make it the active one."""
        if self.peft is None:
            self.peft = get_peft_model(self._visual[0], self.lora_config, adapter_name=name)
        else:
            self.peft.add_adapter(name, self.lora_config)
        self.peft.to(next(self._visual[0].parameters()).device)
        self.names.append(name)
        self._layers = None
        self.activate(name)

    def ensure(self, name: str) -> None:
        """Create adapter ``name`` unless it exists (a shared adapter is created by the first task only)."""
        if name not in self.names:
            self.add(name)

    def activate(self, name: str) -> None:
        assert self.peft is not None
        self.peft.base_model.set_adapter(name)

    def select(self, name: str) -> None:
        """Make adapter ``name`` the one the LoRA layers run, for inference only: the model's record of its active
        adapter and which adapters train are left as they were, so the caller gives them back with
        :meth:`activate` when done. peft's switch (:meth:`activate`) walks every module of the model and sets every
        adapter's ``requires_grad``: about 10 ms per switch for a small ViT on a CPU, up to T + 1 switches per batch
        for ``dma``'s routing, a fifth of its prediction time at 10 tasks. This sets each LoRA layer's active
        adapter, as peft's own switch does last (falling back to it for a peft whose layers keep it otherwise)."""
        assert self.peft is not None
        if self._layers is None:
            self._layers = [m for m in self.peft.modules() if hasattr(m, "lora_A") and hasattr(m, "_active_adapter")]
        if not self._layers or any(name not in layer.lora_A for layer in self._layers):
            self.activate(name)
            return
        for layer in self._layers:
            layer._active_adapter = [name]

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


class ClassPrompts(PerTaskBuffers):
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
        self.indices: list[int] = []  # the task number of each context, in order (numbers may skip a removed task)

    def add(self, task: TaskInfo, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Add ``task``'s classes, with the context stored in its tensors, or the initial one."""
        if self.indices and task.index <= self.indices[-1]:
            raise ValueError(f"prompts of task {task.index} added out of order")
        context = None if tensors is None else tensors[CONTEXT_KEY]
        if context is None:
            context = initial_context(self.backbone, len(task.classes), self.n_tokens, self.init_phrase)
        device = self.backbone.token_embedding().weight.device
        self.contexts.append(nn.Parameter(context.to(device)))
        self.indices.append(task.index)
        tokens = context_tokens(self.backbone, list(task.classes), self.n_tokens).to(device)
        self.keep("tokens", task.index, tokens)
        with torch.no_grad():
            self.keep("features", task.index, self.encode(task).detach())

    def context(self, task: TaskInfo) -> nn.Parameter:
        return self.contexts[self.indices.index(task.index)]

    def tensors(self, task: TaskInfo) -> dict[str, torch.Tensor]:
        """What a task's tensor file stores of its prompts."""
        return {CONTEXT_KEY: self.context(task).detach()}

    def encode(self, task: TaskInfo) -> torch.Tensor:
        """Text features of ``task``'s classes from the current context (differentiable)."""
        return encode_text_with_context(self.backbone, self.kept("tokens", task.index), self.context(task))

    @torch.no_grad()
    def freeze(self, task: TaskInfo) -> None:
        """Cache ``task``'s text features from its trained context."""
        self.kept("features", task.index).copy_(self.encode(task))

    def cached(self, task: TaskInfo) -> torch.Tensor:
        """``task``'s text features as last cached (at :meth:`add` or :meth:`freeze`)."""
        return self.kept("features", task.index)

    def features(self, tasks: list[TaskInfo]) -> torch.Tensor:
        """Cached text features of ``tasks``' classes, in task order."""
        return self.kept_together("features", (task.index for task in tasks))


AUTO_SHRINKAGE = "auto"


def check_shrinkage(value: object, option: str) -> str:
    """A shrinkage option's value as stored: ``auto`` (Ledoit-Wolf) or a number in (0, 1]."""
    text = str(value).strip().lower()
    if text == AUTO_SHRINKAGE:
        return text
    try:
        number = float(text)
    except ValueError:
        number = -1.0
    if not 0 < number <= 1:
        raise ClipclError(f"{option} must be auto or a number with 0 < {option} <= 1, got {value!r}")
    return text


def shrinkage_value(value: str) -> float | None:
    """The number of a checked shrinkage option, or ``None`` for Ledoit-Wolf's estimate."""
    return None if value == AUTO_SHRINKAGE else float(value)


class PooledGaussian(PerTaskBuffers):
    """Class means of features with one within-class covariance pooled over every task added so far: the
    Gaussian model of linear discriminant analysis, kept task by task.

    Each task contributes its classes' means, its within-class scatter ``sum (x - mean_y)(x - mean_y)^T`` and its
    image count (``D x D`` + ``C x D`` numbers, whatever the number of images), so the pooled covariance is exact for
    any set of tasks and nothing of an earlier task is ever rewritten. The covariance is shrunk toward a scaled
    identity (a few hundred images in a wide feature space still give an invertible, well-conditioned matrix), by
    a fixed ``shrinkage`` or, with ``None``, by the Ledoit-Wolf estimate (Ledoit & Wolf, 2004, as scikit-learn
    computes it), which needs one more number per task: the sum of the fourth powers of the centred features'
    norms. Stored under ``<prefix>feature_means``, ``<prefix>scatter``, ``<prefix>count`` and
    ``<prefix>fourth_moment``.
    """

    def __init__(self, prefix: str, shrinkage: float | None) -> None:
        super().__init__()
        self.prefix = prefix
        self.shrinkage = shrinkage
        self.indices: list[int] = []  # the tasks added, by number (rising; a removed task's number is skipped)
        self.classes_per_task: list[int] = []
        self._precision: tuple[tuple[int, torch.device], torch.Tensor] | None = None  # ((tasks, device), matrix)

    def set_shrinkage(self, shrinkage: float | None) -> None:
        """Use another shrinkage from now on (the statistics are unchanged; the precision is recomputed)."""
        self.shrinkage = shrinkage
        self._precision = None

    @property
    def n_tasks(self) -> int:
        return len(self.indices)

    @property
    def keys(self) -> tuple[str, str, str]:
        """The statistics every task has (``fourth_key`` is stored beside them since Ledoit-Wolf shrinkage)."""
        return (f"{self.prefix}feature_means", f"{self.prefix}scatter", f"{self.prefix}count")

    @property
    def fourth_key(self) -> str:
        return f"{self.prefix}fourth_moment"

    def statistics(self, features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict[str, torch.Tensor]:
        """A task's statistics from its features and labels (0..n_classes-1), keyed as :meth:`add` reads them."""
        means = class_means(features, labels, n_classes)
        means_key, scatter_key, count_key = self.keys
        centred = features.double() - means.double()[labels]
        return {
            means_key: means,
            scatter_key: within_class_scatter(features, labels, means).float(),
            count_key: torch.tensor([len(labels)], dtype=torch.float32, device=features.device),
            self.fourth_key: centred.pow(2).sum(dim=1).pow(2).sum().reshape(1).float(),
        }

    def add(self, task: TaskInfo, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """Add a task's statistics (the dict :meth:`statistics` made, or its stored copy)."""
        if self.indices and task.index <= self.indices[-1]:
            raise ValueError(f"class statistics of task {task.index} added out of order")
        needed = [*self.keys, *((self.fourth_key,) if self.shrinkage is None else ())]
        missing = [key for key in needed if key not in tensors]
        if missing:
            raise ValueError(f"task {task.index} lacks the class statistics {', '.join(missing)} (it was stored by "
                             "an earlier clipcl)")
        for key in (*self.keys, self.fourth_key):
            if key in tensors:
                self.keep(self._name(key), task.index, tensors[key].to(device))
        self.classes_per_task.append(int(tensors[self.keys[0]].shape[0]))
        self.indices.append(task.index)
        self._precision = None

    def _name(self, key: str) -> str:
        return key[len(self.prefix):]

    def _kept(self, key: str, index: int) -> torch.Tensor:
        return self.kept(self._name(key), index)

    def tensors(self, task: TaskInfo) -> dict[str, torch.Tensor]:
        keys = (*self.keys, *((self.fourth_key,) if self.has_kept(self._name(self.fourth_key), task.index) else ()))
        return {key: self._kept(key, task.index) for key in keys}

    def effective_shrinkage(self) -> float:
        """The shrinkage in use: the fixed one, or Ledoit-Wolf's estimate from every task so far."""
        if self.shrinkage is not None:
            return self.shrinkage
        covariance, count = self.covariance(), self._count()
        fourth = sum(float(self._kept(self.fourth_key, i)) for i in self.indices)
        dim = covariance.shape[0]
        mu = float(covariance.trace()) / dim
        squared = float((covariance * covariance).sum())
        beta = (fourth / count - squared) / (dim * count)
        delta = (squared - 2 * mu * float(covariance.trace()) + dim * mu * mu) / dim
        return 1.0 if delta <= 0 else float(min(max(beta, 0.0), delta) / delta)

    def means(self, index: int) -> torch.Tensor:
        """Class means of task ``index`` (from 1)."""
        return self._kept(self.keys[0], index)

    def _count(self) -> float:
        return max(sum(float(self._kept(self.keys[2], i)) for i in self.indices), 1.0)

    def covariance(self) -> torch.Tensor:
        """The within-class covariance pooled over every task (float64, unshrunk)."""
        scatter = sum(self._kept(self.keys[1], i).double() for i in self.indices)
        return scatter / self._count()

    def precision(self) -> torch.Tensor:
        """Inverse of the shrunk pooled covariance (float64), cached until a task is added."""
        key = (self.n_tasks, self.means(self.indices[0]).device)
        if self._precision is None or self._precision[0] != key:
            self._precision = (key, torch.linalg.inv(shrink(self.covariance(), self.effective_shrinkage())))
        return self._precision[1]

    @torch.no_grad()
    def log_likelihoods(self, features: torch.Tensor) -> torch.Tensor:
        """``[batch, classes]`` Gaussian log-likelihood of each feature under each class, up to a constant shared by
        every class: ``-(x - mean_c)^T P (x - mean_c) / 2`` (float64), classes in task order."""
        means = torch.cat([self.means(i) for i in self.indices])
        return gaussian_log_likelihoods(features, means, self.precision())

    def best_per_task(self, scores: torch.Tensor) -> torch.Tensor:
        """``[batch, tasks]``: the best class score of each task from ``[batch, classes]`` scores."""
        return torch.stack([part.max(dim=1).values for part in scores.split(self.classes_per_task, dim=1)], dim=1)


SHARED_CONTEXT_KEY = "prompt.shared"
TASK_CONTEXT_KEY = "prompt.task"


class SharedPrompt(PerTaskBuffers):
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
        self.keep("tokens", task.index, tokens)
        self.tasks.append(task)

    def task_context(self, task: TaskInfo) -> nn.Parameter:
        return self.task_contexts[task.index - 1]

    def encode(self, tasks: list[TaskInfo] | None = None) -> torch.Tensor:
        """Text features of every class of ``tasks`` (default: all) from the current contexts (differentiable)."""
        tasks = self.tasks if tasks is None else tasks
        tokens = self.kept_together("tokens", (task.index for task in tasks))
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


class TextAnchors(PerTaskBuffers):
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
        self.keep("anchors", task.index, anchors)
        self.count += 1

    def of(self, tasks: list[TaskInfo]) -> torch.Tensor:
        """``[classes, dim]`` anchors of ``tasks``' classes, in task order."""
        return self.kept_together("anchors", (task.index for task in tasks))
