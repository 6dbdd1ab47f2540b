"""Time to the first answer of ``clipcl predict one.jpg`` and images/s of ``clipcl predict FOLDER``, at 1, 5 and 10
tasks (issue 18, part 5).

What a user waits for is the first answer of a new process: imports, opening the workspace, loading the base model,
checking its weights (the sha256 of a local weights file and the fingerprint of the loaded tensors, both kept per
file after the first load: ``clipcl.fingerprint_cache``), restoring every task's adapters, and one batch. What a
folder costs is images/s once the model is loaded: ``dma`` runs one frozen pass and the LoRAs of each image's
``route`` likeliest tasks (2 by default), so throughput should not fall with the number of tasks. Goal: images/s at
10 tasks at least half of that at 1 task.

The script builds one ``dma`` workspace task after task on generated image folders (2 colour classes per task, one
epoch; the figures are about speed, not accuracy) and keeps copies of it at each task count, then runs ``python -m
clipcl predict`` subprocesses against each copy:

* **first answer**: seconds from starting ``clipcl predict -w WS one.jpg --json`` to its first output line (median
  of ``--repeats`` runs after one warm-up run; the user's fingerprint cache kept as a second run finds it); and the
  same with an empty fingerprint cache (``CLIPCL_CACHE_DIR`` pointing at a new folder), which hashes the weights as a
  first run does;
* **folder**: ``clipcl predict -w WS FOLDER --json`` over ``--folder-images`` images; images/s counts the images
  after the first batch over the time from the first output line to the last (the load and the first batch are in
  the first answer), median of ``--repeats``. The runs go in rounds over the task counts, so that a change in the
  machine's load falls on every count alike.

The default model is a small ViT (64 px, 6 blocks of width 192; the shape of ../shared/bench's MiniCLIP-64) with
random weights written once to a file; ``--model`` takes an open_clip architecture (``ViT-B-16``) or a model-config
JSON, ``--pretrained`` a tag or weights file (random weights for the architecture otherwise). The load average is
reported before and after: figures taken while other work runs on the machine are not comparable.

    python benchmarks/predict_latency.py                                 # small model, 1, 5 and 10 tasks
    python benchmarks/predict_latency.py --model ViT-B-16 --json out.json
    python benchmarks/predict_latency.py --profile                       # also where one predict's time goes
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SMALL_CONFIG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 6, "head_width": 64, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 3},
}
SMALL_NAME = "LatencyCLIP-64"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"open_clip architecture or model-config JSON (default: {SMALL_NAME}, a "
                                        "small 64 px ViT written by the script)")
    parser.add_argument("--pretrained", help="tag or weights file (default: random weights, written once)")
    parser.add_argument("--tasks", default="1,5,10", help="task counts to measure at (default 1,5,10)")
    parser.add_argument("--images-per-class", type=int, default=8, help="training images per class (default 8)")
    parser.add_argument("--image-size", type=int, default=96, help="side of the generated JPEGs in px (default 96)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per task when building (default 1)")
    parser.add_argument("--folder-images", type=int, default=256, help="images in the predicted folder (256)")
    parser.add_argument("--batch-size", type=int, default=32, help="predict's --batch-size (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure, median reported (default 3)")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--profile", action="store_true",
                        help="also run one predict under -X importtime and cProfile and say where its time goes")
    parser.add_argument("--json", type=Path, dest="json_out", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    args.task_counts = sorted({int(n) for n in args.tasks.split(",")})
    if min(args.task_counts) < 1 or args.folder_images <= args.batch_size or args.repeats < 1:
        parser.error("task counts must be >= 1, --folder-images above --batch-size, --repeats >= 1")
    return args


# --- building -------------------------------------------------------------------------------------------------------
def model_and_weights(args: argparse.Namespace, workdir: Path) -> tuple[str, str]:
    """The ``--model``/``--pretrained`` pair to build with: random weights written once to a file where none are
    given (a workspace never stores adapters on weights that change from load to load)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    model = args.model
    if model is None:
        config = workdir / f"{SMALL_NAME}.json"
        config.write_text(json.dumps(SMALL_CONFIG))
        model = str(config)
    if args.pretrained is not None:
        return model, args.pretrained
    name = model
    if model.endswith(".json"):
        open_clip.add_model_config(model)
        name = Path(model).stem
    weights = workdir / f"{name}-random.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        state = open_clip.create_model(name).state_dict()
        save_file({key: value.contiguous() for key, value in state.items()}, weights)
    return model, str(weights)


def colour(index: int, count: int, rng: random.Random) -> tuple[int, int, int]:
    hue = (index / count + rng.uniform(-0.01, 0.01)) % 1.0
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.8, rng.uniform(0.6, 0.95)))  # type: ignore[return-value]


def write_image(path: Path, rgb: tuple[int, int, int], size: int, rng: random.Random) -> None:
    from PIL import Image

    image = Image.new("RGB", (size, size), rgb)
    x, y = rng.randrange(size // 2), rng.randrange(size // 2)
    image.paste(tuple(int(c * 0.6) for c in rgb), (x, y, x + size // 3, y + size // 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)


def make_data(args: argparse.Namespace, workdir: Path, n_tasks: int) -> tuple[list[Path], Path, Path]:
    """``n_tasks`` task folders of 2 classes each, a folder of images to predict, and one image."""
    rng = random.Random(0)
    n_classes = 2 * n_tasks
    folders = []
    for task in range(n_tasks):
        folder = workdir / "data" / f"task-{task + 1:02d}"
        for c in range(2):
            rgb = colour(2 * task + c, n_classes, rng)
            for i in range(args.images_per_class):
                write_image(folder / f"t{task + 1}c{c}" / f"{i:03d}.jpg", rgb, args.image_size, rng)
        folders.append(folder)
    predict_folder = workdir / "predict"
    for i in range(args.folder_images):
        write_image(predict_folder / f"{i:04d}.jpg", colour(rng.randrange(n_classes), n_classes, rng),
                    args.image_size, rng)
    one = workdir / "one.jpg"
    write_image(one, colour(0, n_classes, rng), args.image_size, rng)
    return folders, predict_folder, one


def build_workspaces(args: argparse.Namespace, workdir: Path, model: str, pretrained: str, folders: list[Path]
                     ) -> dict[int, Path]:
    """One dma workspace learning the tasks in turn, copied aside at each measured task count."""
    import clipcl

    building = workdir / "ws-building"
    clipcl.init_workspace(str(building), model, pretrained)
    copies: dict[int, Path] = {}
    for count, folder in enumerate(folders, start=1):
        started = time.perf_counter()
        clipcl.add_task(building, folder, clipcl.TrainOptions(epochs=args.epochs, batch_size=16, workers=0,
                                                              evaluate=False))
        print(f"  task {count}: learned in {time.perf_counter() - started:.1f} s", flush=True)
        if count in args.task_counts:
            copies[count] = workdir / f"ws-{count}"
            shutil.copytree(building, copies[count])
    return copies


# --- measuring ------------------------------------------------------------------------------------------------------
def run_predict(workspace: Path, target: Path, batch_size: int, cache_dir: Path) -> dict[str, Any]:
    """One ``python -m clipcl predict --json`` process: when each output line came, from the start."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CLIPCL_CACHE_DIR": str(cache_dir)}
    command = [sys.executable, "-m", "clipcl", "predict", "-w", str(workspace), str(target), "--json",
               "--batch-size", str(batch_size), "--top-k", "1"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        if line.startswith("{"):
            lines.append(time.perf_counter() - started)
    _, stderr = process.communicate()
    if process.returncode != 0 or not lines:
        raise SystemExit(f"clipcl predict failed ({process.returncode}): {stderr.strip()[-2000:]}")
    return {"first_line_s": lines[0], "last_line_s": lines[-1], "exit_s": time.perf_counter() - started,
            "lines": len(lines)}


def measure(args: argparse.Namespace, workdir: Path, workspaces: dict[int, Path], predict_folder: Path, one: Path
            ) -> dict[int, dict[str, Any]]:
    """Every figure for every task count, in rounds: each round measures every count in turn, so that a change in
    the machine's load during the run falls on all of them alike (the medians are compared with each other)."""
    warm_cache = workdir / "user-cache"
    for workspace in workspaces.values():
        run_predict(workspace, one, args.batch_size, warm_cache)  # warm-up: page cache, fingerprints kept
    runs: dict[int, dict[str, list[float]]] = {count: {"first": [], "cold": [], "rate": [], "total": []}
                                               for count in workspaces}
    for round_number in range(args.repeats):
        for count, workspace in workspaces.items():
            kept = runs[count]
            kept["first"].append(run_predict(workspace, one, args.batch_size, warm_cache)["first_line_s"])
            empty = Path(tempfile.mkdtemp(dir=workdir, prefix="cold-cache-"))
            kept["cold"].append(run_predict(workspace, one, args.batch_size, empty)["first_line_s"])
            run = run_predict(workspace, predict_folder, args.batch_size, warm_cache)
            assert run["lines"] == args.folder_images, run
            kept["rate"].append((args.folder_images - args.batch_size) / max(run["last_line_s"] - run["first_line_s"],
                                                                             1e-9))
            kept["total"].append(args.folder_images / run["exit_s"])
        print(f"  round {round_number + 1}/{args.repeats} done", flush=True)
    return {count: {
        "first_answer_s": statistics.median(kept["first"]), "first_answer_runs_s": kept["first"],
        "first_answer_hashing_s": statistics.median(kept["cold"]), "first_answer_hashing_runs_s": kept["cold"],
        "folder_images_per_s": statistics.median(kept["rate"]), "folder_images_per_s_runs": kept["rate"],
        "folder_images_per_s_end_to_end": statistics.median(kept["total"]),
    } for count, kept in runs.items()}


def profile(workdir: Path, workspace: Path, one: Path, batch_size: int) -> dict[str, Any]:
    """Where one ``predict one.jpg`` spends its time: imports by top-level package (``-X importtime``, own time),
    and the main steps after them (cProfile, cumulative)."""
    import pstats
    import re

    env = {**os.environ, "CLIPCL_CACHE_DIR": str(workdir / "user-cache")}
    base = ["-m", "clipcl", "predict", "-w", str(workspace), str(one), "--json", "--batch-size", str(batch_size)]
    result = subprocess.run([sys.executable, "-X", "importtime", *base], capture_output=True, text=True, env=env,
                            check=True)
    by_package: dict[str, float] = {}
    total = 0.0
    for line in result.stderr.splitlines():
        found = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if found:
            own = int(found[1]) / 1e6
            by_package[found[4].split(".")[0]] = by_package.get(found[4].split(".")[0], 0.0) + own
            total += own
    stats_path = workdir / "predict.prof"
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(stats_path), *base], capture_output=True, env=env,
                   check=True)
    stats = pstats.Stats(str(stats_path)).stats  # type: ignore[attr-defined]
    wanted = {"build_method": "workspace.py", "load_backbone": "backbone.py", "create_model_and_transforms":
              "factory.py", "get_tokenizer": "factory.py", "weights_fingerprint": "backbone.py", "sha256_of_file":
              "reading.py", "restore": "base.py", "_predict_batches": "inference.py", "predict_images": "inference.py"}
    steps: dict[str, float] = {}
    for (filename, _, function), (_, _, _, cumulative, _) in stats.items():
        if function in wanted and filename.endswith(wanted[function]):
            steps[function] = steps.get(function, 0.0) + cumulative
    top = dict(sorted(by_package.items(), key=lambda item: -item[1])[:12])
    return {"imports_s": total, "imports_by_package_s": top, "steps_s": steps}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="clipcl-predict-latency-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["CLIPCL_CACHE_DIR"] = str(workdir / "user-cache")  # never the user's own fingerprint cache
    load_before = load_average()
    try:
        print(f"building in {workdir}", flush=True)
        model, pretrained = model_and_weights(args, workdir)
        folders, predict_folder, one = make_data(args, workdir, max(args.task_counts))
        workspaces = build_workspaces(args, workdir, model, pretrained, folders)
        rows = measure(args, workdir, workspaces, predict_folder, one)
        profiled = profile(workdir, workspaces[max(workspaces)], one, args.batch_size) if args.profile else None
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    low, high = min(rows), max(rows)
    ratio = rows[high]["folder_images_per_s"] / rows[low]["folder_images_per_s"]
    report = {
        "model": args.model or SMALL_NAME, "pretrained": args.pretrained or "random weights",
        "settings": {k: getattr(args, k) for k in ("images_per_class", "image_size", "epochs", "folder_images",
                                                   "batch_size", "repeats")},
        "tasks": {str(k): v for k, v in rows.items()},
        "throughput_ratio": {"tasks": [high, low], "ratio": ratio, "goal": 0.5, "met": ratio >= 0.5},
        "profile": profiled,
        "machine": {"cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_average(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    print("\n| tasks | first answer (s) | first answer, hashing the weights (s) | folder images/s |")
    print("|---:|---:|---:|---:|")
    for count, row in rows.items():
        print(f"| {count} | {row['first_answer_s']:.2f} | {row['first_answer_hashing_s']:.2f} | "
              f"{row['folder_images_per_s']:.1f} |")
    print(f"\nimages/s at {high} tasks / at {low} task(s): {ratio:.2f} (goal >= 0.5: "
          f"{'met' if ratio >= 0.5 else 'NOT met'}); load average before {load_before}, after {load_average()}")
    if profiled is not None:
        print(f"\none predict at {high} tasks: imports {profiled['imports_s']:.2f} s, by package "
              + ", ".join(f"{k} {v:.2f}" for k, v in profiled["imports_by_package_s"].items()))
        print("after the imports (cumulative s): " + ", ".join(f"{k} {v:.3f}" for k, v in profiled["steps_s"].items()))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
