"""Shared fixtures: a tiny open_clip architecture with random weights, and generated image folders.

Nothing here downloads anything: the model is built from a small config, the images are drawn by the tests.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from clipcl.cli import app

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

# Classes that a randomly initialised ViT can separate: each is a distinct dominant colour.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "magenta": (210, 30, 210),
    "cyan": (30, 210, 210),
}


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """clipcl's per-user cache (weights fingerprints, clipcl.fingerprint_cache) in a folder of the test session,
    for this process and the ones it starts: never the user's own."""
    folder = tmp_path_factory.mktemp("user-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIPCL_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "TinyCLIP.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="session")
def tiny_weights(tiny_config: Path) -> Path:
    """Random weights for the tiny model, saved once, so every load gives the same base model."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    open_clip.add_model_config(tiny_config)
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_config.stem)
    path = tiny_config.parent / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def draw(colour: tuple[int, int, int], rng: random.Random, size: int = 40) -> Image.Image:
    """A noisy image of one dominant colour with a random darker square, so no two images are equal."""
    image = Image.new("RGB", (size, size), tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour))
    x, y = rng.randint(0, size // 2), rng.randint(0, size // 2)
    shade = tuple(int(c * 0.6) for c in colour)
    image.paste(shade, (x, y, x + size // 3, y + size // 3))
    return image


def make_task(root: Path, classes: list[str], per_class: int = 14, seed: int = 0, suffix: str = ".png") -> Path:
    """Write ``root/<class>/<i><suffix>`` images for each class (class names are keys of COLOURS)."""
    rng = random.Random(f"{seed}-{root.name}")
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(COLOURS[name], rng).save(folder / f"{i:03d}{suffix}")
    return root


@pytest.fixture
def task_factory(tmp_path: Path) -> Callable[..., Path]:
    def factory(name: str, classes: list[str], **kwargs) -> Path:
        return make_task(tmp_path / "data" / name, classes, **kwargs)

    return factory


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)


FAST = ("--epochs", "3", "--batch-size", "8", "--workers", "0", "--lr", "5e-3")


@pytest.fixture
def workspace(tmp_path: Path, tiny_config: Path, tiny_weights: Path, runner: CliRunner) -> Path:
    ws = tmp_path / "ws"
    result = invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights)
    assert result.exit_code == 0, result.output
    return ws


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes, but for a workspace's ``cache/`` (kept to save work, recomputed
    when missing, never part of the committed state): equal snapshots mean an unchanged workspace."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] != "cache"}


PYTHON = sys.executable


def learn_two_tasks(runner: CliRunner, ws: Path, data: Path, *args: str, second_args: tuple[str, ...] = ()):
    """``add-task`` red/green, then blue/yellow, into ``ws``; both must succeed. Returns both results. (That no task
    rewrites an earlier task's files is checked for every method in test_method_contract.py.)"""
    first = invoke(runner, "add-task", "-w", ws, make_task(data / "a", ["red", "green"]), *args)
    assert first.exit_code == 0, first.output
    second = invoke(runner, "add-task", "-w", ws, make_task(data / "b", ["blue", "yellow"]), *args, *second_args)
    assert second.exit_code == 0, second.output
    return first, second
