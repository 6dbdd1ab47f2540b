"""Registered continual-learning methods. Importing a method's module registers it.

``base`` holds the interface (:class:`Method`, its config mixins, the registry), ``components`` and ``routing`` the
parts several methods share (LoRA by name, prompts, pooled Gaussians, task routing), ``visual_prompts``, ``losses``
and ``gaussian`` the parts of one family each; every other module is one method (docs/methods.md).
"""

from . import baselines, cma, dma, dmc, finetune, tppt  # noqa: F401
from .base import (
    ROUTE_ALL,
    Method,
    MethodConfig,
    Prediction,
    Route,
    TaskInfo,
    available_methods,
    build_config,
    check_inference_overrides,
    get_method_class,
    parse_route,
    register_method,
)

__all__ = [
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
]
