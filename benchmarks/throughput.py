"""Training throughput of clipcl beside a plain research loop and beside the machine's ceiling, in one run.

On one task folder and one model it measures, in images/s:

* ``research``: a loop as research code writes it: torchvision ``ImageFolder`` decoding every image in every epoch
  through open_clip's train transform, ``DataLoader`` workers, peft LoRA on the image tower's linear layers (its MLPs:
  open_clip's attention is ``nn.MultiheadAttention``, whose projections peft cannot adapt in place), cross-entropy to
  frozen text features of "a photo of a {class}.";
* ``clipcl``: ``clipcl.add_task`` (method ``dma`` by default) on the same folder, epochs and batch size, all images
  trained (``holdout=0``), no evaluation; the rate is the one its record reports (``TaskReport.record.timings
  .images_per_s``: the training steps only), with the run's other phases (decoding, statistics) timed beside it;
* ``ceiling``: clipcl's own training step (the same method, forward, backward and optimiser step, through Accelerate)
  on one batch already in memory, and ``research_ceiling`` the research loop's step likewise;
* the data path alone (images/s delivered to the model, no model): ``ImageFolder`` + ``DataLoader`` decoding every
  epoch, against clipcl's decode-once cache (``clipcl.imagecache``: built once, then cropped, resized and normalised
  batch-wise each epoch).

Two settings: a given folder and model (``--folder --model --pretrained``), or ``--generate N`` full-size JPEGs
(~300x200, random content, in a temporary folder) at 224 px with ``ViT-B-16`` and random weights. See
``benchmarks/README.md``. Everything that is timed runs in this one process, one phase after another.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GENERATED_MODEL = "ViT-B-16"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Settings:
    """One benchmark run. ``images`` (0: all) keeps the first images of each class, in turn; ``ceiling_steps`` are
    timed after one untimed warm-up step; ``data_epochs`` are the epochs of the data-path measurements."""

    folder: str
    model: str
    pretrained: str | None = None
    epochs: int = 2
    batch_size: int = 32
    images: int = 0
    threads: int = 2
    device: str = "cpu"
    precision: str = "fp32"
    method: str = "dma"
    ceiling_steps: int = 8
    data_epochs: int = 3
    lora_rank: int = 8
    lr: float = 1e-3
    seed: int = 0
    skip: list[str] = field(default_factory=list)  # of: research, clipcl, ceiling, data


# --- inputs ---------------------------------------------------------------------------------------------------------
def generate_folder(root: Path, count: int, classes: int = 4, size: tuple[int, int] = (300, 200), seed: int = 0,
                    quality: int = 90) -> Path:
    """``count`` JPEGs of ``size`` (width, height; each side varied by up to 10 %) with random content (smooth
    colour fields with noise and shapes, which compress like photos, not like white noise), spread over ``classes``
    class folders."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    for index in range(count):
        folder = root / f"class_{index % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        width = int(size[0] * rng.uniform(0.9, 1.1))
        height = int(size[1] * rng.uniform(0.9, 1.1))
        small = Image.new("RGB", (8, 6))
        small.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(48)])
        image = small.resize((width, height), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randrange(width), rng.randrange(height)
            radius = rng.randrange(8, max(9, height // 3))
            draw.ellipse((x - radius, y - radius, x + radius, y + radius),
                         fill=tuple(rng.randrange(256) for _ in range(3)))
        noise = Image.effect_noise((width, height), 24).convert("RGB")
        image = Image.blend(image.filter(ImageFilter.GaussianBlur(1)), noise, 0.15)
        image.save(folder / f"{index:06d}.jpg", quality=quality)
    return root


def limit_folder(folder: Path, images: int, root: Path) -> Path:
    """A folder of links to the first ``images`` images of ``folder``'s class folders, taken from each class in
    turn (the original when ``images`` is 0 or covers them all): a shorter run on the same data, nothing copied."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {c: sorted(p for p in c.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    if images <= 0 or images >= sum(len(f) for f in files.values()):
        return folder
    chosen: dict[Path, list[Path]] = {c: [] for c in classes}
    taken, position = 0, 0
    while taken < images:
        for c in classes:
            if position < len(files[c]) and taken < images:
                chosen[c].append(files[c][position])
                taken += 1
        position += 1
    for c, paths in chosen.items():
        if paths:
            (root / c.name).mkdir(parents=True, exist_ok=True)
            for path in paths:
                (root / c.name / path.name).symlink_to(path.resolve())
    return root


def _open_clip_name(model: str) -> str:
    """The open_clip name of ``model``; a model-config JSON is registered with open_clip under its file's stem."""
    import open_clip

    if model.lower().endswith(".json"):
        open_clip.add_model_config(model)
        return Path(model).stem
    return model


def _device(settings: Settings) -> Any:
    import torch

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is available")
    return torch.device(settings.device)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(settings: Settings, device: Any) -> Any:
    import torch

    if settings.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- (a) the research loop ------------------------------------------------------------------------------------------
def _research_model(settings: Settings, class_names: list[str], device: Any) -> tuple[Any, Any, Any, Any, Any]:
    """open_clip's model and train transform, peft LoRA on the image tower's linear layers, frozen text features."""
    import open_clip
    import torch
    from peft import LoraConfig, get_peft_model

    name = _open_clip_name(settings.model)
    torch.manual_seed(settings.seed)
    model, train_transform, _ = open_clip.create_model_and_transforms(name, pretrained=settings.pretrained)
    model.to(device).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        text = model.encode_text(tokenizer([f"a photo of a {c}." for c in class_names]).to(device), normalize=True)
    inside_attention = {f"{n}.out_proj" for n, m in model.visual.named_modules()
                        if isinstance(m, torch.nn.MultiheadAttention)}
    targets = [n for n, m in model.visual.named_modules()
               if isinstance(m, torch.nn.Linear) and n not in inside_attention]
    visual = get_peft_model(model.visual, LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank,
                                                     target_modules=targets))
    visual.train()
    params = [p for p in visual.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    return visual, train_transform, text, model.logit_scale.exp().detach(), optimizer


def _research_step(settings: Settings, device: Any, visual: Any, text: Any, scale: Any, optimizer: Any,
                   images: Any, labels: Any) -> float:
    import torch
    import torch.nn.functional as F

    with _autocast(settings, device):
        features = F.normalize(visual(images), dim=-1)
        loss = F.cross_entropy(scale * features @ text.T.to(features.dtype), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()) if torch.isfinite(loss) else float("nan")


def research_loop(settings: Settings, folder: Path) -> dict[str, Any]:
    """(a) and its ceiling: ``ImageFolder`` decoding every epoch, LoRA, CE to frozen text; then the same step on
    one batch already in memory."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    device = _device(settings)
    probe = ImageFolder(folder)
    class_names = [c.replace("_", " ") for c in probe.classes]
    visual, train_transform, text, scale, optimizer = _research_model(settings, class_names, device)
    dataset = ImageFolder(folder, transform=train_transform)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, num_workers=settings.threads,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(settings.seed))
    seen, steps, loss = 0, 0, float("nan")
    started = time.perf_counter()
    for _ in range(settings.epochs):
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = _research_step(settings, device, visual, text, scale, optimizer, images, labels)
            seen += images.shape[0]
            steps += 1
    _sync(device)
    seconds = time.perf_counter() - started
    result = {"images": seen, "steps": steps, "seconds": round(seconds, 3), "images_per_s": seen / seconds,
              "last_loss": loss}
    images, labels = next(iter(DataLoader(dataset, batch_size=settings.batch_size, shuffle=False)))
    images, labels = images.to(device), labels.to(device)
    result["ceiling"] = _time_steps(settings, device, lambda: _research_step(settings, device, visual, text, scale,
                                                                              optimizer, images, labels),
                                    images.shape[0])
    return result


def _time_steps(settings: Settings, device: Any, step: Any, batch: int) -> dict[str, Any]:
    step()  # warm-up, untimed
    _sync(device)
    started = time.perf_counter()
    for _ in range(settings.ceiling_steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - started
    return {"images": batch * settings.ceiling_steps, "steps": settings.ceiling_steps, "seconds": round(seconds, 3),
            "images_per_s": batch * settings.ceiling_steps / seconds if seconds > 0 else float("nan")}


# --- (b) clipcl and (c) its ceiling ----------------------------------------------------------------------------------
class StageTimes:
    """A :class:`clipcl.Progress` that keeps the wall time of each kind of stage of a run."""

    KINDS = (("decoding images", "decode"), ("epoch", "train"), ("statistics", "statistics"),
             ("evaluating", "evaluate"))

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: tuple[str, float] | None = None

    def warn(self, message: str) -> None:
        print(f"  clipcl: {message}", file=sys.stderr)

    def info(self, message: str) -> None:
        pass

    def stage_start(self, description: str, total: int) -> None:
        kind = next((k for needle, k in self.KINDS if needle in description), "other")
        self._open = (kind, time.perf_counter())

    def stage_advance(self, steps: int = 1, **metrics: float) -> None:
        pass

    def stage_end(self) -> None:
        if self._open is not None:
            kind, started = self._open
            self.seconds[kind] = round(self.seconds.get(kind, 0.0) + time.perf_counter() - started, 3)
            self._open = None


@contextlib.contextmanager
def _accelerate_device(settings: Settings) -> Iterator[None]:
    """Make Accelerate (which picks clipcl's device) use the CPU when ``--device cpu`` on a machine with a GPU."""
    saved = os.environ.get("ACCELERATE_USE_CPU")
    if settings.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = saved


def _workspace(settings: Settings, path: Path) -> Path:
    """A fresh workspace. Random weights (no ``--pretrained``) are drawn from the seed: every load of the model (at
    ``init``, by ``add_task`` and by the ceiling, each after seeding) gives the same ones, as the workspace checks."""
    import torch

    import clipcl

    spec = clipcl.resolve_model_spec(settings.model, settings.pretrained, allow_random_weights=True)
    torch.manual_seed(settings.seed)
    clipcl.Workspace.create(path, spec, settings.method)
    return path


def clipcl_ceiling(settings: Settings, folder: Path, workspace: Path) -> dict[str, Any]:
    """(c): clipcl's training step, as ``train_method`` takes it (Accelerate, the method's forward and loss,
    backward, optimiser step), on one batch of the folder already in memory."""
    import torch
    from accelerate.utils import set_seed

    from clipcl.data import scan_task_folder
    from clipcl.imagecache import build_image_cache
    from clipcl.methods import TaskInfo
    from clipcl.runtime import make_accelerator
    from clipcl.workspace import Workspace

    with _accelerate_device(settings):
        accelerator = make_accelerator(settings.precision)
    set_seed(settings.seed)
    method = Workspace.open(workspace).build_method(device=accelerator.device)
    data = scan_task_folder(folder, holdout=0.0, seed=settings.seed, workers=settings.threads)
    task = TaskInfo(index=1, classes=tuple(data.classes), offset=0)
    method.begin(task)
    method.begin_stage(method.stages[0])
    method.requires_grad_(False)
    params = method.trainable_parameters()
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.lr * method.learning_rate_scale(), weight_decay=0.0)
    model, optimizer = accelerator.prepare(method, optimizer)
    shuffled = random.Random(settings.seed).sample(data.train, len(data.train))[:settings.batch_size]
    cache = build_image_cache(data.root, shuffled, method.backbone.train_transform, None, threads=settings.threads)
    if cache.train is None:
        raise SystemExit(f"{settings.model}'s train transform is not one clipcl caches")
    images = cache.train.augment(range(len(shuffled)), torch.Generator().manual_seed(settings.seed),
                                 accelerator.device)
    labels = torch.tensor([item.label for item in shuffled], device=accelerator.device)
    model.train()

    def step() -> None:
        loss = model(images, labels)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        return _time_steps(settings, accelerator.device, step, images.shape[0])
    finally:
        model.eval()
        cache.close()


def clipcl_training(settings: Settings, folder: Path, workspace: Path) -> dict[str, Any]:
    """(b): ``clipcl.add_task`` on the folder, all of it trained, no evaluation."""
    import clipcl

    times = StageTimes()
    options = clipcl.TrainOptions(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                                  seed=settings.seed, holdout=0.0, precision=settings.precision,
                                  workers=settings.threads, evaluate=False)
    started = time.perf_counter()
    with _accelerate_device(settings):
        report = clipcl.add_task(workspace, folder, options, progress=times)
    wall = time.perf_counter() - started
    timings = report.record.timings
    steps = report.record.training.steps
    images = round(timings.images_per_s * timings.train_s)
    return {"images": images, "steps": steps, "seconds": timings.train_s, "images_per_s": timings.images_per_s,
            "device": report.record.training.device, "add_task_wall_s": round(wall, 3), "stages_s": times.seconds}


# --- the data path alone ----------------------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its finished children (``DataLoader`` workers, joined at the
    end of each epoch): the work a data path costs, which a busy machine does not inflate as it does wall time."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _rates(seen: int, seconds: float, cpu: float) -> dict[str, Any]:
    return {"images": seen, "seconds": round(seconds, 3), "images_per_s": seen / seconds,
            "cpu_ms_per_image": round(1000 * cpu / seen, 3), "images_per_cpu_s": seen / cpu if cpu > 0 else None}


def _train_transform(settings: Settings) -> Any:
    import open_clip

    name = _open_clip_name(settings.model)
    config = open_clip.get_model_config(name)
    if config is None:
        raise SystemExit(f"unknown model {settings.model}")
    size = config["vision_cfg"]["image_size"]
    return open_clip.image_transform(size, is_train=True)  # what create_model_and_transforms gives for training


def data_path_decoding(settings: Settings, folder: Path) -> dict[str, Any]:
    """Images/s that ``ImageFolder`` + ``DataLoader`` (``threads`` workers) deliver, decoding every epoch."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    device = _device(settings)
    dataset = ImageFolder(folder, transform=_train_transform(settings))
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, num_workers=settings.threads,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(settings.seed))
    seen = 0
    started, cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(settings.data_epochs):
        for images, _labels in loader:
            seen += images.to(device, non_blocking=True).shape[0]
    _sync(device)
    return _rates(seen, time.perf_counter() - started, _cpu_seconds() - cpu)


def data_path_cached(settings: Settings, folder: Path) -> dict[str, Any]:
    """Images/s of clipcl's decode-once path: the cache is built once (``build_s``, timed apart), then each epoch
    batches indices and augments them batch-wise on the device; ``images_per_s_with_build`` spreads the build over
    the epochs measured."""
    from clipcl.data import scan_task_folder
    from clipcl.imagecache import build_image_cache
    from clipcl.runtime import make_loader

    device = _device(settings)
    data = scan_task_folder(folder, holdout=0.0, seed=settings.seed, workers=settings.threads)
    started = time.perf_counter()
    cache = build_image_cache(data.root, data.train, _train_transform(settings), None, threads=settings.threads)
    build = time.perf_counter() - started
    if cache.train is None:
        raise SystemExit(f"{settings.model}'s train transform is not one clipcl caches")
    loader = make_loader(cache.train, settings.batch_size, 0, shuffle=True, seed=settings.seed)
    seen = 0
    started, cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(settings.data_epochs):
        augment = cache.train.epoch_augmenter(loader.generator, 0, device)
        for indices, labels in loader:
            seen += augment(indices).shape[0]
            labels.to(device, non_blocking=True)
    _sync(device)
    seconds = time.perf_counter() - started
    result = {**_rates(seen, seconds, _cpu_seconds() - cpu), "build_s": round(build, 3),
              "build_images_per_s": len(data.train) / build, "images_per_s_with_build": seen / (seconds + build),
              "cached_mib": round(cache.nbytes / 2**20, 1), "memory_mapped": cache.mapped}
    cache.close()
    return result


# --- the run --------------------------------------------------------------------------------------------------------
def _ratio(numerator: dict[str, Any] | None, denominator: dict[str, Any] | None) -> float | None:
    if not numerator or not denominator or not denominator.get("images_per_s"):
        return None
    return round(numerator["images_per_s"] / denominator["images_per_s"], 3)


def _cpu_ratio(numerator: dict[str, Any] | None, denominator: dict[str, Any] | None) -> float | None:
    """How many times less CPU time an image costs on the ``numerator`` path."""
    if not numerator or not denominator or not numerator.get("cpu_ms_per_image"):
        return None
    return round(denominator["cpu_ms_per_image"] / numerator["cpu_ms_per_image"], 3)


def _machine(settings: Settings) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform()}
    if settings.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_benchmark(settings: Settings, scratch: Path | None = None) -> dict[str, Any]:
    """Every measurement of ``settings``, one after another; returns the results as one JSON-ready dict."""
    import torch

    torch.set_num_threads(settings.threads)
    with contextlib.ExitStack() as stack:
        if scratch is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clipcl-throughput-")))
        folder = limit_folder(Path(settings.folder), settings.images, scratch / "subset")
        load_before = os.getloadavg()
        results: dict[str, Any] = {"settings": asdict(settings), "folder_used": str(folder),
                                   "machine": _machine(settings)}
        if "data" not in settings.skip:
            results["data_path"] = {"decode_every_epoch": data_path_decoding(settings, folder),
                                    "clipcl_cached": data_path_cached(settings, folder)}
        if "research" not in settings.skip:
            results["research"] = research_loop(settings, folder)
            results["research_ceiling"] = results["research"].pop("ceiling")
        if "ceiling" not in settings.skip or "clipcl" not in settings.skip:
            workspace = _workspace(settings, scratch / "ws")
            if "ceiling" not in settings.skip:  # before add_task: the method is built on the workspace's empty state
                results["ceiling"] = clipcl_ceiling(settings, folder, workspace)
            if "clipcl" not in settings.skip:
                results["clipcl"] = clipcl_training(settings, folder, workspace)
        results["machine"]["load_average_before"] = [round(x, 2) for x in load_before]
        results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    data = results.get("data_path", {})
    results["ratios"] = {
        "clipcl_vs_ceiling": _ratio(results.get("clipcl"), results.get("ceiling")),
        "research_vs_its_ceiling": _ratio(results.get("research"), results.get("research_ceiling")),
        "clipcl_vs_research": _ratio(results.get("clipcl"), results.get("research")),
        "data_cached_vs_decoding": _ratio(data.get("clipcl_cached"), data.get("decode_every_epoch")),
        "data_cached_vs_decoding_cpu": _cpu_ratio(data.get("clipcl_cached"), data.get("decode_every_epoch")),
    }
    return results


def summary(results: dict[str, Any]) -> str:
    """The results as a short table."""
    rows = [("research loop (ImageFolder, LoRA, frozen text)", results.get("research")),
            ("research step on a batch in memory", results.get("research_ceiling")),
            ("clipcl add-task, training steps", results.get("clipcl")),
            ("clipcl step on a batch in memory (ceiling)", results.get("ceiling"))]
    data = results.get("data_path", {})
    rows += [("data path: ImageFolder, decoding every epoch", data.get("decode_every_epoch")),
             ("data path: clipcl cache, per epoch", data.get("clipcl_cached"))]
    lines = [f"{name:<50} {r['images_per_s']:>10.1f} images/s"
             + (f"  ({r['cpu_ms_per_image']:.2f} CPU-ms an image)" if "cpu_ms_per_image" in r else "")
             for name, r in rows if r]
    cached = data.get("clipcl_cached")
    if cached:
        lines.append(f"{'data path: clipcl cache, building it once':<50} {cached['build_images_per_s']:>10.1f} "
                     f"images/s ({cached['cached_mib']} MiB{', memory-mapped' if cached['memory_mapped'] else ''})")
    if results.get("clipcl"):
        lines.append(f"clipcl add-task phases (s): {results['clipcl']['stages_s']}, wall "
                     f"{results['clipcl']['add_task_wall_s']}")
    lines += [f"{name}: {value}" for name, value in results["ratios"].items() if value is not None]
    machine = results["machine"]
    lines.append(f"load average before/after: {machine['load_average_before']} / {machine['load_average_after']} "
                 f"on {machine['cpus']} CPUs")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[Settings, int, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="a task folder of class sub-folders")
    source.add_argument("--generate", type=int, metavar="N",
                        help=f"N generated ~300x200 JPEGs, {GENERATED_MODEL} (224 px) with random weights")
    parser.add_argument("--model", help=f"open_clip name or model-config JSON (default with --generate: "
                                        f"{GENERATED_MODEL})")
    parser.add_argument("--pretrained", help="weights file or tag (none: random weights)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=0, help="use only this many images of the folder (0: all)")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="torch threads, DataLoader workers and clipcl's --workers")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="default: bf16 on cuda, fp32 on the CPU")
    parser.add_argument("--method", default="dma")
    parser.add_argument("--ceiling-steps", type=int, default=8)
    parser.add_argument("--data-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--skip", default="", help="comma-separated: research, clipcl, ceiling, data")
    parser.add_argument("--json", dest="json_out", help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.folder is None and args.generate < 2:
        parser.error("--generate needs at least 2 images")
    model = args.model or (GENERATED_MODEL if args.generate else None)
    if model is None:
        parser.error("--folder needs --model")
    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    unknown = set(skip) - {"research", "clipcl", "ceiling", "data"}
    if unknown:
        parser.error(f"--skip: unknown {', '.join(sorted(unknown))}")
    settings = Settings(folder=args.folder or "", model=model, pretrained=args.pretrained, epochs=args.epochs,
                        batch_size=args.batch_size, images=args.images, threads=args.threads, device=args.device,
                        precision=precision, method=args.method, ceiling_steps=args.ceiling_steps,
                        data_epochs=args.data_epochs, lr=args.lr, skip=skip)
    return settings, args.generate or 0, args.json_out


def main(argv: list[str] | None = None) -> int:
    settings, generate, json_out = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="clipcl-throughput-"))
    try:
        if generate:
            started = time.perf_counter()
            settings.folder = str(generate_folder(scratch / "generated", generate, seed=settings.seed))
            print(f"generated {generate} JPEGs in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        results = run_benchmark(settings, scratch)
        if generate:
            results["settings"]["folder"] = f"generated: {generate} JPEGs of ~300x200"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(summary(results))
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
