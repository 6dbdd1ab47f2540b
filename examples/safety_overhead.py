"""What the workspace's safety costs: the base-weights fingerprint (every load) and the epoch checkpoint (every epoch).

    python examples/safety_overhead.py --model ../shared/bench/MiniCLIP-64.json \
        --pretrained ../shared/bench/miniclip-B-cifar10.safetensors
    python examples/safety_overhead.py --model ViT-B-16 --random-weights   # the architecture, no download

Prints seconds per fingerprint and per checkpoint (dma's trainable parameters with their AdamW moments) and the
checkpoint's size. Nothing is written outside a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch

from clipcl.backbone import load_backbone, resolve_model_spec, weights_fingerprint
from clipcl.checkpoint import Checkpoint, EpochState, capture_rng
from clipcl.methods import TaskInfo, build_config, get_method_class


def best_of(repeats: int, action: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--pretrained")
    parser.add_argument("--random-weights", action="store_true", help="the architecture with random weights")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    spec = resolve_model_spec(args.model, args.pretrained, allow_random_weights=args.random_weights)
    config_dir = Path(args.model).parent if args.model.endswith(".json") else None
    if config_dir is not None:
        open_clip.add_model_config(args.model)
    backbone = load_backbone(spec, config_dir)
    parameters = sum(p.numel() for p in backbone.model.parameters())
    fingerprint_s = best_of(args.repeats, lambda: weights_fingerprint(backbone.model))

    method_class = get_method_class("dma")
    method = method_class(backbone, build_config(method_class))
    method.begin(TaskInfo(1, ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j"), 0))
    trainable = method.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable)
    for param in trainable:
        param.grad = torch.zeros_like(param)
    optimizer.step()  # fills the moments, as after a real epoch
    names = {id(p): n for n, p in method.named_parameters()}
    state = EpochState(1, optimizer.state_dict(), {"last_epoch": 1}, torch.Generator().get_state(), capture_rng())
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Checkpoint({"task": 1}, 0, state, {names[id(p)]: p for p in trainable})
        save_s = best_of(args.repeats, lambda: checkpoint.save(Path(folder)))
        size = sum(f.stat().st_size for f in (Path(folder) / ".resume").iterdir())
        load_s = best_of(args.repeats, lambda: Checkpoint.load(Path(folder)))
    print(json.dumps({"model": spec.describe(), "parameters": parameters, "fingerprint_s": round(fingerprint_s, 4),
                      "checkpoint_bytes": size, "checkpoint_save_s": round(save_s, 4),
                      "checkpoint_load_s": round(load_s, 4)}, indent=2))


if __name__ == "__main__":
    main()
