"""Deep visual prompts (VPT-deep) around open_clip's ViT image tower, with zero-initialised gates: tppt's prompts.

Block ``i`` gets ``tokens[i]`` (``[n, width]``) inserted right after the class token at its input and dropped again
at its output, so every block sees fresh prompts and the pooled output keeps its shape. Two ways to attend to them:

* ``gated``: the sequence attends to its own tokens as in the frozen model, plus ``tanh(gates[i])`` times its
  attention over the prompt tokens (zero-initialised gating, as in LLaMA-Adapter): with the gates at zero the tower
  computes exactly what the frozen one computes, and the prompts' influence grows as the gates learn;
* ``joint``: standard VPT-deep (Jia et al., 2022), the prompts in the same softmax as the tokens (no gates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import AttentionFunction, Backbone, linearize_attention, vision_blocks
from ..errors import ModelError

TOKENS_KEY = "vpt.tokens"
GATES_KEY = "vpt.gates"
NEEDS_VIT = "deep visual prompts need a ViT image tower"
ATTENTIONS = ("gated", "joint")


def gated_prompt_attention(n_prompts: int, gate: Callable[[], torch.Tensor]) -> AttentionFunction:
    """Attention over the sequence's own tokens (the class token and the patches), plus ``gate()`` times attention
    over the ``n_prompts`` prompt tokens that follow the class token."""

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                  dropout: float) -> torch.Tensor:
        if attn_mask is not None:
            raise ModelError("deep visual prompts do not support an attention mask in the image tower")
        own = torch.cat([torch.arange(1), torch.arange(n_prompts + 1, k.shape[2])]).to(k.device)
        out = F.scaled_dot_product_attention(q, k[:, :, own], v[:, :, own], dropout_p=dropout)
        prompted = F.scaled_dot_product_attention(q, k[:, :, 1 : n_prompts + 1], v[:, :, 1 : n_prompts + 1],
                                                  dropout_p=dropout)
        return out + gate().to(out.dtype) * prompted

    return attention


def joint_prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                           dropout: float) -> torch.Tensor:
    """VPT-deep's attention: the prompts are keys and values like any other token."""
    if attn_mask is not None:
        raise ModelError("deep visual prompts do not support an attention mask in the image tower")
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)


def attach_deep_prompts(visual: nn.Module, model_name: str, tokens: nn.Parameter, gates: nn.Parameter,
                        attention: str = "gated") -> None:
    """Put ``tokens[i]`` into block ``i`` of ``visual`` for every block, attended to as ``attention`` says
    (``gated``: scaled by ``tanh(gates[i])``; ``joint``: in the tokens' own softmax)."""
    if attention not in ATTENTIONS:
        raise ModelError(f"prompt attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    blocks, batch_first = vision_blocks(visual, model_name, NEEDS_VIT)
    linearize_attention(visual)
    n = tokens.shape[1]
    seq_dim = 1 if batch_first else 0

    for i, block in enumerate(blocks):
        block.attn.attention = (gated_prompt_attention(n, lambda i=i: torch.tanh(gates[i])) if attention == "gated"
                                else joint_prompt_attention)

        def insert(_module: nn.Module, args: tuple, kwargs: dict, i: int = i) -> tuple[tuple, dict]:
            x = args[0] if args else kwargs.pop("q_x")
            prompt = tokens[i].to(x.dtype)
            if batch_first:
                prompt = prompt.unsqueeze(0).expand(x.shape[0], -1, -1)
            else:
                prompt = prompt.unsqueeze(1).expand(-1, x.shape[1], -1)
            x = torch.cat([x.narrow(seq_dim, 0, 1), prompt, x.narrow(seq_dim, 1, x.shape[seq_dim] - 1)], dim=seq_dim)
            return (x, *args[1:]), kwargs

        def drop(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
            rest = output.shape[seq_dim] - n - 1
            return torch.cat([output.narrow(seq_dim, 0, 1), output.narrow(seq_dim, n + 1, rest)], dim=seq_dim)

        block.register_forward_pre_hook(insert, with_kwargs=True)
        block.register_forward_hook(drop)


class DeepVisualPrompts(nn.Module):
    """``[blocks, n, width]`` prompt tokens and one gate per block, attached to a ViT image tower."""

    def __init__(self, backbone: Backbone, n_tokens: int, attention: str = "gated") -> None:
        super().__init__()
        visual = backbone.model.visual
        blocks, _ = vision_blocks(visual, backbone.spec.name, NEEDS_VIT)
        width = blocks[0].ln_1.normalized_shape[0]
        device = next(visual.parameters()).device
        self.tokens = nn.Parameter(torch.randn(len(blocks), n_tokens, width, device=device) * 0.02)
        self.gates = nn.Parameter(torch.zeros(len(blocks), device=device))
        attach_deep_prompts(visual, backbone.spec.name, self.tokens, self.gates, attention)
        self.attention = attention

    def trainable(self) -> list[nn.Parameter]:
        """What learns: the tokens, and the gates where attention to the prompts is gated."""
        return [self.tokens, self.gates] if self.attention == "gated" else [self.tokens]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {TOKENS_KEY: self.tokens.detach().clone(), GATES_KEY: self.gates.detach().clone()}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors[TOKENS_KEY].shape != self.tokens.shape:
            raise ValueError(f"stored visual prompts have shape {tuple(tensors[TOKENS_KEY].shape)}, "
                             f"this model needs {tuple(self.tokens.shape)}")
        self.tokens.copy_(tensors[TOKENS_KEY])
        self.gates.copy_(tensors[GATES_KEY])

    @contextmanager
    def using(self, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
        """Run the tower with the prompts ``tensors`` (e.g. as they stood before the task) and put the current ones
        back afterwards; for computations without gradients to the prompts."""
        current = self.tensors()
        self.load(tensors)
        try:
            yield
        finally:
            self.load(current)
