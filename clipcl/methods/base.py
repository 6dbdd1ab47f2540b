"""The interface between the engine and a continual-learning method.

The engine knows nothing about any method. The engine and the workspace drive a method through three calls that
the base class owns, so the list of tasks (``Method.tasks``) is kept in one place and no method appends to it:

* :meth:`Method.restore` adds a stored task (in task order) and calls the method's :meth:`Method.restore_task`;
* :meth:`Method.begin` adds the task about to be learned and calls :meth:`Method.begin_task`;
* :meth:`Method.finish` calls :meth:`Method.end_task` with the task's training images once training is over.

In between, a method names what trains (:meth:`Method.trainable_parameters`, per stage for methods with several:
:attr:`Method.stages`, :meth:`Method.begin_stage`, :meth:`Method.end_stage`), returns its training loss from
``forward(images, labels)`` (labels index all classes seen so far), names the tensors to store for the task just
learned (:meth:`Method.task_tensors`), and scores images over every class learned so far
(:meth:`Method.predict_proba`; a method with per-task modules sets :attr:`Method.routes_tasks` and overrides
:meth:`Method.predict` to run only each image's most likely tasks' modules).

A method registers itself by name with :func:`register_method`, so adding one never touches the engine or the CLI;
``tests/test_method_contract.py`` holds every registered method to this contract.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..backbone import Backbone
from ..errors import ClipclError
from ..records import TaskInfo
from .catalog import BUILTIN_METHODS, ENTRY_POINT_GROUP

ROUTE_ALL = "all"
Route = int | str | None  # K tasks' modules per image, ROUTE_ALL for every task's, None for the method's default


def parse_route(value: int | str | None) -> Route:
    """``--route``'s value checked: ``None`` (the method's default), ``"all"``, or a number of tasks K >= 1."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == ROUTE_ALL:
        return ROUTE_ALL
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ClipclError(f"--route takes a number of tasks K (at least 1) or 'all', got {value!r}") from None
    if k < 1:
        raise ClipclError(f"--route must be at least 1 (or 'all'), got {k}")
    return k


def check_route_supported(method: type[Method], route: Route) -> None:
    """Refuse ``route`` for a method that does not route by task: :attr:`Method.routes_tasks` is the one place that
    says whether a method does."""
    if route is not None and not method.routes_tasks:
        raise ClipclError(f"method {method.name} does not route by task: drop --route")


@dataclass
class Prediction:
    """What a method says about a batch of images.

    ``probs``: ``[batch, classes]`` over every class learned so far (rows sum to 1). ``task_scores``: ``[batch, tasks]``
    from methods that route by task (how strongly each image belongs to each task); ``None`` otherwise.
    ``encoder_passes``: how many images the image encoder encoded for this batch, counting an image once per pass
    (``None``: one pass per image). It is what answering costs: frozen features handed in (``predict(frozen=...)``)
    count as the pass that made them, so the figure does not depend on what an evaluation found in its cache.
    """

    probs: torch.Tensor
    task_scores: torch.Tensor | None = None
    encoder_passes: int | None = None


@dataclass
class MethodConfig:
    """Base of every method's hyperparameters; each field's ``metadata["help"]`` documents it.

    ``stored_defaults`` holds the value an option had before it existed, for options added after workspaces were
    made: a workspace keeps training the way it started when a newer clipcl adds an option or changes a default.
    Option groups shared by several methods are mixins below; each checks its own fields in ``__post_init__`` and
    calls ``super().__post_init__()``.
    """

    stored_defaults: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        """Refuse values that cannot work (each mixin adds its checks)."""


@dataclass
class PromptContextConfig(MethodConfig):
    """Learnable text context tokens, initialised from a phrase's embedding."""

    context_tokens: int = field(default=8, metadata={"help": "learnable context tokens per class (M)"})
    context_init: str = field(default="a photo of a", metadata={"help": "phrase whose embedding starts the context"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.context_tokens <= 32:
            raise ClipclError(f"context_tokens must be between 1 and 32, got {self.context_tokens}")


@dataclass
class TemplateConfig(MethodConfig):
    """A fixed text for each class."""

    template: str = field(default="a photo of a {}.", metadata={"help": "text of each class; {} is the class name"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if "{}" not in self.template:
            raise ClipclError(f"the template needs a {{}} where the class name goes, got {self.template!r}")


HYBRID_CLASSIFIERS = ("text", "hybrid")


@dataclass
class HybridClassifierConfig(MethodConfig):
    """How classes are scored: by their text alone, or by their text and a shared-covariance Gaussian of the image
    features each task keeps (both inference options; see :func:`hybrid_probabilities`)."""

    classifier: str = field(default="hybrid", metadata={
        "help": "how classes are scored: 'text' (each class's text features) or 'hybrid' (the text and a shared-"
                "covariance Gaussian of the image features each task keeps, weighted by text_weight)"})
    text_weight: float = field(default=0.5, metadata={"help": "hybrid classifier: weight of the text side (0-1)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.classifier not in HYBRID_CLASSIFIERS:
            raise ClipclError(f"classifier must be one of {', '.join(HYBRID_CLASSIFIERS)}, got {self.classifier!r}")
        if not 0 <= self.text_weight <= 1:
            raise ClipclError(f"text_weight must be between 0 and 1, got {self.text_weight}")


CE_CLASSES = ("seen", "current")


@dataclass
class CrossEntropyClassesConfig(MethodConfig):
    """Which classes the training cross-entropy ranges over."""

    ce_classes: str = field(default="current", metadata={"help": "classes the cross-entropy ranges over: 'seen' "
                                                              "(every class so far) or 'current' (the task's)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ce_classes not in CE_CLASSES:
            raise ClipclError(f"ce_classes must be 'seen' or 'current', not {self.ce_classes!r}")


class PerTaskBuffers(nn.Module):
    """Tensors kept per task as non-persistent buffers: they follow the module across devices and are never part of
    its state dict (what a task stores is its own tensor file)."""

    def keep(self, name: str, index: int, tensor: torch.Tensor) -> None:
        """Keep ``tensor`` as task ``index``'s ``name`` (replacing what was kept)."""
        self.register_buffer(f"{name}_{index}", tensor, persistent=False)

    def kept(self, name: str, index: int) -> torch.Tensor:
        return getattr(self, f"{name}_{index}")

    def has_kept(self, name: str, index: int) -> bool:
        return hasattr(self, f"{name}_{index}")

    def kept_together(self, name: str, indices: Iterable[int]) -> torch.Tensor:
        """Task after task, ``name`` of each of ``indices`` concatenated along the first dimension."""
        return torch.cat([self.kept(name, index) for index in indices])


class Method(PerTaskBuffers, ABC):
    """A continual-learning method driven by the engine (see the module docstring for the life cycle)."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    default_epochs: ClassVar[int] = 5
    default_lr: ClassVar[float] = 1e-3
    summary: ClassVar[str] = ""
    routes_tasks: ClassVar[bool] = False  # True where predict() accepts ``route`` (top-k tasks' modules only)
    stages: ClassVar[tuple[str, ...]] = ("training",)  # training stages of each task, in order (see begin_stage)
    # options that only change how stored tasks are used, so `eval` and `predict` may override them (--set)
    inference_options: ClassVar[tuple[str, ...]] = ()
    # True where no task's stored tensors depend on another task's: restoring any subset of the stored tasks, in
    # order, gives the method a workspace that learned only those would have (anything pooled over tasks, like lda's
    # covariance, is recomputed at restore from each task's own share), so `clipcl remove-task` may drop one.
    # False where later tasks were trained on top of earlier ones (shared adapters, prompts or statistics).
    independent_tasks: ClassVar[bool] = False

    @classmethod
    def default_training(cls, config: MethodConfig) -> tuple[int, float]:
        """Epochs a task and peak learning rate when ``add-task`` is given none, for a workspace with ``config``: a
        method whose recipe changed keeps an older workspace training the way it started."""
        return cls.default_epochs, cls.default_lr

    def __init__(self, backbone: Backbone, config: MethodConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.clip = backbone.model  # registered, so .to(device) moves the base model with the method's own state
        self.config = config
        self.tasks: list[TaskInfo] = []  # kept by restore() and begin() only
        self._inference_text: torch.Tensor | None = None

    def learning_rate_scale(self) -> float:
        """Factor on the peak learning rate for the training about to start (1: the rate as given): a method that
        should move less once it holds earlier tasks returns less for them."""
        return 1.0

    # --- the life cycle, as the engine and the workspace drive it ------------------------------------------------
    def _add(self, task: TaskInfo) -> None:
        # numbers rise but may skip one: a task removed from a workspace (clipcl remove-task) keeps its number
        after = self.tasks[-1].index if self.tasks else 0
        if task.index <= after or task.offset != len(self.classes):
            raise ValueError(f"task {task.index} (first class {task.offset}) added after task {after} "
                             f"(next first class {len(self.classes)}): tasks are added in order")
        self.tasks.append(task)
        self._inference_text = None

    def restore(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        """Add a stored task, in task order, from the tensors :meth:`task_tensors` returned for it."""
        self._add(task)
        self.restore_task(task, tensors)

    def begin(self, task: TaskInfo) -> None:
        """Add ``task`` as the one about to be learned (``self.tasks[-1]`` from now on)."""
        self._add(task)
        self.begin_task(task)

    def finish(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Training of the current task is over: let the method gather what it keeps from the task's images."""
        self._inference_text = None
        self.end_task(self.tasks[-1], batches)
        self._inference_text = None

    def inference_text(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Every class's text features for inference, computed by ``compute`` once and kept until a task is added or
        finished (the only moments the classes' text can change outside training)."""
        if self._inference_text is None:
            self._inference_text = compute().detach().float()
        return self._inference_text

    def train(self, mode: bool = True) -> Method:
        """Train mode for the method's own modules and peft adapter layers; the frozen base stays in eval mode
        (no dropout, no batch-norm statistics updates)."""
        super().train(mode)
        self.clip.eval()
        for module in self.clip.modules():
            if isinstance(module, BaseTunerLayer):
                for name, child in module.named_children():
                    if name != "base_layer":
                        child.train(mode)
        return self

    @property
    def classes(self) -> list[str]:
        return [name for task in self.tasks for name in task.classes]

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @abstractmethod
    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        """Rebuild a stored task's state (already ``self.tasks[-1]``) from the tensors :meth:`task_tensors` gave."""

    @abstractmethod
    def begin_task(self, task: TaskInfo) -> None:
        """Prepare to learn ``task`` (already ``self.tasks[-1]``): new adapters, prompts, ..."""

    def begin_stage(self, stage: str) -> None:
        """Switch to training stage ``stage`` (one of :attr:`stages`); the engine then asks again what trains."""

    def end_stage(self, stage: str, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """After every stage but the last: gather what the next stage needs from the task's training images
        (eval transform), e.g. class statistics under the encoder the stage just trained."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates for the current task; everything else is frozen by the engine."""
        return []

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch (labels index ``self.classes``)."""
        raise ClipclError(f"method {self.name} has nothing to train")

    def end_task(self, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Gather statistics over the task's training images (eval transform) after training; optional."""

    @abstractmethod
    def task_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to store for the task just learned (``self.tasks[-1]``): everything :meth:`restore_task`
        needs to rebuild the method as it stands now, given the earlier tasks' tensors."""

    @abstractmethod
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[batch, len(self.classes)]`` (rows sum to 1)."""

    def predict(self, images: torch.Tensor, route: Route = None, frozen: torch.Tensor | None = None) -> Prediction:
        """Probabilities over every class learned so far; methods that route by task (:attr:`routes_tasks`) run only
        the ``route`` best tasks' modules for each image (``None``: the method's default; ``"all"``: every task's).

        ``frozen``: :meth:`frozen_features` of these ``images``, computed earlier; passed only to a method whose
        :meth:`frozen_features_key` names some, which then skips that part and answers exactly as without it."""
        check_route_supported(type(self), route)
        return Prediction(self.predict_proba(images))

    # --- the frozen part of the answer (optional) ---------------------------------------------------------------
    def frozen_features_key(self) -> str | None:
        """What :meth:`frozen_features` computes, as a name, or ``None`` (the default): the answer has no part that
        the frozen base model computes alone, and :meth:`predict` is only ever given images.

        No task changes what the frozen model computes for an image, so the evaluation computes it once per held-out
        image and keeps it for every later evaluation (:mod:`clipcl.feature_cache`, under this name, the base
        weights' fingerprint, the preprocessing, the precision and the images' identity), leaving each evaluation
        only the passes that depend on what the tasks learned. Name what is computed, not the method: two methods
        that name the same key must compute the same tensor. A method whose frozen part depends on an option puts
        the option's value in the name."""
        return None

    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[batch, ...]`` float32: the part of the answer for ``images`` that the frozen base model computes alone
        and no task changes (called only where :meth:`frozen_features_key` names one); :meth:`predict` accepts it
        back as ``frozen``."""
        raise NotImplementedError(f"method {self.name} declares no frozen features")

    def task_metadata(self, task: TaskInfo) -> dict[str, Any]:
        """Extra facts about a task worth recording in its ``task.json`` (sizes, frozen experts, ...)."""
        return {}


# Method.frozen_features_key of the methods whose frozen part is the frozen model's normalised image embedding
FROZEN_IMAGE_EMBEDDING = "image-embedding"


@torch.no_grad()
def clip_probabilities(backbone: Backbone, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP's softmax of ``images`` over classes given by their normalised ``text_features``: the single-pass
    prediction of every method whose classifier is text."""
    image_features = backbone.encode_images(images)
    logits = backbone.logit_scale() * image_features @ text_features.to(image_features.dtype).T
    return logits.float().softmax(dim=-1)


def hybrid_scores(text_logits: torch.Tensor, prototype_scores: torch.Tensor, text_weight: float) -> torch.Tensor:
    """``text_weight * log_softmax(text_logits) + (1 - text_weight) * log_softmax(prototype_scores)``: with weight 1,
    exactly the text classifier's log-probabilities (up to a constant per image)."""
    scores = text_weight * text_logits.float().log_softmax(dim=-1)
    if text_weight < 1:
        scores = scores + (1 - text_weight) * prototype_scores.float().log_softmax(dim=-1)
    return scores


def hybrid_probabilities(backbone: Backbone, images: torch.Tensor, text_features: torch.Tensor,
                         config: HybridClassifierConfig,
                         prototype_scores: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Class probabilities as ``config`` says: CLIP's over ``text_features`` alone (``classifier=text`` or text
    weight 1), or :func:`hybrid_scores` of those logits and ``prototype_scores(image features)``."""
    if config.classifier == "text" or config.text_weight == 1:
        return clip_probabilities(backbone, images, text_features)
    features = backbone.encode_images(images).float()
    text_logits = backbone.logit_scale().float() * features @ text_features.T
    return hybrid_scores(text_logits, prototype_scores(features), config.text_weight).softmax(dim=-1)


def class_means(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean feature of each class (rows of ``features`` labelled 0..n_classes-1)."""
    sums = torch.zeros(n_classes, features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, labels, features.float())
    counts = torch.bincount(labels, minlength=n_classes).clamp_min(1).unsqueeze(1)
    return sums / counts


def within_class_scatter(features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``sum_i (x_i - mean_{y_i})(x_i - mean_{y_i})^T`` in float64: the pooled covariance's numerator."""
    centred = (features.double() - means.double()[labels])
    return centred.T @ centred


def shrink(covariance: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 - a) * covariance + a * (trace / D) * I``: invertible, and better conditioned than the sample estimate."""
    dim = covariance.shape[-1]
    target = torch.eye(dim, dtype=covariance.dtype, device=covariance.device) * covariance.trace() / dim
    return (1 - shrinkage) * covariance + shrinkage * target


def gaussian_log_likelihoods(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``[batch, classes]``: ``-(x - mean_c)^T P (x - mean_c) / 2`` in float64, the Gaussian log-likelihood of each
    feature under each class mean with one shared precision ``P``, up to a constant shared by every class."""
    x, mu = features.double(), means.double()
    x_precision = x @ precision
    return -0.5 * ((x_precision * x).sum(dim=1, keepdim=True) - 2 * x_precision @ mu.T
                   + ((mu @ precision) * mu).sum(dim=1))


@torch.no_grad()
def encode_task_images(method: Method, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image features of ``task``'s images, encoded as the model stands when called, and their labels
    within the task (0..classes-1)."""
    features, labels = [], []
    for images, batch_labels in batches:
        features.append(method.backbone.encode_images(images.to(method.device)).float())
        labels.append(batch_labels.to(method.device) - task.offset)
    return torch.cat(features), torch.cat(labels)


def image_class_means(method: Method, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                      ) -> torch.Tensor:
    """Normalised mean image feature of each of ``task``'s classes, encoded as the model stands when called."""
    features, labels = encode_task_images(method, task, batches)
    return torch.nn.functional.normalize(class_means(features, labels, len(task.classes)), dim=-1)


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``clipcl init --method <cls.name>``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two methods registered as {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> dict[str, type[Method]]:
    """Registered methods: clipcl's own (imported here, on first need) plus any installed under the
    ``clipcl.methods`` entry-point group."""
    import importlib
    from importlib.metadata import entry_points

    for module in {entry.module for entry in BUILTIN_METHODS.values()}:
        importlib.import_module(module)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in _REGISTRY:
            entry.load()
    return dict(sorted(_REGISTRY.items()))


def get_method_class(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        raise ClipclError(f"unknown method {name!r} (available: {', '.join(methods)})")
    return methods[name]


def _convert(value: str, kind: type, key: str) -> Any:
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return kind(value)
    except ValueError as exc:
        raise ClipclError(f"option {key}={value!r}: expected {kind.__name__}") from exc


def check_inference_overrides(method: type[Method], overrides: dict[str, str] | None) -> None:
    """Refuse, for ``eval`` and ``predict``, an override of an option that shaped training."""
    fixed = sorted(set(overrides or {}) - set(method.inference_options))
    if fixed:
        allowed = ", ".join(method.inference_options) or "none"
        raise ClipclError(f"--set {fixed[0]}: method {method.name} fixes it when the workspace is created; "
                          f"eval and predict may set only: {allowed}")


def build_config(method: type[Method], overrides: dict[str, str] | None = None,
                 stored: dict[str, Any] | None = None) -> MethodConfig:
    """A method's config from defaults, a stored manifest entry, and ``KEY=VALUE`` overrides from the CLI."""
    fields = {f.name: f for f in dataclasses.fields(method.config_class)}
    types = typing.get_type_hints(method.config_class)
    values: dict[str, Any] = {**method.config_class.stored_defaults, **stored} if stored is not None else {}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ClipclError(f"method {method.name} has no option {key!r} (options: {', '.join(fields) or 'none'})")
        values[key] = _convert(value, types[key], key)
    unknown = set(values) - set(fields)
    if unknown:
        raise ClipclError(f"stored options unknown to method {method.name}: {', '.join(sorted(unknown))}")
    try:
        return method.config_class(**values)
    except ClipclError as exc:  # the config's checks say what is wrong; say which method's option it is
        raise ClipclError(f"method {method.name}: {exc}") from exc
