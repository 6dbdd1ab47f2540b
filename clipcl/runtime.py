"""What every command that runs a model shares: the progress channel, the Accelerate runtime, data loaders, and the
checks of their settings.

Training (:mod:`clipcl.engine`) and evaluation (:mod:`clipcl.evaluation`) both build on this module and on nothing of
each other.
"""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING, Any

from .errors import ClipclError
from .reading import MIB
from .version import __version__

if TYPE_CHECKING:  # the CLI reads this module's settings before it knows whether a model will run
    import torch
    from torch.utils.data import DataLoader

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


class Progress:
    """What the library tells its caller while it works; the CLI draws it with rich, the library stays silent."""

    def warn(self, message: str) -> None:
        """Something the user should know that does not stop the run (a skipped file, a missing test folder)."""

    def info(self, message: str) -> None:
        """Where a longer run stands (which method, which task)."""

    def stage_start(self, description: str, total: int) -> None:
        """A stage of ``total`` steps begins (scanning, an epoch loop, evaluation)."""

    def stage_advance(self, steps: int = 1, **metrics: float) -> None:
        """``steps`` more steps are done; ``metrics`` are running figures such as ``loss`` or ``images_per_s``."""

    def stage_end(self) -> None:
        """The current stage is finished."""


def make_accelerator(precision: str) -> Any:
    import torch
    from accelerate import Accelerator

    if precision not in PRECISIONS:
        raise ClipclError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and not torch.cuda.is_available():
        raise ClipclError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    try:
        return Accelerator(mixed_precision=PRECISIONS[precision])
    except ValueError as exc:
        raise ClipclError(f"cannot use --precision {precision}: {exc}") from exc


def check_loader_options(batch_size: int, workers: int) -> None:
    if batch_size < 1 or workers < 0:
        raise ClipclError("--batch-size must be at least 1 and --workers at least 0")


def check_max_image_mb(max_image_mb: float) -> int:
    """The image size limit in bytes; refused unless positive."""
    if not max_image_mb > 0:
        raise ClipclError(f"--max-image-mb must be positive, got {max_image_mb}")
    return int(max_image_mb * MIB)


def require_single_process(command: str) -> None:
    """Refuse a command that does not split its work across processes when started under torchrun or Accelerate."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ClipclError(f"{command} runs in one process: start it without torchrun or accelerate launch")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"clipcl": __version__, "python": platform.python_version()}
    for package in ("torch", "open_clip_torch", "peft", "accelerate", "safetensors"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int, shuffle: bool = False,
                seed: int = 0) -> DataLoader:
    """A loader over ``dataset``; shuffled by its own seeded generator, so its order can be checkpointed."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
