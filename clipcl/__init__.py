"""clipcl: teach a CLIP model new classes from image folders, task after task, without forgetting the old ones.

The public names below are loaded on first use (PEP 562), so ``import clipcl`` and the CLI's ``--help`` cost
milliseconds; torch, open_clip and peft are imported only by the code that trains or predicts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_EXPORTS = {
    "ClipclError": ".errors",
    "DataError": ".errors",
    "ModelError": ".errors",
    "WorkspaceError": ".errors",
    "ModelSpec": ".modelspec",
    "resolve_model_spec": ".modelspec",
    "load_backbone": ".backbone",
    "TaskReport": ".engine",
    "TrainOptions": ".engine",
    "add_task": ".engine",
    "EvalReport": ".inference",
    "ImagePrediction": ".inference",
    "evaluate": ".inference",
    "expand_image_paths": ".inference",
    "predict_images": ".inference",
    "Method": ".methods",
    "Prediction": ".methods",
    "TaskInfo": ".records",
    "available_methods": ".methods",
    "register_method": ".methods",
    "TaskRecord": ".records",
    "Progress": ".runtime",
    "Workspace": ".workspace",
    "remove_task": ".workspace",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ loads each name on first use
    from .backbone import load_backbone
    from .engine import TaskReport, TrainOptions, add_task
    from .errors import ClipclError, DataError, ModelError, WorkspaceError
    from .inference import EvalReport, ImagePrediction, evaluate, expand_image_paths, predict_images
    from .methods import Method, Prediction, available_methods, register_method
    from .modelspec import ModelSpec, resolve_model_spec
    from .records import TaskInfo, TaskRecord
    from .runtime import Progress
    from .workspace import Workspace, remove_task


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


def init_workspace(path: str, model: str, pretrained: str | None = None, method: str = "dma",
                   options: dict[str, str] | None = None) -> Workspace:
    """Create a workspace for ``model`` (open_clip name, ``hf-hub:`` id or config JSON) and ``method``."""
    from .modelspec import resolve_model_spec
    from .workspace import Workspace

    return Workspace.create(path, resolve_model_spec(model, pretrained), method, options)


__all__ = [
    "ClipclError",
    "DataError",
    "EvalReport",
    "ImagePrediction",
    "Method",
    "ModelError",
    "ModelSpec",
    "Prediction",
    "Progress",
    "TaskInfo",
    "TaskRecord",
    "TaskReport",
    "TrainOptions",
    "Workspace",
    "WorkspaceError",
    "__version__",
    "add_task",
    "available_methods",
    "evaluate",
    "expand_image_paths",
    "init_workspace",
    "load_backbone",
    "predict_images",
    "register_method",
    "remove_task",
    "resolve_model_spec",
]
