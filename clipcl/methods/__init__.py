"""Registered continual-learning methods. Importing a method's module registers it."""

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
