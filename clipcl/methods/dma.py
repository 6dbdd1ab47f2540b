"""``dma``: dual-modality adaptation (Chen et al., Neural Networks 2025); ../shared/METHODS.md §1.

Each task gets its own LoRA on the image encoder's attention projections (a named peft adapter, frozen once the task
ends) and one learnable context per class, fed through the frozen text encoder (CoOp with class-specific context).
Training is cross-entropy over every class seen so far: earlier classes enter through their frozen prompts, whose
text features are computed once when the task begins, so only the current task's LoRA and prompts get gradients.

Inference is task-aware: the image is encoded once per task with that task's LoRA, the softmax over all classes is
taken, and each task contributes the probabilities of its own classes, weighted by how well the image matches the
task on frozen features (softmax over tasks, at CLIP's logit scale, of the best cosine to the task's class means).

Why the weighting (a change from METHODS.md's plain "highest probability across tasks"): a task's LoRA only ever
sees its own images, so it learns to pull *any* image toward its classes, and the newest task wins the vote on old
images. On split-imagenette tasks 1-2 with MiniCLIP-B, accuracy over both tasks was 54.4% with the plain rule and
63.7% with the weighting (task 1 alone: 31.1% before); every task's LoRA still runs (exhaustive inference).

The context is initialised from the embedding of ``context_init`` ("a photo of a") in its last positions; positions
beyond the phrase's length start as N(0, 0.02) (CoOp's random initialisation). With ``context_tokens`` equal to the
phrase's length the initial prompts reproduce zero-shot CLIP exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from ..backbone import (
    Backbone,
    context_tokens,
    encode_text_with_context,
    linearize_attention,
    phrase_embedding,
)
from ..errors import ClipclError
from .base import Method, MethodConfig, TaskInfo, image_class_means, register_method

ATTENTION_PROJECTIONS = r".*\.attn\.(q_proj|k_proj|v_proj|out_proj|qkv|proj)"
LORA_PREFIX = "lora."
CONTEXT_KEY = "prompt.context"
CLASS_MEANS_KEY = "router.class_means"


@dataclass
class DMAConfig(MethodConfig):
    lora_rank: int = field(default=8, metadata={"help": "rank of each task's LoRA"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / rank)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    context_tokens: int = field(default=8, metadata={"help": "learnable context tokens per class (M)"})
    context_init: str = field(default="a photo of a", metadata={"help": "phrase whose embedding starts the context"})

    def __post_init__(self) -> None:
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ClipclError("dma needs lora_rank >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1")
        if not 1 <= self.context_tokens <= 32:
            raise ClipclError("dma needs 1 <= context_tokens <= 32")


def initial_context(backbone: Backbone, n_classes: int, n_tokens: int, phrase: str) -> torch.Tensor:
    """``[n_classes, n_tokens, width]`` context: the phrase's embedding at the end, N(0, 0.02) before it."""
    phrase_vectors = phrase_embedding(backbone, phrase)[-n_tokens:] if phrase else None
    width = backbone.token_embedding().embedding_dim
    context = torch.randn(n_tokens, width) * 0.02  # the engine seeds the global generator
    if phrase_vectors is not None and len(phrase_vectors):
        context[n_tokens - len(phrase_vectors):] = phrase_vectors.cpu()
    return context.unsqueeze(0).repeat(n_classes, 1, 1)


@register_method
class DMA(Method):
    name = "dma"
    config_class = DMAConfig
    default_epochs = 5
    default_lr = 1e-3
    summary = "LoRA per task on the image encoder + class-specific prompts; task-aware inference (default)"

    config: DMAConfig

    def __init__(self, backbone: Backbone, config: DMAConfig) -> None:
        super().__init__(backbone, config)
        linearize_attention(self.clip.visual)
        self.lora_config = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=ATTENTION_PROJECTIONS,
        )
        self.visual: PeftModel | None = None
        self.contexts = nn.ParameterList()

    # --- per-task state -------------------------------------------------------------------------------------------
    @staticmethod
    def adapter_name(task: TaskInfo) -> str:
        return f"task-{task.index}"

    def _add_adapter(self, task: TaskInfo) -> None:
        if self.visual is None:
            self.visual = get_peft_model(self.clip.visual, self.lora_config, adapter_name=self.adapter_name(task))
        else:
            self.visual.add_adapter(self.adapter_name(task), self.lora_config)
        self.visual.to(self.device)
        self.visual.set_adapter(self.adapter_name(task))

    def _tokens(self, task: TaskInfo) -> torch.Tensor:
        return getattr(self, f"tokens_{task.index}")

    def _text_features(self, task: TaskInfo) -> torch.Tensor:
        return getattr(self, f"text_features_{task.index}")

    def _register_task(self, task: TaskInfo, context: torch.Tensor) -> None:
        self.tasks.append(task)
        self.contexts.append(nn.Parameter(context.to(self.device)))
        tokens = context_tokens(self.backbone, list(task.classes), self.config.context_tokens).to(self.device)
        self.register_buffer(f"tokens_{task.index}", tokens, persistent=False)
        self.register_buffer(f"text_features_{task.index}", self._encode_prompts(task).detach(), persistent=False)

    def _encode_prompts(self, task: TaskInfo) -> torch.Tensor:
        return encode_text_with_context(self.backbone, self._tokens(task), self.contexts[task.index - 1])

    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self._add_adapter(task)
        lora = {k[len(LORA_PREFIX):]: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
        result = set_peft_model_state_dict(self.visual, lora, adapter_name=self.adapter_name(task))
        missing = [k for k in result.missing_keys if self.adapter_name(task) in k]
        if missing:
            raise ValueError(f"stored LoRA of task {task.index} lacks {len(missing)} tensors")
        self.register_buffer(f"class_means_{task.index}", tensors[CLASS_MEANS_KEY].to(self.device), persistent=False)
        with torch.no_grad():
            self._register_task(task, tensors[CONTEXT_KEY])

    def begin_task(self, task: TaskInfo) -> None:
        self._add_adapter(task)
        context = initial_context(self.backbone, len(task.classes), self.config.context_tokens,
                                  self.config.context_init)
        with torch.no_grad():
            self._register_task(task, context)

    def trainable_parameters(self) -> list[nn.Parameter]:
        assert self.visual is not None
        current = self.adapter_name(self.tasks[-1])
        lora = [p for n, p in self.visual.named_parameters() if f".{current}." in n and "lora_" in n]
        return [*lora, self.contexts[-1]]

    # --- training -------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        current = self.tasks[-1]
        image_features = self.backbone.encode_images(images)
        old = [self._text_features(t) for t in self.tasks[:-1]]
        text_features = torch.cat([*old, self._encode_prompts(current)])
        logits = self.backbone.logit_scale() * image_features @ text_features.T
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def end_task(self, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._text_features(task).copy_(self._encode_prompts(task))
        assert self.visual is not None
        with self.visual.disable_adapter():  # the router's statistics are of frozen features
            means = image_class_means(self, task, batches)
        self.register_buffer(f"class_means_{task.index}", means, persistent=False)

    def task_tensors(self, task: TaskInfo) -> dict[str, torch.Tensor]:
        assert self.visual is not None
        lora = get_peft_model_state_dict(self.visual, adapter_name=self.adapter_name(task))
        return {
            **{LORA_PREFIX + k: v for k, v in lora.items()},
            CONTEXT_KEY: self.contexts[task.index - 1].detach(),
            CLASS_MEANS_KEY: getattr(self, f"class_means_{task.index}"),
        }

    # --- inference ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def task_weights(self, images: torch.Tensor) -> torch.Tensor:
        """``[batch, tasks]``: softmax over tasks of the best frozen-feature cosine to a task's class means."""
        assert self.visual is not None
        with self.visual.disable_adapter():
            frozen = self.backbone.encode_images(images).float()
        best = torch.stack([(frozen @ getattr(self, f"class_means_{t.index}").T).max(dim=1).values
                            for t in self.tasks], dim=1)
        return (self.backbone.logit_scale().float() * best).softmax(dim=1)

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        assert self.visual is not None
        text_features = torch.cat([self._text_features(t) for t in self.tasks])
        scale = self.backbone.logit_scale()
        weights = self.task_weights(images)
        scores = []
        try:
            for i, task in enumerate(self.tasks):
                self.visual.base_model.set_adapter(self.adapter_name(task))
                image_features = self.backbone.encode_images(images)
                probs = (scale * image_features @ text_features.T).float().softmax(dim=-1)
                scores.append(weights[:, i : i + 1] * probs[:, task.class_slice])
        finally:
            self.visual.base_model.set_adapter(self.adapter_name(self.tasks[-1]))
        combined = torch.cat(scores, dim=1)
        return combined / combined.sum(dim=1, keepdim=True)
