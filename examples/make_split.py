"""Write a class-incremental split of a torchvision dataset in the layout `clipcl add-task` and `clipcl bench` read.

    python examples/make_split.py --dataset CIFAR100 --root ~/data --out ./split-cifar100 --tasks 10 --download

writes ``split-cifar100/task-1 ... task-10``, each ``train/<class>/*.png`` and ``test/<class>/*.png`` with an equal
share of the classes, plus ``split.json`` (the class order and each task's classes). The class order is the
permutation ``numpy.random.seed(SEED); numpy.random.permutation(n_classes)`` with SEED 1993 by default, the order
that the CIFAR-100 "10 tasks of 10 classes" protocol of PyCIL and the papers built on it use.

Any torchvision classification dataset with a ``classes`` list and a ``train=`` flag works (CIFAR10, CIFAR100, ...);
the images are written as PNG at their own resolution: open_clip's transform resizes them for the model.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def class_order(n_classes: int, seed: int) -> list[int]:
    """PyCIL's class order: ``numpy.random.seed(seed)`` then a permutation of the class indices."""
    np.random.seed(seed)
    return [int(c) for c in np.random.permutation(n_classes)]


def folder_name(class_name: str) -> str:
    """A class name as a folder name (clipcl shows ``_`` as a space again)."""
    return class_name.strip().replace("/", "_").replace(" ", "_")


def write_split(train: Sequence[tuple[Any, int]], test: Sequence[tuple[Any, int]], class_names: Sequence[str],
                out: Path, n_tasks: int, seed: int = 1993) -> list[list[str]]:
    """Write ``out/task-N/{train,test}/<class>/*.png`` from (PIL image, label) pairs; returns each task's classes."""
    n_classes = len(class_names)
    if n_tasks < 1 or n_classes % n_tasks:
        raise SystemExit(f"{n_classes} classes do not split into {n_tasks} equal tasks")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty")
    order = class_order(n_classes, seed)
    per_task = n_classes // n_tasks
    task_of = {label: position // per_task for position, label in enumerate(order)}
    counters: dict[tuple[str, int], int] = {}
    for split, dataset in (("train", train), ("test", test)):
        for image, label in dataset:
            label = int(label)
            folder = out / f"task-{task_of[label] + 1}" / split / folder_name(class_names[label])
            index = counters.get((split, label), 0)
            if index == 0:
                folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:05d}.png")
            counters[(split, label)] = index + 1
    tasks = [[class_names[label] for label in order[t * per_task:(t + 1) * per_task]] for t in range(n_tasks)]
    (out / "split.json").write_text(json.dumps({"seed": seed, "class_order": [class_names[c] for c in order],
                                                "tasks": tasks}, indent=2))
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="CIFAR100", help="a torchvision.datasets class (CIFAR100, CIFAR10, ...)")
    parser.add_argument("--root", type=Path, required=True, help="where torchvision keeps (or downloads) the data")
    parser.add_argument("--out", type=Path, required=True, help="the split folder to write")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1993)
    parser.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    args = parser.parse_args()

    import torchvision

    dataset_class = getattr(torchvision.datasets, args.dataset)
    root = args.root.expanduser()
    train = dataset_class(root, train=True, download=args.download)
    test = dataset_class(root, train=False, download=args.download)
    tasks = write_split(train, test, train.classes, args.out.expanduser(), args.tasks, args.seed)
    print(f"wrote {len(tasks)} tasks of {len(tasks[0])} classes to {args.out}")


if __name__ == "__main__":
    main()
