"""Zero-shot accuracy of the base model on a split's test images, for comparison with what clipcl learned.

    python examples/zero_shot_reference.py SPLIT_DIR --tasks 2 --model CONFIG.json --pretrained WEIGHTS

After task t it predicts among the classes of tasks 1..t ("a photo of a {}."), as the class-incremental protocol
and `clipcl add-task` do, and prints the accuracy of each task so far and of all of them together.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clipcl.backbone import load_backbone, resolve_model_spec
from clipcl.data import ImageDataset, scan_task_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("split_dir", type=Path)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--model", required=True)
    parser.add_argument("--pretrained", required=True)
    args = parser.parse_args()

    spec = resolve_model_spec(args.model, args.pretrained)
    config_dir = Path(args.model).parent if spec.config is not None else None
    backbone = load_backbone(spec, config_dir)
    classes: list[str] = []
    sets, seen_after = [], []
    for t in range(1, args.tasks + 1):
        data = scan_task_folder(args.split_dir / f"task-{t}")
        sets.append(ImageDataset(data.root, data.test, backbone.eval_transform, label_offset=len(classes)))
        classes += data.classes
        seen_after.append(len(classes))
    features, labels = [], []
    with torch.no_grad():
        for dataset in sets:
            loader = torch.utils.data.DataLoader(dataset, batch_size=128, num_workers=2)
            batches = [(backbone.encode_images(x), y) for x, y in loader]
            features.append(torch.cat([f for f, _ in batches]))
            labels.append(torch.cat([y for _, y in batches]))
        text = backbone.encode_texts([f"a photo of a {c}." for c in classes])
    for t in range(1, args.tasks + 1):
        seen = seen_after[t - 1]
        hits = [(f @ text[:seen].T).argmax(1).eq(y) for f, y in zip(features[:t], labels[:t], strict=True)]
        per_task = "  ".join(f"task {j}: {100 * h.float().mean():.2f}%" for j, h in enumerate(hits, start=1))
        union = 100 * torch.cat(hits).float().mean()
        print(f"after task {t} ({seen} classes): {per_task}  all: {union:.2f}%")

if __name__ == "__main__":
    main()
