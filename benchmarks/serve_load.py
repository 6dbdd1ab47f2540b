"""Requests/s and latency of ``clipcl serve`` against one ``clipcl predict --json IMAGE`` process per image.

Both answer the same images with the same workspace: the server (one process, model loaded once, concurrent requests
batched) under 1, 4 and 16 concurrent clients each sending one image per request, and ``clipcl predict`` started
once per image with 1, 4 and 16 processes at a time (what a script without a server does). Latency is the wall time
of one request, or of one process from start to exit. The load average before and after is recorded: quote figures
only from a quiet machine.

    python benchmarks/serve_load.py                                 # a tiny random-weight CLIP, built here
    python benchmarks/serve_load.py --model ../shared/bench/MiniCLIP-64.json \\
        --pretrained ../shared/bench/miniclip-B-cifar10.safetensors  # a given model, on generated images
    python benchmarks/serve_load.py --workspace WS --images 'photos/*.jpg' --json serve-load.json

Everything runs on this machine, on loopback; the server and every process it starts are stopped at the end.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
ADDRESS = re.compile(r"at (http://[^\s]+)")


def draw(colour: tuple[int, int, int], rng: random.Random, size: int = 96) -> Any:
    from PIL import Image

    image = Image.new("RGB", (size, size), tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour))
    x, y = rng.randint(0, size // 2), rng.randint(0, size // 2)
    image.paste(tuple(int(c * 0.6) for c in colour), (x, y, x + size // 3, y + size // 3))
    return image


def make_folder(root: Path, classes: list[str], per_class: int, seed: int) -> Path:
    rng = random.Random(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(COLOURS[name], rng).save(root / name / f"{i:03d}.png")
    return root


def clipcl(*args: str | Path, timeout: float = 1800) -> str:
    result = subprocess.run([sys.executable, "-m", "clipcl", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        sys.exit(f"clipcl {' '.join(map(str, args))} failed: {result.stderr.strip().splitlines()[-1:]}")
    return result.stdout


def build_workspace(root: Path, model: str | None, pretrained: str | None, epochs: int) -> Path:
    """Two dma tasks (red/green, blue/yellow) on ``model``, or on a tiny random-weight CLIP written here."""
    if model is None:
        import open_clip
        import torch
        from safetensors.torch import save_file

        config = root / "TinyCLIP.json"
        config.write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(config)
        torch.manual_seed(0)
        weights = root / "tiny.safetensors"
        save_file({k: v.contiguous() for k, v in open_clip.create_model("TinyCLIP").state_dict().items()}, weights)
        model, pretrained = str(config), str(weights)
    ws = root / "ws"
    clipcl("init", "-w", ws, "--model", model, *(("--pretrained", pretrained) if pretrained else ()))
    for i, classes in enumerate((["red", "green"], ["blue", "yellow"])):
        folder = make_folder(root / "data" / f"task-{i + 1}", classes, per_class=16, seed=i)
        clipcl("add-task", "-w", ws, folder, "--epochs", str(epochs), "--batch-size", "16", "--workers", "0")
    return ws


def query_images(root: Path, pattern: str | None, count: int) -> list[Path]:
    if pattern:
        found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not found:
            sys.exit(f"--images: nothing matches {pattern}")
        return found[:count]
    folder = root / "queries"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(123)
    paths = []
    for i in range(count):
        path = folder / f"q{i:03d}.png"
        draw(list(COLOURS.values())[i % len(COLOURS)], rng).save(path)
        paths.append(path)
    return paths


def summarise(latencies: list[float], elapsed: float) -> dict[str, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]
    return {"requests": len(ordered), "seconds": elapsed, "requests_per_s": len(ordered) / elapsed,
            "p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * p99}


class Server:
    def __init__(self, ws: Path, logs: Path, args: list[str]) -> None:
        import httpx

        self.err = logs / "serve.err"
        with open(logs / "serve.out", "wb") as out, open(self.err, "wb") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "clipcl", "serve", "-w", str(ws), "--port", "0",
                                             *args], stdout=out, stderr=err)
        started = time.monotonic()
        while not (found := ADDRESS.search(self.err.read_text(errors="replace"))):
            if self.process.poll() is not None or time.monotonic() - started > 600:
                self.stop()
                sys.exit(f"clipcl serve did not start: {self.err.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        self.url = found.group(1)
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while True:
                try:
                    client.get("/health").raise_for_status()
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
        self.startup_s = time.monotonic() - started

    def health(self) -> dict[str, Any]:
        import httpx

        return httpx.get(self.url + "/health", timeout=60).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def load_server(server: Server, images: list[Path], clients: int, requests: int, top_k: int) -> dict[str, Any]:
    """``requests`` one-image requests from ``clients`` threads, each with its own connection."""
    import httpx

    contents = [(path.name, path.read_bytes()) for path in images]
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    before = server.health()["served"]

    def client(index: int) -> None:
        nonlocal failures
        with httpx.Client(base_url=server.url, timeout=300) as session:
            for n in range(index, requests, clients):
                name, data = contents[n % len(contents)]
                started = time.perf_counter()
                response = session.post("/predict", files=[("files", (name, data))], params={"top_k": top_k})
                took = time.perf_counter() - started
                with lock:
                    latencies.append(took)
                    failures += response.status_code != 200

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - started
    after = server.health()["served"]
    batches = after["batches"] - before["batches"]
    return {"clients": clients, **summarise(latencies, elapsed), "failures": failures, "batches": batches,
            "images_per_batch": (after["images"] - before["images"]) / max(1, batches)}


def load_processes(ws: Path, images: list[Path], concurrency: int, top_k: int) -> dict[str, Any]:
    """One ``clipcl predict --json IMAGE`` process per image, ``concurrency`` at a time."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()

    def one(path: Path) -> None:
        nonlocal failures
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "clipcl", "predict", "-w", str(ws), "--json", "--top-k",
                                 str(top_k), "--workers", "0", str(path)], capture_output=True, timeout=900)
        took = time.perf_counter() - started
        with lock:
            latencies.append(took)
            failures += result.returncode != 0

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, images))
    return {"clients": concurrency, **summarise(latencies, time.perf_counter() - started), "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, help="a workspace that has learned tasks (default: build one)")
    parser.add_argument("--model", help="model for the built workspace (default: a tiny random-weight CLIP)")
    parser.add_argument("--pretrained", help="weights for --model")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per task of the built workspace")
    parser.add_argument("--images", help="glob of query images (default: generated)")
    parser.add_argument("--distinct-images", type=int, default=32, help="distinct query images")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels")
    parser.add_argument("--requests", type=int, default=200, help="requests per level against the server")
    parser.add_argument("--process-images", type=int, default=16,
                        help="images per level for the one-process-per-image baseline (0: skip it)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--serve-args", default="", help="extra clipcl serve flags, e.g. '--max-batch 64'")
    parser.add_argument("--json", type=Path, dest="json_out", help="write the results here")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="clipcl-serve-load-") as tmp:
        root = Path(tmp)
        ws = args.workspace or build_workspace(root, args.model, args.pretrained, args.epochs)
        images = query_images(root, args.images, args.distinct_images)
        server = Server(ws, root, args.serve_args.split())
        try:
            health = server.health()
            print(f"server: {health['tasks']} tasks, {health['classes']} classes, started in {server.startup_s:.1f} s")
            load_server(server, images, 4, 20, args.top_k)  # warm-up
            served = []
            for clients in levels:
                served.append(load_server(server, images, clients, args.requests, args.top_k))
                print(f"serve   {clients:>2} clients: {served[-1]['requests_per_s']:8.1f} req/s  "
                      f"p50 {served[-1]['p50_ms']:8.1f} ms  p99 {served[-1]['p99_ms']:8.1f} ms  "
                      f"{served[-1]['images_per_batch']:.1f} images/batch", flush=True)
        finally:
            server.stop()
        processes = []
        if args.process_images > 0:
            for clients in levels:
                chosen = [images[i % len(images)] for i in range(args.process_images)]
                processes.append(load_processes(ws, chosen, clients, args.top_k))
                print(f"predict {clients:>2} procs:   {processes[-1]['requests_per_s']:8.2f} img/s  "
                      f"p50 {processes[-1]['p50_ms']:8.0f} ms  p99 {processes[-1]['p99_ms']:8.0f} ms", flush=True)

    import torch

    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "workspace": str(args.workspace or "built: 2 dma tasks"), "model": health["model"],
        "tasks": health["tasks"], "classes": health["classes"], "top_k": args.top_k,
        "serve_args": args.serve_args, "server_startup_s": server.startup_s,
        "serve": served, "predict_per_image": processes,
    }
    print("\n| clients | serve req/s | serve p50 ms | serve p99 ms | images/batch | predict img/s | predict p50 ms "
          "| predict p99 ms |\n|---|---|---|---|---|---|---|---|")
    for i, row in enumerate(served):
        base = processes[i] if i < len(processes) else None
        baseline = (f"{base['requests_per_s']:.2f} | {base['p50_ms']:.0f} | {base['p99_ms']:.0f} |" if base
                    else "- | - | - |")
        print(f"| {row['clients']} | {row['requests_per_s']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
              f"{row['images_per_batch']:.1f} | {baseline}")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
