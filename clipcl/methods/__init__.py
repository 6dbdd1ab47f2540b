"""Registered continual-learning methods. Importing a method's module registers it.

Nothing heavy is imported with this package: :mod:`.catalog` names the built-in methods, and the interface is
loaded on first use (the registry imports a method's module when it is needed). ``base`` holds the interface
(:class:`Method`, its config mixins, the registry), ``components`` and ``routing`` the parts several methods share
(LoRA by name, prompts, pooled Gaussians, task routing), ``visual_prompts``, ``losses`` and ``gaussian`` the parts
of one family each; every other module is one method (docs/methods.md).
"""

import importlib
from typing import Any

from .catalog import BUILTIN_METHODS, method_summaries  # torch-free, for the CLI's help

_FROM_BASE = (
    "ROUTE_ALL",
    "Method",
    "MethodConfig",
    "Prediction",
    "Route",
    "TaskInfo",
    "available_methods",
    "build_config",
    "check_inference_overrides",
    "get_method_class",
    "parse_route",
    "register_method",
)


def __getattr__(name: str) -> Any:
    """Load the interface (torch, peft) on first use rather than on ``import clipcl.methods``: PEP 562."""
    if name in _FROM_BASE:
        return getattr(importlib.import_module(".base", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BUILTIN_METHODS", "method_summaries", *_FROM_BASE]
