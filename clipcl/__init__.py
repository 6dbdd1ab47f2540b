"""clipcl: teach a CLIP model new classes from image folders, task after task, without forgetting the old ones."""

from .backbone import ModelSpec, load_backbone, resolve_model_spec
from .engine import TaskReport, TrainOptions, add_task
from .errors import ClipclError, DataError, ModelError, WorkspaceError
from .inference import EvalReport, ImagePrediction, evaluate, expand_image_paths, predict_images
from .methods import Method, Prediction, TaskInfo, available_methods, register_method
from .records import TaskRecord
from .runtime import Progress
from .version import __version__
from .workspace import Workspace


def init_workspace(path: str, model: str, pretrained: str | None = None, method: str = "dma",
                   options: dict[str, str] | None = None) -> Workspace:
    """Create a workspace for ``model`` (open_clip name, ``hf-hub:`` id or config JSON) and ``method``."""
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
    "resolve_model_spec",
]
