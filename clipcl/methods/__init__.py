"""Registered continual-learning methods. Importing a method's module registers it."""

from . import baselines, cma, dma, dmc, finetune, tppt  # noqa: F401
from .base import (
    Method,
    MethodConfig,
    Prediction,
    TaskInfo,
    available_methods,
    build_config,
    get_method_class,
    register_method,
)

__all__ = [
    "Method",
    "MethodConfig",
    "Prediction",
    "TaskInfo",
    "available_methods",
    "build_config",
    "get_method_class",
    "register_method",
]
