"""Compare dma's inference options on a workspace's held-out images, without re-encoding them for every option.

Run it on a workspace that ``clipcl bench --validation FRACTION --workspaces DIR`` kept, so that the choice is made
on validation images (a share of the training images) and never on the test images:

    clipcl bench ../shared/bench/split-imagenette --methods dma --validation 0.2 --workspaces val \\
        --model ../shared/bench/MiniCLIP-64.json --pretrained ../shared/bench/miniclip-B-cifar10.safetensors
    python examples/choose_inference.py val/dma --out choices.json

Every held-out image is encoded once by the frozen encoder and once by each task's LoRA; each option is then
scored through dma's own code (``DMA.candidates`` and ``DMA.combine``) for the state after every task (a dma task
never changes once learned, so restoring tasks 1..i gives the model as it stood after task i). Printed per option:
Avg and Last (accuracy over the tasks so far, after each task), task-id accuracy after the last task, and
image-encoder passes per image. The last row gives every image its task (an upper bound on what routing can
reach with these adapters).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from clipcl import Workspace, load_backbone
from clipcl.evaluation import heldout_dataset
from clipcl.methods import build_config, get_method_class
from clipcl.methods.components import shrinkage_value
from clipcl.metrics import continual_metrics

VARIANTS: list[dict] = [
    {"router": "mahalanobis", "route": 0},
    *({"router": "mahalanobis", "route": 0, "router_shrinkage": a} for a in ("0.001", "0.01", "0.1")),
    {"router": "mahalanobis", "route": 1},
    {"router": "adapted", "route": 0},
    {"router": "combined", "route": 0},
    *({"router": "combined", "route": k} for k in (1, 2, 3)),
    *({"router": "combined", "route": 0, "router_shrinkage": a} for a in ("0.001", "0.01", "0.1")),
    *({"router": "combined", "route": k, "router_shrinkage": "0.001"} for k in (1, 2, 3)),
    {"router": "combined", "route": 0, "text_weight": 0.0},
    {"router": "combined", "route": 0, "adapted_weight": 0.0},
    {"router": "combined", "route": 0, "fit_weight": 0.0},
    {"router": "combined", "route": 0, "fit_weight": 3.0},
    {"router": "combined", "route": 0, "text_weight": 3.0},
    {"router": "combined", "route": 0, "text_weight": 0.0, "adapted_weight": 0.0, "fit_weight": 0.0},
    {"router": "combined", "task_given": True},
]


@torch.no_grad()
def encode_heldout(workspace: Workspace, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Per task: its held-out images' labels, frozen features, and features under every task's LoRA."""
    method = workspace.build_method()
    encoded = []
    for stored in workspace.tasks:
        dataset = heldout_dataset(method, stored.info, workspace.task_record(stored))
        if dataset is None:
            raise SystemExit(f"task {stored.info.index} has no held-out images left")
        frozen, branches, labels = [], [], []
        for images, batch_labels in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            frozen.append(method.frozen_features(images))
            per_task = []
            for task in method.tasks:
                method.lora.activate(method.adapter_name(task))
                per_task.append(method.backbone.encode_images(images).float())
            branches.append(torch.stack(per_task, dim=1))
            labels.append(batch_labels)
        encoded.append({"frozen": torch.cat(frozen), "branches": torch.cat(branches), "labels": torch.cat(labels)})
    return encoded


@torch.no_grad()
def score(method, data: dict[str, torch.Tensor], route: int, given: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Predicted classes, predicted tasks and encoder passes per image of ``method`` (tasks 1..i restored); with
    ``given``, every image's task is given (an upper bound: only that task's adapter and classes count)."""
    class_scores, selected = method.candidates(data["frozen"], route or "all")
    if given is not None:
        selected = torch.zeros_like(selected)
        selected[:, given] = True
    branches = {i: data["branches"][selected[:, i], i] for i in range(len(method.tasks)) if selected[:, i].any()}
    prediction = method.combine(class_scores, selected, branches)
    passes = 1 + float(selected.sum(dim=1).float().mean())
    return prediction.probs.argmax(dim=1), prediction.task_scores.argmax(dim=1), passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workspace", type=Path, help="a dma workspace kept by `clipcl bench --validation`")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, help="write the table as JSON")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    workspace = Workspace.open(args.workspace)
    if workspace.method_name != "dma":
        raise SystemExit(f"{args.workspace} is a {workspace.method_name} workspace, not dma")
    encoded = encode_heldout(workspace, args.batch_size)
    sizes = [len(d["labels"]) for d in encoded]
    method_class = get_method_class("dma")
    stored_config = build_config(method_class, stored=workspace.method_config)
    method = method_class(load_backbone(workspace.model_spec, workspace.path / "model"), stored_config)
    rows: list[dict] = [{"options": variant, "matrix": [], "task_id": None, "passes": None} for variant in VARIANTS]
    for stored in workspace.tasks:  # the state after each task in turn
        method.restore(stored.info, workspace.task_tensors(stored))
        for row in rows:
            options = {k: v for k, v in row["options"].items() if k != "task_given"}
            method.config = dataclasses.replace(stored_config, **options)
            method.router.gaussian.set_shrinkage(shrinkage_value(method.config.router_shrinkage))
            accuracy, hits, passes, images = [], 0, 0.0, 0
            for task, data in zip(method.tasks, encoded, strict=False):
                given = task.index - 1 if row["options"].get("task_given") else None
                classes, tasks, per_image = score(method, data, method.config.route, given)
                accuracy.append(float((classes == data["labels"]).float().mean()))
                hits += int((tasks == task.index - 1).sum())
                passes += per_image * len(data["labels"])
                images += len(data["labels"])
            row["matrix"].append(accuracy)
            row["task_id"], row["passes"] = hits / images, passes / images
    print(f"{'options':<78} {'Avg':>6} {'Last':>6} {'task-id':>7} {'passes':>6}")
    for row in rows:
        metrics = continual_metrics(row["matrix"], sizes)
        row.update(avg=metrics.avg, last=metrics.last, accuracy_after_task=metrics.accuracy_after_task)
        options = ", ".join(f"{k}={v}" for k, v in row["options"].items())
        print(f"{options:<78} {100 * metrics.avg:6.2f} {100 * metrics.last:6.2f} {100 * row['task_id']:7.2f} "
              f"{row['passes']:6.2f}")
    if args.out is not None:
        args.out.write_text(json.dumps({"workspace": str(args.workspace), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
