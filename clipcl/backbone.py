"""The frozen CLIP that every method builds on, loaded through open_clip only.

A model is named the way open_clip names it: a built-in architecture with a pretrained tag or weights file
(``ViT-B-16`` + ``openai``), an ``hf-hub:ORG/NAME`` id, or the path of a model-config JSON in open_clip's format
(stored inside the workspace, so the workspace keeps working when the original file moves).

Two small adaptations make open_clip's modules fit parameter-efficient tuning without copying its source:

* :func:`linearize_attention` swaps each ``nn.MultiheadAttention`` of a tower for :class:`LinearAttention`, which
  computes the same function with ``nn.Linear`` projections. peft's LoRA for ``nn.MultiheadAttention`` has to merge
  the adapter into the base weight before each forward and subtract it after, so the frozen weights drift by
  rounding on every step; on plain linear layers LoRA never touches them.
* :func:`encode_text_with_context` feeds learnable context vectors through the frozen text encoder by replacing the
  output of open_clip's token embedding at the placeholder positions (CoOp's scheme), then runs open_clip's own
  ``encode_text``.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError
from .reading import read_json_bounded, regular_file_problem, sha256_of_file

CONTEXT_PLACEHOLDER = "X"
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the same base model in another process.

    ``config`` holds the model-config JSON's content for custom architectures; ``pretrained_sha256`` fingerprints a
    local weights file so that adapters are never loaded on top of different weights.
    """

    name: str
    pretrained: str | None = None
    pretrained_sha256: str | None = None
    config: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**{k: data.get(k) for k in ("name", "pretrained", "pretrained_sha256", "config")})

    def describe(self) -> str:
        if self.pretrained is None:
            return self.name
        return f"{self.name} ({Path(self.pretrained).name if self.pretrained_sha256 else self.pretrained})"


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.lower().endswith((*WEIGHT_SUFFIXES, ".json"))


def resolve_model_spec(model: str, pretrained: str | None, allow_random_weights: bool = False) -> ModelSpec:
    """Check a ``--model``/``--pretrained`` pair without loading weights, and pin it down as a :class:`ModelSpec`.

    A model without pretrained weights is refused unless ``allow_random_weights``: open_clip would initialise it
    randomly on every load, so adapters stored on top of it could never be used again.
    """
    config = None
    if model.lower().endswith(".json"):
        path = Path(model).expanduser()
        problem = regular_file_problem(path)
        if problem is not None:
            raise ModelError(f"model config not found: {path}" if problem == "missing"
                             else f"cannot read model config {path}: {problem}")
        try:
            config = read_json_bounded(path)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read model config {path}: {exc}") from exc
        if not isinstance(config, dict) or not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ModelError(f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        name = path.stem
    elif model.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        name = model
        if pretrained is not None:
            raise ModelError(f"{model} carries its own weights: drop --pretrained")
    else:
        name = model
        known = open_clip.list_models()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (see open_clip.list_models())"
            raise ModelError(f"unknown model {name!r}{hint}")

    sha = None
    if pretrained is not None and (Path(pretrained).expanduser().exists() or _looks_like_path(pretrained)):
        path = Path(pretrained).expanduser()
        problem = regular_file_problem(path)
        if problem is not None:
            raise ModelError(f"pretrained weights file not found: {path}" if problem == "missing"
                             else f"cannot use the pretrained weights {path}: {problem}")
        pretrained = str(path.resolve())
        sha = sha256_of_file(path)
    elif pretrained is not None and config is None:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            offered = ", ".join(tags) if tags else "none; pass a weights file"
            raise ModelError(f"unknown pretrained tag {pretrained!r} for {name} (known: {offered})")
    elif pretrained is not None:
        raise ModelError(f"a custom model config takes a weights file for --pretrained, not the tag {pretrained!r}")
    elif not name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)) and not allow_random_weights:
        raise ModelError(f"--pretrained is required for {name}: a tag such as openai, or a weights file")
    return ModelSpec(name=name, pretrained=pretrained, pretrained_sha256=sha, config=config)


# (q, k, v as [batch, heads, length, head width], attention mask or None, dropout) -> [batch, heads, length, width]
AttentionFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]


class LinearAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, same q/k/v width) rebuilt on ``nn.Linear`` projections.

    Accepts the call open_clip makes (``attn(q, k, v, need_weights=False, attn_mask=mask)``) and returns the same
    ``(output, None)`` pair. ``q_proj``/``k_proj``/``v_proj``/``out_proj`` are plain linear layers that peft can adapt,
    and ``attention`` lets a method compute the attention itself from the projected heads.
    """

    def __init__(self, source: nn.MultiheadAttention) -> None:
        super().__init__()
        if not source._qkv_same_embed_dim or source.bias_k is not None:
            raise ModelError("this model's attention layout is not supported (separate k/v widths or bias_kv)")
        dim = source.embed_dim
        self.num_heads = source.num_heads
        self.batch_first = source.batch_first
        self.dropout = source.dropout
        has_bias = source.in_proj_bias is not None
        weight_q, weight_k, weight_v = source.in_proj_weight.detach().chunk(3)
        biases = source.in_proj_bias.detach().chunk(3) if has_bias else (None, None, None)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=has_bias) for _ in range(3))
        for layer, weight, bias in zip((self.q_proj, self.k_proj, self.v_proj), (weight_q, weight_k, weight_v),
                                       biases, strict=True):
            layer.to(device=weight.device, dtype=weight.dtype)
            layer.weight.data.copy_(weight)
            if bias is not None:
                layer.bias.data.copy_(bias)
        self.out_proj = nn.Linear(dim, dim, bias=source.out_proj.bias is not None)
        self.out_proj.to(device=source.out_proj.weight.device, dtype=source.out_proj.weight.dtype)
        self.out_proj.load_state_dict(source.out_proj.state_dict())
        # a method may replace the attention itself (tppt's gated prompt attention); a plain callable, not a module,
        # so what it holds stays owned by the method that trains it
        self.attention: AttentionFunction | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> tuple[torch.Tensor, None]:
        key = query if key is None else key
        value = query if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, dim = query.shape
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, x.shape[1], heads, dim // heads).transpose(1, 2)

        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        elif attn_mask is not None:
            attn_mask = ~attn_mask  # nn.MultiheadAttention masks True positions; SDPA keeps them
        dropout = self.dropout if self.training else 0.0
        if self.attention is not None:
            out = self.attention(q, k, v, attn_mask, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def vision_blocks(visual: nn.Module, model_name: str, purpose: str = "this method needs a ViT image tower"
                  ) -> tuple[nn.ModuleList, bool]:
    """The residual blocks of open_clip's ViT image tower and whether it runs batch-first; a clear error (ending in
    ``purpose``) for a tower that is not a transformer (ModifiedResNet, timm towers)."""
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(visual, "class_embedding"):
        raise ModelError(f"{model_name} has no open_clip vision transformer ({type(visual).__name__}): {purpose}")
    return blocks, bool(getattr(transformer, "batch_first", True))


def linearize_attention(module: nn.Module) -> int:
    """Replace every self-attention ``nn.MultiheadAttention`` below ``module`` in place; return how many."""
    replaced = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(parent, child_name, LinearAttention(child))
                replaced += 1
    return replaced


@dataclass
class Backbone:
    """The loaded open_clip model (frozen), its tokenizer and its train/eval transforms, and the fingerprint of its
    weights as loaded (:func:`weights_fingerprint`, taken before any adapter is attached)."""

    model: nn.Module
    tokenizer: Callable
    train_transform: Callable
    eval_transform: Callable
    spec: ModelSpec
    weights_fingerprint: str = ""

    def token_embedding(self) -> nn.Embedding:
        """open_clip's text token embedding, for methods that learn prompts."""
        owner = getattr(self.model, "text", self.model)
        embedding = getattr(owner, "token_embedding", None)
        if not isinstance(embedding, nn.Embedding):
            raise ModelError(f"{self.spec.name} has no open_clip text transformer: learnable prompts need one")
        return embedding

    def context_length(self) -> int:
        owner = getattr(self.model, "text", self.model)
        return int(getattr(owner, "context_length", getattr(self.model, "context_length", 77)))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Normalised text features of plain strings (zero-shot classifier weights)."""
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenize(texts).to(device), normalize=True)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()


def _local_weights_sha(spec: ModelSpec) -> None:
    if spec.pretrained_sha256 is None or spec.pretrained is None:
        return
    path = Path(spec.pretrained)
    if not path.is_file():
        raise ModelError(f"the base model's weights file is gone: {path}")
    if sha256_of_file(path) != spec.pretrained_sha256:
        raise ModelError(f"the base model's weights file changed since the workspace was created: {path}")


@contextlib.contextmanager
def _pickle_free_loading() -> Iterator[None]:
    """Make every ``torch.load`` inside (open_clip's included, whatever it passes) use ``weights_only=True``: a
    checkpoint file can then hold tensors and plain containers only, never code that runs when it is read."""
    saved = {key: os.environ.pop(key, None) for key in (FORCE_WEIGHTS_ONLY, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the base model's tensors (dtype, shape and bytes of each, in a canonical order independent of
    their names): identifies the weights however they were obtained (a tag, the hub, a file), so adapters are never
    applied to a different base model, while a library update that only renames parameters changes nothing."""
    digests = []
    for tensor in model.state_dict().values():
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest = hashlib.sha256(f"{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        digests.append(digest.hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()


def load_backbone(spec: ModelSpec, config_dir: Path | None = None, device: str | torch.device = "cpu") -> Backbone:
    """Build the frozen base model for ``spec``; ``config_dir`` holds the stored model-config JSON, if any."""
    if spec.config is not None:
        if config_dir is None or not (config_dir / f"{spec.name}.json").is_file():
            raise ModelError(f"the model config for {spec.name} is missing from the workspace")
        open_clip.add_model_config(config_dir / f"{spec.name}.json")
    _local_weights_sha(spec)
    try:
        with _pickle_free_loading():
            model, train_transform, eval_transform = open_clip.create_model_and_transforms(
                spec.name, pretrained=spec.pretrained, device=device
            )
        tokenizer = open_clip.get_tokenizer(spec.name)
    except Exception as exc:  # open_clip, torch.load and the hub raise many types; each means "cannot load"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {spec.describe()}: {first_line}") from exc
    model.eval()
    model.requires_grad_(False)
    return Backbone(model, tokenizer, train_transform, eval_transform, spec, weights_fingerprint(model))


def context_tokens(backbone: Backbone, class_names: list[str], n_context: int) -> torch.Tensor:
    """Token ids of ``"X X ... X <class name>."`` for each class: the X positions (1..n) carry learned context."""
    placeholder = " ".join([CONTEXT_PLACEHOLDER] * n_context)
    return backbone.tokenize([f"{placeholder} {name}." for name in class_names])


def phrase_embedding(backbone: Backbone, phrase: str) -> torch.Tensor:
    """Token embeddings of ``phrase`` (without start/end tokens): an initial value for learnable context."""
    tokens = backbone.tokenize([phrase])[0]
    end = int(tokens.argmax())
    embedding = backbone.token_embedding()
    with torch.no_grad():
        return embedding(tokens[1:end].to(embedding.weight.device)).detach().clone()


@contextlib.contextmanager
def _context_injected(embedding: nn.Embedding, context: torch.Tensor) -> Iterator[None]:
    n = context.shape[-2]

    def replace(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        ctx = context.to(output.dtype)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :1], ctx, output[:, 1 + n :]], dim=1)

    handle = embedding.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def encode_text_with_context(backbone: Backbone, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Normalised text features of prompts whose placeholder positions hold ``context``.

    ``tokens``: ``[C, L]`` from :func:`context_tokens`; ``context``: ``[C, M, D]`` (one context per class) or
    ``[M, D]`` (shared). Gradients flow into ``context``; the text encoder itself stays frozen.
    """
    with _context_injected(backbone.token_embedding(), context):
        return backbone.model.encode_text(tokens, normalize=True)
