"""Decode once: a task's images decoded and resized once per run, kept as uint8, and augmented batch-wise.

``add-task`` used to decode every JPEG again in every epoch and in every pass that gathers statistics. Instead,
:func:`build_image_cache` decodes each training image once (with the scan's bounds) and keeps two uint8 versions of
it, both taken from that one decode:

* for training, the image resized (aspect kept, never enlarged) to the smallest size at which every crop the train
  transform can draw still has at least the output's resolution (:meth:`CropPlan.cache_size`): for open_clip's
  default train transform (``RandomResizedCrop(scale=(0.9, 1))``) that is about the output size, so a 4000x3000 photo
  is kept at 315x236 for 224 px, while a 64x64 image is kept as it is. Each batch, :class:`CachedTrainImages` draws
  the crops by torchvision's ``RandomResizedCrop`` algorithm in the *original* image's pixel grid (the same crop
  distribution as decoding and cropping the file; the random numbers of a batch are drawn at once), maps them to the
  cached grid (rounded to the nearest cached pixel), then crops, resizes (the transform's interpolation,
  antialiased), converts and normalises the uint8 tensors: on the CPU image by image on ``threads`` threads of its
  own, on a GPU on the device, the conversion and normalisation batch-wise. open_clip's optional colour jitter and
  grey-scale steps are applied per image from the same random stream. Where the cached image is the original (small
  images) the result differs from the file-decoding path's only by the resampler (torch's antialiased bicubic
  against Pillow's, about one grey level on average); where it was shrunk, also by that first resize.
* for statistics and evaluation, the eval transform's output before ``ToTensor`` (resize and centre crop): that part
  is deterministic, and the conversion and normalisation that follow run on the cached pixels exactly as they ran on
  the decoded image, so :class:`CachedEvalImages` yields the very tensors :class:`~clipcl.data.ImageDataset` does.

Randomness: augmentation never touches the global random state. Each epoch's augmentation generator is seeded by one
draw from the run's data-order generator (:meth:`CachedTrainImages.epoch_augmenter`), which the epoch checkpoint
saves, so an interrupted run that resumes draws the same crops as an uninterrupted one.

Memory: the cache stays in memory while all of a build's cached bytes fit ``memory_limit`` (default 2 GiB, or
``$CLIPCL_CACHE_MEMORY_MB``); beyond it, each store streams to a file under ``spill_dir`` (for ``add-task``
``<workspace>/cache/images/``, :data:`SPILL_DIR`: outside the committed state, beside ``cache/features/``) that is
memory-mapped and read back through the page cache. The file is unlinked as soon as it is created, so it never outlives
the process, even one that is killed, and nothing is ever left to clean up.

A train transform of another shape (timm's, or a custom one) is not cached: :func:`plan_train_transform` answers
``None`` and training decodes every epoch as before.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from .data import ImageItem, load_image_checked
from .errors import ClipclError, DataError
from .reading import DEFAULT_MAX_IMAGE_BYTES, MIB
from .runtime import Progress

SPILL_DIR = Path("cache") / "images"  # below the workspace, beside cache/features/; never committed state
MEMORY_LIMIT_ENV = "CLIPCL_CACHE_MEMORY_MB"
DEFAULT_MEMORY_LIMIT = 2048 * MIB
_DECODE_CHUNK = 256  # images decoded per round of the thread pool: bounds what waits in memory to be stored


def memory_limit_from_env() -> int:
    """The in-memory cache limit in bytes: ``$CLIPCL_CACHE_MEMORY_MB`` when set (0 maps every cache to a file)."""
    value = os.environ.get(MEMORY_LIMIT_ENV)
    if value is None or not value.strip():
        return DEFAULT_MEMORY_LIMIT
    try:
        megabytes = float(value)
    except ValueError:
        raise ClipclError(f"${MEMORY_LIMIT_ENV} must be a number of MiB, got {value!r}") from None
    if not megabytes >= 0:
        raise ClipclError(f"${MEMORY_LIMIT_ENV} cannot be negative, got {value!r}")
    return int(megabytes * MIB)


# --- the store: uint8 arrays in memory or in one memory-mapped file -------------------------------------------------
class _Budget:
    """The in-memory bytes left to the stores of one build; a store that would overdraw it moves to a file."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, nbytes: int) -> bool:
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.left += nbytes


class ImageStore:
    """Images as uint8 ``[H, W, C]`` tensors, by index: held in memory, or views of one memory-mapped file."""

    def __init__(self, arrays: list[torch.Tensor] | None, buffer: torch.Tensor | None, offsets: list[int],
                 shapes: list[tuple[int, ...]], mapping: mmap.mmap | None) -> None:
        self._arrays = arrays
        self._buffer = buffer
        self._offsets = offsets
        self._shapes = shapes
        self._mapping = mapping
        self._closed = False

    def __len__(self) -> int:
        return len(self._shapes)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._closed:
            raise RuntimeError("this image cache was closed")
        if self._arrays is not None:
            return self._arrays[index]
        assert self._buffer is not None
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._buffer[start:end].view(self._shapes[index])

    @property
    def nbytes(self) -> int:
        return self._offsets[-1]

    @property
    def mapped(self) -> bool:
        """Whether the images live in a memory-mapped file rather than in memory."""
        return self._mapping is not None

    def close(self) -> None:
        """Drop the images (the memory, or the mapping of the already unlinked file)."""
        self._arrays = self._buffer = None
        self._closed = True
        if self._mapping is not None:
            with contextlib.suppress(BufferError):  # a tensor still points into it: it goes with the last of them
                self._mapping.close()
            self._mapping = None


class _StoreWriter:
    """Collects one store's arrays in order; moves them to an unlinked file once the budget is spent."""

    def __init__(self, budget: _Budget, spill_dir: Path | None) -> None:
        self.budget = budget
        self.spill_dir = spill_dir
        self.parts: list[np.ndarray] = []
        self.offsets = [0]
        self.shapes: list[tuple[int, ...]] = []
        self.file: Any = None

    def add(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.uint8)
        self.shapes.append(tuple(array.shape))
        self.offsets.append(self.offsets[-1] + array.nbytes)
        if self.file is None and not self.budget.take(array.nbytes):
            self._spill()
        if self.file is not None:
            self.file.write(memoryview(array).cast("B"))
        else:
            self.parts.append(array)

    def _spill(self) -> None:
        folder = Path(self.spill_dir) if self.spill_dir is not None else Path(tempfile.gettempdir())
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, path = tempfile.mkstemp(prefix="images-", suffix=".u8", dir=folder)
            os.unlink(path)  # lives while open or mapped: a killed process leaves nothing behind
        except OSError as exc:
            raise ClipclError(f"cannot write the image cache under {folder}: {exc.strerror or exc}") from exc
        self.file = os.fdopen(handle, "w+b")
        for part in self.parts:
            self.file.write(memoryview(part).cast("B"))
            self.budget.give(part.nbytes)
        self.parts = []

    def finish(self) -> ImageStore:
        if self.file is None:
            return ImageStore([torch.from_numpy(part) for part in self.parts], None, self.offsets, self.shapes, None)
        try:
            self.file.flush()
            total = self.offsets[-1]
            # copy-on-write: the tensors are writable as torch expects, and nothing ever writes the file back
            mapping = mmap.mmap(self.file.fileno(), total, access=mmap.ACCESS_COPY) if total else None
        except OSError as exc:
            raise ClipclError(f"cannot map the image cache: {exc.strerror or exc}") from exc
        finally:
            self.file.close()  # the mapping keeps the file alive
        buffer = (torch.frombuffer(mapping, dtype=torch.uint8) if mapping is not None
                  else torch.empty(0, dtype=torch.uint8))
        return ImageStore(None, buffer, self.offsets, self.shapes, mapping)


# --- what the transforms need ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CropPlan:
    """torchvision's ``RandomResizedCrop``: output ``size`` (h, w), area ``scale`` and aspect ``ratio`` ranges."""

    size: tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: Any  # torchvision InterpolationMode
    antialias: bool = True

    def draw(self, sizes: Sequence[tuple[int, int]], generator: torch.Generator) -> list[tuple[int, int, int, int]]:
        """A crop ``(top, left, height, width)`` of each ``(height, width)`` image in ``sizes``, by torchvision's
        ``RandomResizedCrop.get_params`` algorithm (up to ten tries of an area share uniform in ``scale`` and an
        aspect log-uniform in ``ratio``, the first that fits placed uniformly, else the central fallback crop), with
        the random numbers of the whole batch drawn from ``generator`` in three calls rather than per image."""
        count = len(sizes)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        shares = torch.empty((count, 10), dtype=torch.float64).uniform_(self.scale[0], self.scale[1],
                                                                         generator=generator).tolist()
        log_aspects = torch.empty((count, 10), dtype=torch.float64).uniform_(log_ratio[0], log_ratio[1],
                                                                              generator=generator).tolist()
        places = torch.rand((count, 2), dtype=torch.float64, generator=generator).tolist()
        crops: list[tuple[int, int, int, int]] = []
        for (height, width), share, log_aspect, place in zip(sizes, shares, log_aspects, places, strict=True):
            area = height * width
            for tried_share, tried_log_aspect in zip(share, log_aspect, strict=True):
                tried_aspect = math.exp(tried_log_aspect)  # in Python: torch would start its thread team for this
                w = round(math.sqrt(area * tried_share * tried_aspect))
                h = round(math.sqrt(area * tried_share / tried_aspect))
                if 0 < w <= width and 0 < h <= height:
                    top = min(height - h, int(place[0] * (height - h + 1)))
                    left = min(width - w, int(place[1] * (width - w + 1)))
                    crops.append((top, left, h, w))
                    break
            else:
                h, w = self._fallback(height, width)
                crops.append(((height - h) // 2, (width - w) // 2, h, w))
        return crops

    def _fallback(self, height: int, width: int) -> tuple[int, int]:
        """The central crop torchvision falls back to when ten draws miss."""
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            return round(width / min(self.ratio)), width
        if in_ratio > max(self.ratio):
            return height, round(height * max(self.ratio))
        return height, width

    def cache_size(self, height: int, width: int) -> tuple[int, int]:
        """The size (h, w) to keep a ``height`` x ``width`` image at: the smallest (aspect kept, never larger than
        the image) at which the smallest crop this transform can take still spans the output size, so resizing the
        crop never has fewer pixels to work from than the file had."""
        area = height * width
        smallest = self.scale[0] * area
        min_h = math.sqrt(smallest / max(self.ratio))
        min_w = math.sqrt(smallest * min(self.ratio))
        fallback_h, fallback_w = self._fallback(height, width)
        factor = max(self.size[0] / max(1.0, min(min_h, fallback_h)), self.size[1] / max(1.0, min(min_w, fallback_w)))
        if factor >= 1.0:
            return height, width
        return max(1, round(height * factor)), max(1, round(width * factor))


@dataclass(frozen=True)
class ColorStep:
    """open_clip's ``color_jitter`` (``ColorJitter`` with probability ``p``) or ``gray_scale`` (``jitter`` None)."""

    p: float
    jitter: Any = None  # a torchvision ColorJitter, for its ranges


@dataclass(frozen=True)
class TrainPlan:
    """A train transform as crop, colour steps and normalisation, to run on cached uint8 tensors."""

    crop: CropPlan
    colors: tuple[ColorStep, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class EvalPlan:
    """An eval transform split at ``ToTensor``: ``prefix`` (deterministic, on the PIL image) runs once per image,
    ``suffix`` (tensor ops such as ``Normalize``) on every read."""

    prefix: list[Callable]
    suffix: list[Callable]


def _steps(transform: Any) -> list[Any] | None:
    from torchvision.transforms import Compose

    return list(transform.transforms) if isinstance(transform, Compose) else None


def _is_random(step: Any) -> bool:
    from open_clip.transform import color_jitter, gray_scale

    if isinstance(step, color_jitter | gray_scale) or "random" in type(step).__name__.lower():
        return True
    # open_clip's ResizeKeepRatio draws a scale and an aspect when these are set
    return any(getattr(step, name, 0) for name in ("random_scale_prob", "random_aspect_prob"))


def plan_eval_transform(transform: Any) -> EvalPlan | None:
    """Split a deterministic ``Compose([...PIL steps, ToTensor, ...tensor steps])``; ``None`` for anything else."""
    from torchvision.transforms import ToTensor

    steps = _steps(transform)
    if steps is None or any(_is_random(step) for step in steps):
        return None
    cut = next((i for i, step in enumerate(steps) if isinstance(step, ToTensor)), None)
    if cut is None:
        return None
    return EvalPlan(steps[:cut], steps[cut + 1:])


def plan_train_transform(transform: Any) -> TrainPlan | None:
    """Read open_clip's train transform (``RandomResizedCrop``, RGB conversion, optional colour jitter and grey
    scale, ``ToTensor``, ``Normalize``) as a :class:`TrainPlan`; ``None`` for a transform of any other shape."""
    from open_clip.transform import MaybeConvertMode, color_jitter, gray_scale
    from torchvision.transforms import Normalize, RandomResizedCrop, ToTensor

    steps = _steps(transform)
    if not steps or not isinstance(steps[0], RandomResizedCrop) or len(steps) < 3:
        return None
    first, *middle, to_tensor, normalize = steps
    if not isinstance(to_tensor, ToTensor) or not isinstance(normalize, Normalize) or normalize.inplace:
        return None
    colors: list[ColorStep] = []
    for step in middle:
        if isinstance(step, MaybeConvertMode) and step.mode == "RGB":
            continue  # images are decoded as RGB
        if isinstance(step, color_jitter):
            colors.append(ColorStep(float(step.p), step.transf))
        elif isinstance(step, gray_scale):
            colors.append(ColorStep(float(step.p)))
        else:
            return None
    size = tuple(int(s) for s in first.size)
    crop = CropPlan((size[0], size[-1]), tuple(map(float, first.scale)), tuple(map(float, first.ratio)),
                    first.interpolation, bool(first.antialias) if first.antialias is not None else True)
    return TrainPlan(crop, tuple(colors), tuple(map(float, normalize.mean)), tuple(map(float, normalize.std)))


def _pil_resample(interpolation: Any) -> int:
    from torchvision.transforms.functional import pil_modes_mapping

    return pil_modes_mapping.get(interpolation, Image.Resampling.BICUBIC)


def _to_array(image: Image.Image) -> np.ndarray:
    array = np.array(image, dtype=np.uint8)  # a writable copy, as torch wants it
    return array[:, :, None] if array.ndim == 2 else array


# --- the datasets ---------------------------------------------------------------------------------------------------
class CachedEvalImages(torch.utils.data.Dataset):
    """A task's images through its eval transform, read from the cache: the same ``(tensor, label)`` items as
    :class:`~clipcl.data.ImageDataset` with that transform, bit for bit, without decoding."""

    def __init__(self, store: ImageStore, items: Sequence[ImageItem], plan: EvalPlan, label_offset: int = 0) -> None:
        self.store = store
        self.items = list(items)
        self.plan = plan
        self.label_offset = label_offset

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # ToTensor's own arithmetic: HWC uint8 -> CHW float32 / 255
        image = self.store[index].permute(2, 0, 1).contiguous().to(dtype=torch.get_default_dtype()).div(255)
        for step in self.plan.suffix:
            image = step(image)
        return image, self.items[index].label + self.label_offset


class CachedTrainImages(torch.utils.data.Dataset):
    """A task's training images, cached for its train transform.

    Items are ``(index, label)``: a loader shuffles and batches indices (cheaply, in the main process), and the
    batch's images are made by the callable :meth:`epoch_augmenter` returns, batch-wise and on the device."""

    def __init__(self, store: ImageStore, originals: list[tuple[int, int]], items: Sequence[ImageItem],
                 plan: TrainPlan, label_offset: int = 0, threads: int = 1) -> None:
        self.store = store
        self.originals = originals  # (height, width) of each decoded file: where the crops are drawn
        self.items = list(items)
        self.plan = plan
        self.label_offset = label_offset
        self.threads = max(1, threads)
        self._pool: ThreadPoolExecutor | None = None
        # ToTensor's / 255 and Normalize's (x - mean) / std as one multiply-add
        std = torch.tensor(plan.std, dtype=torch.float32).view(-1, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -torch.tensor(plan.mean, dtype=torch.float32).view(-1, 1, 1) / std

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, self.items[index].label + self.label_offset

    def epoch_augmenter(self, run_generator: torch.Generator, process_index: int = 0,
                        device: torch.device | str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The augmentation of one epoch: a callable from a batch of indices to normalised images on ``device``.

        Its generator is seeded by one draw from ``run_generator`` (the run's data-order generator, saved with each
        epoch checkpoint), mixed with ``process_index`` so that processes crop differently; a resumed run therefore
        draws what the uninterrupted one drew."""
        seed = int(torch.randint(0, 2**62, (1,), generator=run_generator).item())
        generator = torch.Generator().manual_seed((seed + 0x9E3779B97F4A7C15 * process_index) % 2**63)
        return lambda indices: self.augment(indices, generator, device)

    def draw(self, rows: Sequence[int], generator: torch.Generator
             ) -> list[tuple[tuple[int, int, int, int], list[Any]]]:
        """For each image index in ``rows``: its crop in the cached grid (drawn in the file's grid, then scaled), and
        its colour steps' parameters (``None``: not applied, ``"gray"``, or a jitter's order and factors)."""
        crops = self.plan.crop.draw([self.originals[i] for i in rows], generator)
        applied = (torch.rand((len(rows), len(self.plan.colors)), generator=generator).tolist()
                   if self.plan.colors else [[] for _ in rows])
        drawn: list[tuple[tuple[int, int, int, int], list[Any]]] = []
        for index, (top, left, h, w), chances in zip(rows, crops, applied, strict=True):
            height, width = self.originals[index]
            cached = self.store[index].shape
            if (cached[0], cached[1]) != (height, width):
                sy, sx = cached[0] / height, cached[1] / width
                top, left = min(cached[0] - 1, round(top * sy)), min(cached[1] - 1, round(left * sx))
                h = max(1, min(cached[0] - top, round(h * sy)))
                w = max(1, min(cached[1] - left, round(w * sx)))
            colors: list[Any] = []
            for step, chance in zip(self.plan.colors, chances, strict=True):
                if chance >= step.p:
                    colors.append(None)
                elif step.jitter is None:
                    colors.append("gray")
                else:
                    colors.append(_jitter_params(step.jitter, generator))
            drawn.append(((top, left, h, w), colors))
        return drawn

    def augment(self, indices: torch.Tensor | Sequence[int], generator: torch.Generator,
                device: torch.device | str | None = None) -> torch.Tensor:
        """Crop, resize, colour and normalise the batch ``indices`` (float32 ``[B, C, H, W]`` on ``device``), with
        every random choice drawn from ``generator``, image after image."""
        rows = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        device = torch.device(device) if device is not None else torch.device("cpu")
        params = self.draw(rows, generator)
        out_h, out_w = self.plan.crop.size
        channels = self.store[rows[0]].shape[2] if rows else 3
        on_cpu = device.type == "cpu"
        # on the CPU each image is finished (converted and normalised too) by the thread that resized it; on a GPU
        # the uint8 batch is converted and normalised at once
        batch = torch.empty((len(rows), channels, out_h, out_w), dtype=torch.float32 if on_cpu else torch.uint8,
                            device=device)
        scale, shift = self._scale.to(device), self._shift.to(device)
        crop = self.plan.crop

        def make(k: int) -> None:
            (top, left, h, w), colors = params[k]
            image = self.store[rows[k]].permute(2, 0, 1)[:, top:top + h, left:left + w]
            if not on_cpu:
                image = image.to(device, non_blocking=True)
            image = TF.resize(image, [out_h, out_w], interpolation=crop.interpolation, antialias=crop.antialias)
            for color in colors:
                if color == "gray":
                    image = TF.rgb_to_grayscale(image, num_output_channels=image.shape[0])
                elif color is not None:
                    image = _apply_jitter(image, color)
            if on_cpu:
                batch[k].copy_(image).mul_(scale).add_(shift)
            else:
                batch[k] = image

        if not on_cpu:
            for k in range(len(rows)):
                make(k)
            return batch.to(torch.float32).mul_(scale).add_(shift)
        list(self._workers().map(make, range(len(rows))))
        return batch

    def _workers(self) -> ThreadPoolExecutor:
        """This set's CPU threads, each running torch single-threaded: one image is too little work to share, and
        torch's thread team would cost more in hand-offs than it saves. Started once, all at once, after which the
        process-wide thread setting is put back (torch keeps the count per thread, so the caller's is unchanged)."""
        if self._pool is None:
            previous = torch.get_num_threads()
            ready = threading.Barrier(self.threads + 1)
            pool = ThreadPoolExecutor(self.threads, thread_name_prefix="clipcl-augment", initializer=_one_torch_thread)
            try:
                for _ in range(self.threads):
                    pool.submit(ready.wait, 60)
                ready.wait(60)
            finally:
                torch.set_num_threads(previous)
            self._pool = pool
        return self._pool

    def close(self) -> None:
        """Stop this set's threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _one_torch_thread() -> None:
    """Make torch run this thread's ops on this thread alone. torch sets up a thread's count on its first parallel
    op, from the process-wide setting; asking for the count first does that setup now, so it cannot later undo this."""
    torch.get_num_threads()
    torch.set_num_threads(1)


def _jitter_params(jitter: Any, generator: torch.Generator) -> tuple[list[int], list[float | None]]:
    """torchvision's ``ColorJitter.get_params`` drawing from ``generator``: the order of the four adjustments and
    each factor (``None`` for an adjustment that is off)."""
    order = torch.randperm(4, generator=generator).tolist()
    factors = [None if bounds is None else float(torch.empty(1).uniform_(bounds[0], bounds[1], generator=generator))
               for bounds in (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)]
    return order, factors


def _apply_jitter(image: torch.Tensor, params: tuple[list[int], list[float | None]]) -> torch.Tensor:
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    order, factors = params
    for which in order:
        if factors[which] is not None:
            image = adjust[which](image, factors[which])
    return image


# --- building ---------------------------------------------------------------------------------------------------------
@dataclass
class TaskImageCache:
    """What :func:`build_image_cache` made: the cached training set (``None`` when the train transform cannot be
    cached), the cached eval-transform set (``None`` likewise), and what the build cost."""

    train: CachedTrainImages | None
    eval: CachedEvalImages | None
    seconds: float = 0.0
    images: int = 0
    stores: list[ImageStore] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(store.nbytes for store in self.stores)

    @property
    def mapped(self) -> bool:
        return any(store.mapped for store in self.stores)

    def close(self) -> None:
        if self.train is not None:
            self.train.close()
        for store in self.stores:
            store.close()


def build_image_cache(root: Path | str, items: Sequence[ImageItem], train_transform: Any = None,
                      eval_transform: Any = None, label_offset: int = 0,
                      max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, threads: int = 1,
                      spill_dir: Path | str | None = None, memory_limit: int | None = None,
                      progress: Progress | None = None) -> TaskImageCache:
    """Decode each of ``items`` once (``threads`` at a time, with the scan's size bound) and keep what
    ``train_transform`` and ``eval_transform`` need (either may be ``None``, or not cacheable: its set is then
    ``None``). Stores spill to memory-mapped files under ``spill_dir`` (the system's temporary folder when ``None``)
    once the cached bytes pass ``memory_limit`` (:func:`memory_limit_from_env` when ``None``). Raises
    :class:`~clipcl.errors.DataError` for an image that can no longer be read."""
    started = time.perf_counter()
    root = Path(root)
    items = list(items)
    train_plan = plan_train_transform(train_transform) if train_transform is not None else None
    eval_plan = plan_eval_transform(eval_transform) if eval_transform is not None else None
    if (train_plan is None and eval_plan is None) or not items:
        return TaskImageCache(None, None)
    budget = _Budget(memory_limit_from_env() if memory_limit is None else memory_limit)
    spill = Path(spill_dir) if spill_dir is not None else None
    train_writer = _StoreWriter(budget, spill) if train_plan is not None else None
    eval_writer = _StoreWriter(budget, spill) if eval_plan is not None else None
    originals: list[tuple[int, int]] = []

    def decode(item: ImageItem) -> tuple[tuple[int, int], np.ndarray | None, np.ndarray | None]:
        path = root / item.relpath
        try:
            image = load_image_checked(path, max_image_bytes)
        except Exception as exc:  # Pillow raises many types; each means the file changed since the scan
            raise DataError(f"cannot read {path} (it was readable when the task was scanned): {exc}") from exc
        size = (image.height, image.width)
        train_array = eval_array = None
        if train_plan is not None:
            height, width = train_plan.crop.cache_size(*size)
            kept = image if (height, width) == size else image.resize(
                (width, height), resample=_pil_resample(train_plan.crop.interpolation))
            train_array = _to_array(kept)
        if eval_plan is not None:
            shown = image
            for step in eval_plan.prefix:
                shown = step(shown)
            eval_array = _to_array(shown)
        return size, train_array, eval_array

    if progress is not None:
        progress.stage_start("decoding images", len(items))
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for start in range(0, len(items), _DECODE_CHUNK):
                chunk = items[start:start + _DECODE_CHUNK]
                for size, train_array, eval_array in pool.map(decode, chunk):
                    originals.append(size)
                    if train_writer is not None and train_array is not None:
                        train_writer.add(train_array)
                    if eval_writer is not None and eval_array is not None:
                        eval_writer.add(eval_array)
                if progress is not None:
                    progress.stage_advance(len(chunk))
        stores = [writer.finish() for writer in (train_writer, eval_writer) if writer is not None]
    finally:
        for writer in (train_writer, eval_writer):
            if writer is not None and writer.file is not None and not writer.file.closed:
                writer.file.close()
        if spill is not None and any(w is not None and w.file is not None for w in (train_writer, eval_writer)):
            with contextlib.suppress(OSError):  # its files were unlinked as they were made: it holds nothing
                spill.rmdir()
        if progress is not None:
            progress.stage_end()
    train_store = stores[0] if train_writer is not None else None
    eval_store = stores[-1] if eval_writer is not None else None
    train_set = (CachedTrainImages(train_store, originals, items, train_plan, label_offset, threads)
                 if train_plan is not None and train_store is not None else None)
    eval_set = (CachedEvalImages(eval_store, items, eval_plan, label_offset)
                if eval_plan is not None and eval_store is not None else None)
    return TaskImageCache(train_set, eval_set, time.perf_counter() - started, len(items), stores)
