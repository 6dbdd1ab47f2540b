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
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError
from .fingerprint_cache import FILE_SHA256, FingerprintCache, file_identity, model_value_name
from .modelspec import ModelSpec, resolve_model_spec  # noqa: F401  (re-exported: clipcl.backbone's public names)
from .reading import sha256_of_file

CONTEXT_PLACEHOLDER = "X"
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


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


def _file_sha256(path: Path, cache: FingerprintCache) -> str:
    """The sha256 of a weights file, kept from an earlier load while the file is unchanged
    (:mod:`clipcl.fingerprint_cache`)."""
    known = cache.lookup(path, FILE_SHA256)
    if known is not None:
        return known
    identity = file_identity(path)
    digest = sha256_of_file(path)
    cache.record(path, identity, FILE_SHA256, digest)
    return digest


def _local_weights_sha(spec: ModelSpec, cache: FingerprintCache | None = None) -> None:
    if spec.pretrained_sha256 is None or spec.pretrained is None:
        return
    path = Path(spec.pretrained)
    if not path.is_file():
        raise ModelError(f"the base model's weights file is gone: {path}")
    if _file_sha256(path, cache or FingerprintCache(None)) != spec.pretrained_sha256:
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


@dataclass(frozen=True)
class _CheckpointRead:
    """A file open_clip loaded a model's weights from: its identity before it was read
    (:func:`~clipcl.fingerprint_cache.file_identity`), and whether it was loaded into every tensor of the model
    (strictly, not a big_vision ``.npz`` that open_clip converts tensor by tensor)."""

    path: str
    identity: dict[str, int] | None
    whole: bool


@contextlib.contextmanager
def _checkpoints_read() -> Iterator[list[_CheckpointRead]]:
    """Record each file open_clip loads a model's weights from while inside (its ``load_checkpoint``)."""
    factory = getattr(open_clip, "factory", None)
    original = getattr(factory, "load_checkpoint", None)
    read: list[_CheckpointRead] = []
    if original is None:  # an open_clip that loads otherwise: nothing is recorded, so nothing is assumed
        yield read
        return

    def recording(model: nn.Module, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        strict = kwargs.get("strict", args[0] if args else True)
        whole = strict is True and Path(str(checkpoint_path)).suffix not in (".npz", ".npy")
        read.append(_CheckpointRead(str(checkpoint_path), file_identity(checkpoint_path), whole))
        return original(model, checkpoint_path, *args, **kwargs)

    factory.load_checkpoint = recording
    try:
        yield read
    finally:
        factory.load_checkpoint = original


def _whole_checkpoint(read: list[_CheckpointRead]) -> _CheckpointRead | None:
    """The one file every tensor of the model came from, if that is how it was loaded."""
    return read[0] if len(read) == 1 and read[0].whole else None


# torch.nn.init's functions that draw or set a tensor's initial values (what nn.Linear, nn.Embedding, nn.LayerNorm
# and open_clip's own init_parameters call)
INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                  "sparse_")


@contextlib.contextmanager
def _initialisation_skipped(skip: bool) -> Iterator[None]:
    """While inside (with ``skip``), torch.nn.init's functions leave tensors as they are. open_clip draws random
    values for every tensor of a model before it loads the checkpoint over them: for a ViT-B/16 on a CPU that is
    most of the time creating the model takes, for values that are never used. Only valid when the whole
    checkpoint is then loaded strictly (:func:`load_backbone` checks that, and builds the model again otherwise)."""
    saved = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS if hasattr(torch.nn.init, name)} \
        if skip else {}

    def left_as_is(tensor: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        return tensor

    for name in saved:
        setattr(torch.nn.init, name, left_as_is)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _model_fingerprint(model: nn.Module, spec: ModelSpec, read: list[_CheckpointRead], cache: FingerprintCache
                       ) -> str:
    """:func:`weights_fingerprint` of ``model``, kept per weights file: when every tensor came from one file (open_clip
    loads it strictly, so each tensor is the file's) that is unchanged since an earlier load hashed the same model
    built from it, that load's fingerprint; otherwise computed, and kept for the next load."""
    source = _whole_checkpoint(read)
    if source is None or source.identity is None:
        return weights_fingerprint(model)
    value_name = model_value_name(spec.name, spec.config, {"torch": torch.__version__,
                                                           "open_clip": open_clip.__version__})
    known = cache.lookup(source.path, value_name)
    if known is not None and file_identity(source.path) == source.identity:  # the file read is the one hashed
        return known
    fingerprint = weights_fingerprint(model)
    cache.record(source.path, source.identity, value_name, fingerprint)
    return fingerprint


def load_backbone(spec: ModelSpec, config_dir: Path | None = None, device: str | torch.device = "cpu",
                  fingerprint_cache: FingerprintCache | None = None) -> Backbone:
    """Build the frozen base model for ``spec``; ``config_dir`` holds the stored model-config JSON, if any.

    The sha256 of a local weights file and the fingerprint of the loaded tensors are taken from
    ``fingerprint_cache`` (by default the user's, :mod:`clipcl.fingerprint_cache`) while the file is unchanged
    since they were computed, so a second load of the same weights hashes nothing; and a model whose weights come
    from a checkpoint is not first filled with random values (:func:`_initialisation_skipped`)."""
    cache = fingerprint_cache or FingerprintCache.default()
    if spec.config is not None:
        if config_dir is None or not (config_dir / f"{spec.name}.json").is_file():
            raise ModelError(f"the model config for {spec.name} is missing from the workspace")
        open_clip.add_model_config(config_dir / f"{spec.name}.json")
    _local_weights_sha(spec, cache)

    def create(skip_initialisation: bool) -> tuple[tuple[Any, Any, Any], list[_CheckpointRead]]:
        with _pickle_free_loading(), _checkpoints_read() as read, _initialisation_skipped(skip_initialisation):
            created = open_clip.create_model_and_transforms(spec.name, pretrained=spec.pretrained, device=device)
        return created, read

    try:
        (model, train_transform, eval_transform), read = create(skip_initialisation=spec.pretrained is not None)
        if spec.pretrained is not None and _whole_checkpoint(read) is None:  # a tensor may have kept no value
            (model, train_transform, eval_transform), read = create(skip_initialisation=False)
        tokenizer = open_clip.get_tokenizer(spec.name)
    except Exception as exc:  # open_clip, torch.load and the hub raise many types; each means "cannot load"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {spec.describe()}: {first_line}") from exc
    model.eval()
    model.requires_grad_(False)
    return Backbone(model, tokenizer, train_transform, eval_transform, spec,
                    _model_fingerprint(model, spec, read, cache))


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
