"""Turning a folder of class sub-folders into a task.

A task folder is either ``<root>/<class>/...images`` (a seeded, stratified share of each class is held out for
evaluation) or ``<root>/train/<class>/...`` with ``<root>/test/<class>/...`` (or ``val/``), whose split is used as
given. Sub-folder names are the class names, with ``_`` shown as a space.

Every image is decoded once while scanning, so a corrupt file is reported (and skipped) before any training starts,
and the bytes read feed the data fingerprint recorded with the task. Only regular files are images: a FIFO, a socket,
a device or a link to one, and a link loop, are skipped with a warning and never opened; every read is bounded by a
size limit (:mod:`clipcl.reading`).
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .errors import DataError
from .reading import DEFAULT_MAX_IMAGE_BYTES, InputError, format_size, read_bounded, regular_file_problem

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TEST_SPLIT_NAMES = ("test", "val")
MAX_CLASS_NAME_LENGTH = 200


@dataclass(frozen=True)
class ImageItem:
    """One image of a task: its path relative to the task root and its class index within the task."""

    relpath: str
    label: int


@dataclass
class TaskData:
    """A scanned task folder: classes, the train/held-out split, and what was skipped."""

    root: Path
    classes: list[str]
    train: list[ImageItem]
    test: list[ImageItem]
    split: str  # "folders" (train/ and test/ given) or "holdout"
    holdout: float | None
    seed: int
    fingerprint: str
    skipped: list[str] = field(default_factory=list)

    def counts(self, items: Sequence[ImageItem]) -> dict[str, int]:
        result = dict.fromkeys(self.classes, 0)
        for item in items:
            result[self.classes[item.label]] += 1
        return result


def class_name_from_folder(folder_name: str) -> str:
    return folder_name.replace("_", " ").strip()


def load_image(source: Path | bytes) -> Image.Image:
    """Decode an image as 3-channel RGB: first frame, EXIF orientation applied, transparency on white."""
    with Image.open(BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.seek(0)
        image = ImageOps.exif_transpose(image)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA"):
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = image.point(lambda value: value / 256).convert("L")
        return image.convert("RGB")


def list_images(directory: Path, on_skip: Callable[[Path, str], None] | None = None) -> list[Path]:
    """All image files below ``directory``: names with an image suffix that resolve to a regular file. Symbolic
    links to folders are not followed (no loops); an entry named like an image that is not a regular file (a FIFO, a
    socket, a device, a broken link, a link loop) is left out and reported to ``on_skip`` with the reason, without
    being opened."""
    found: list[Path] = []
    for current, dirnames, filenames in os.walk(directory, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(current) / name
            problem = regular_file_problem(path)
            if problem is None:
                found.append(path)
            elif on_skip is not None:
                on_skip(path, problem)
    return found


def class_folders(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image_checked(source: Path | bytes, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Image.Image:
    """:func:`load_image` for files from outside: a path is read only if it is a regular file of at most
    ``max_bytes`` (:func:`clipcl.reading.read_bounded`), and an image over Pillow's decompression-bomb limit is
    refused."""
    data = source if isinstance(source, bytes) else read_bounded(source, max_bytes)
    if len(data) > max_bytes:
        raise ValueError(f"{format_size(len(data))}, over the limit of {format_size(max_bytes)}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return load_image(data)


def why_unreadable(exc: Exception) -> str:
    """One line saying why an image could not be read or decoded."""
    if isinstance(exc, InputError):  # says it in words already: not a regular file, too large, no permission
        return str(exc)
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _check_image(path: Path, max_bytes: int) -> tuple[str | None, str]:
    """Return (sha256 of the bytes, "") for a decodable image, or (None, reason) for one that is not."""
    try:
        data = read_bounded(path, max_bytes)
        load_image_checked(data, max_bytes)
    except Exception as exc:  # Pillow raises many types for corrupt data; every one means "skip this file"
        return None, why_unreadable(exc)
    return hashlib.sha256(data).hexdigest(), ""


def _validate_class_name(name: str, folder: Path) -> None:
    if not name:
        raise DataError(f"class folder {folder} gives an empty class name")
    if len(name) > MAX_CLASS_NAME_LENGTH:
        raise DataError(f"class folder name is longer than {MAX_CLASS_NAME_LENGTH} characters: {folder}")
    if any(ord(ch) < 32 for ch in name):
        raise DataError(f"class folder name has control characters: {folder!r}")


@dataclass(frozen=True)
class TaskLayout:
    """Where a task folder keeps its classes: ``class_root/<class>/`` and, when split, ``test_dir/<class>/``."""

    class_root: Path
    test_dir: Path | None
    class_dirs: list[Path]
    classes: list[str]


def task_layout(root: Path) -> TaskLayout:
    """Find a task folder's class folders and split without reading any image; refuse a layout that is not one."""
    train_dir = root / "train"
    test_dir = next((root / n for n in TEST_SPLIT_NAMES if (root / n).is_dir()), None)
    if test_dir is not None and not train_dir.is_dir():
        raise DataError(f"{root} has {test_dir.name}/ but no train/: give both splits, or class folders only")
    class_root = train_dir if train_dir.is_dir() else root
    class_dirs = class_folders(class_root)
    if not class_dirs:
        raise DataError(f"no class sub-folders in {class_root} (expected <folder>/<class name>/<images>)")
    classes: list[str] = []
    for folder in class_dirs:
        name = class_name_from_folder(folder.name)
        _validate_class_name(name, folder)
        if name.casefold() in {c.casefold() for c in classes}:
            raise DataError(f"two class folders give the class name {name!r} in {class_root}")
        classes.append(name)
    return TaskLayout(class_root, test_dir if train_dir.is_dir() else None, class_dirs, classes)


def scan_task_folder(
    root: Path | str,
    holdout: float = 0.2,
    seed: int = 0,
    workers: int = 4,
    on_skip: Callable[[str, str], None] | None = None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> TaskData:
    """Read a task folder, validate it, and split it into train and held-out images.

    Files that cannot be images (not regular files, over ``max_image_bytes``, unreadable or not decodable) are
    skipped, recorded and reported to ``on_skip`` with the reason. Raises :class:`DataError` for a folder that cannot
    be a task: missing, no class sub-folders, a class with no readable image, or a ``test/`` split naming a class
    that ``train/`` lacks.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    if not 0.0 <= holdout < 1.0:
        raise DataError(f"--holdout must be in [0, 1), got {holdout}")
    root = root.resolve()
    layout = task_layout(root)
    class_dirs, classes, test_dir = layout.class_dirs, layout.classes, layout.test_dir
    folder_split = test_dir is not None

    skipped: list[str] = []

    def skip(path: Path, reason: str) -> None:
        relpath = path.relative_to(root).as_posix()
        skipped.append(relpath)
        if on_skip is not None:
            on_skip(relpath, reason)

    sources: list[tuple[str, int, Path]] = []  # (split, label, path)
    for label, folder in enumerate(class_dirs):
        sources.extend(("train", label, p) for p in list_images(folder, on_skip=skip))
    if test_dir is not None:
        by_name = {class_name_from_folder(f.name).casefold(): i for i, f in enumerate(class_dirs)}
        for folder in class_folders(test_dir):
            label = by_name.get(class_name_from_folder(folder.name).casefold())
            if label is None:
                raise DataError(f"{test_dir.name}/ has a class that train/ lacks: {folder.name}")
            sources.extend(("test", label, p) for p in list_images(folder, on_skip=skip))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checks = list(pool.map(lambda source: _check_image(source[2], max_image_bytes), sources))

    readable: list[tuple[str, int, str]] = []
    fingerprint = hashlib.sha256()
    for (split, label, path), (digest, reason) in zip(sources, checks, strict=True):
        relpath = path.relative_to(root).as_posix()
        if digest is None:
            skip(path, reason)
            continue
        readable.append((split, label, relpath))
        fingerprint.update(f"{split}\t{relpath}\t{digest}\n".encode())

    train_counts = [0] * len(classes)
    for split, label, _ in readable:
        if split == "train":
            train_counts[label] += 1
    for name, count in zip(classes, train_counts, strict=True):
        if count == 0:
            raise DataError(f"class {name!r} has no readable image in {layout.class_root}")

    if folder_split:
        train = [ImageItem(r, label) for s, label, r in readable if s == "train"]
        test = [ImageItem(r, label) for s, label, r in readable if s == "test"]
    else:
        train, test = stratified_split([ImageItem(r, label) for _, label, r in readable], holdout, seed)

    return TaskData(
        root=root,
        classes=classes,
        train=train,
        test=test,
        split="folders" if folder_split else "holdout",
        holdout=None if folder_split else holdout,
        seed=seed,
        fingerprint=fingerprint.hexdigest(),
        skipped=skipped,
    )


def stratified_split(
    items: Sequence[ImageItem], holdout: float, seed: int
) -> tuple[list[ImageItem], list[ImageItem]]:
    """Hold out ``round(holdout * n)`` images of each class (at least one where a class has two or more)."""
    rng = random.Random(seed)
    by_label: dict[int, list[ImageItem]] = {}
    for item in items:
        by_label.setdefault(item.label, []).append(item)
    train: list[ImageItem] = []
    test: list[ImageItem] = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda item: item.relpath)
        rng.shuffle(group)
        n_test = round(holdout * len(group))
        if holdout > 0 and len(group) >= 2:
            n_test = min(max(n_test, 1), len(group) - 1)
        test.extend(group[:n_test])
        train.extend(group[n_test:])
    return train, test


class ImageDataset(torch.utils.data.Dataset):
    """Images of one task, decoded on access (with the scan's bounds) and labelled with global class indices."""

    def __init__(self, root: Path, items: Sequence[ImageItem], transform: Callable, label_offset: int = 0,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> None:
        self.root = Path(root)
        self.items = list(items)
        self.transform = transform
        self.label_offset = label_offset
        self.max_image_bytes = max_image_bytes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        path = self.root / item.relpath
        try:
            image = load_image_checked(path, self.max_image_bytes)
        except Exception as exc:
            raise DataError(f"cannot read {path} (it was readable when the task was scanned): {exc}") from exc
        return self.transform(image), item.label + self.label_offset

