"""The frozen features of held-out images are computed once and reused (clipcl.feature_cache).

Each method that declares a frozen part (dma's router input, the image embedding of ncm, lda and zeroshot) answers
exactly as without the cache, and a second evaluation runs only the passes that depend on the tasks. A cache that is
stale (an image changed) or damaged (bytes flipped, a FIFO in its place) is recomputed, never trusted.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import FAST, draw, invoke, make_task
from safetensors.torch import load as load_safetensors
from typer.testing import CliRunner

import clipcl
from clipcl import Workspace
from clipcl.backbone import Backbone
from clipcl.evaluation import heldout_dataset, predict_dataset
from clipcl.feature_cache import FEATURES_DIR, FrozenFeatureCache
from clipcl.methods import get_method_class
from clipcl.runtime import make_accelerator

TASKS = (("warm", ["red", "green"]), ("cool", ["blue", "yellow"]), ("pink", ["magenta", "cyan"]))
METHODS = ("dma", "ncm", "lda", "zeroshot")


@pytest.fixture(scope="module", params=METHODS)
def learned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_config: Path,
            tiny_weights: Path) -> Path:
    """A workspace of the method that learned three tasks (dma routes to 2 of them by default)."""
    runner = CliRunner()
    root = tmp_path_factory.mktemp(f"cache-{request.param}")
    ws = root / "ws"
    result = invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights,
                    "--method", request.param)
    assert result.exit_code == 0, result.output
    for name, classes in TASKS:
        result = invoke(runner, "add-task", "-w", ws, make_task(root / "data" / name, classes, per_class=10), *FAST)
        assert result.exit_code == 0, result.output
    return ws


@contextmanager
def counting(monkeypatch: pytest.MonkeyPatch, method_name: str) -> Iterator[dict[str, int]]:
    """Images through the image encoder (``encoder``) and through the method's frozen features (``frozen``)."""
    counts = {"encoder": 0, "frozen": 0}
    method_class = get_method_class(method_name)
    encode, frozen = Backbone.encode_images, method_class.frozen_features

    def counted_encode(self, images):
        counts["encoder"] += len(images)
        return encode(self, images)

    def counted_frozen(self, images):
        counts["frozen"] += len(images)
        return frozen(self, images)

    with monkeypatch.context() as patch:
        patch.setattr(Backbone, "encode_images", counted_encode)
        patch.setattr(method_class, "frozen_features", counted_frozen)
        yield counts


def _heldout_total(ws: Path) -> int:
    workspace = Workspace.open(ws)
    return sum(workspace.task_record(task).heldout_images for task in workspace.tasks)


def _same_evaluation(one: clipcl.EvalReport, other: clipcl.EvalReport) -> None:
    assert one.evaluation.per_task == other.evaluation.per_task
    assert one.evaluation.task_id_per_task == other.evaluation.task_id_per_task
    assert one.evaluation.encoder_passes_per_image == other.evaluation.encoder_passes_per_image


def test_the_second_evaluation_reuses_the_frozen_pass_and_answers_the_same(learned: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    name = Workspace.open(learned).method_name
    images = _heldout_total(learned)
    adapter_passes = 2 if name == "dma" else 0  # dma's default route: the two likeliest tasks' LoRAs
    shutil.rmtree(learned / "cache", ignore_errors=True)
    with counting(monkeypatch, name) as uncached:
        plain = clipcl.evaluate(learned, batch_size=4, feature_cache=False)
    assert not (learned / "cache").exists()
    with counting(monkeypatch, name) as first:
        cold = clipcl.evaluate(learned, batch_size=4)
    with counting(monkeypatch, name) as second:
        warm = clipcl.evaluate(learned, batch_size=4)
    assert uncached == first == {"encoder": (1 + adapter_passes) * images, "frozen": images}
    assert second == {"encoder": adapter_passes * images, "frozen": 0}  # the K adapter passes only
    assert len(list((learned / FEATURES_DIR).glob("task-*.safetensors"))) == len(TASKS)
    _same_evaluation(plain, cold)
    _same_evaluation(plain, warm)
    # what add-task stored after the last task (its evaluation kept and reused the cache too) is what eval finds
    stored = Workspace.open(learned).task_record(Workspace.open(learned).tasks[-1]).accuracy
    assert warm.evaluation.per_task == stored.per_task


def test_probabilities_with_and_without_the_cache(learned: Path) -> None:
    workspace = Workspace.open(learned)
    method = workspace.build_method()
    accelerator = make_accelerator("fp32")
    cache = FrozenFeatureCache(learned.parent / "probabilities-cache")
    for task in workspace.tasks:
        dataset = heldout_dataset(method, task.info, workspace.task_record(task))
        plain = predict_dataset(method, dataset, accelerator, 3, 0)
        for _ in ("computed and kept", "read back"):
            cached = predict_dataset(method, dataset, accelerator, 3, 0, cache=cache, cache_name="t")
            assert torch.equal(cached.probs.argmax(dim=1), plain.probs.argmax(dim=1))
            torch.testing.assert_close(cached.probs, plain.probs, rtol=1e-5, atol=1e-6)
            assert torch.equal(cached.encoder_passes, plain.encoder_passes)
            if plain.task_scores is not None:
                torch.testing.assert_close(cached.task_scores, plain.task_scores, rtol=1e-5, atol=1e-6)


def test_add_task_encodes_only_the_new_tasks_frozen_features(tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                                             monkeypatch: pytest.MonkeyPatch, runner) -> None:
    ws = tmp_path / "ws"
    assert invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights).exit_code == 0
    first = make_task(tmp_path / "data" / "warm", ["red", "green"], per_class=10)
    assert invoke(runner, "add-task", "-w", ws, first, *FAST).exit_code == 0
    kept = sorted((ws / FEATURES_DIR).iterdir())
    assert [p.name[:9] for p in kept] == ["task-001-"]
    with counting(monkeypatch, "dma") as counts:
        report = clipcl.add_task(ws, make_task(tmp_path / "data" / "cool", ["blue", "yellow"], per_class=10),
                                 clipcl.TrainOptions(epochs=1, batch_size=8, workers=0))
    assert counts["frozen"] == report.record.heldout_images  # task 1's came from the cache
    assert sorted(p.name for p in (ws / FEATURES_DIR).iterdir())[0] == kept[0].name  # a writer leaves cache/ alone
    assert invoke(runner, "tasks", "-w", ws).exit_code == 0


def _one_cache_file(ws: Path, task: int) -> Path:
    (found,) = (ws / FEATURES_DIR).glob(f"task-{task:03d}-*.safetensors")
    return found


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated", "fifo", "not safetensors"])
def test_a_damaged_cache_is_recomputed(damage: str, learned: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = Workspace.open(learned).method_name
    baseline = clipcl.evaluate(learned, batch_size=4)  # the cache is complete now
    path = _one_cache_file(learned, 2)
    data = path.read_bytes()
    path.unlink()
    if damage == "flipped bytes":
        path.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with counting(monkeypatch, name) as counts:
        again = clipcl.evaluate(learned, batch_size=4)
    assert counts["frozen"] == Workspace.open(learned).task_record(Workspace.open(learned).tasks[1]).heldout_images
    _same_evaluation(baseline, again)
    assert path.is_file()  # replaced by a sound copy
    torch.testing.assert_close(load_safetensors(path.read_bytes()), load_safetensors(data))


def test_a_changed_image_is_encoded_again(learned: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    workspace = Workspace.open(learned)
    name = workspace.method_name
    clipcl.evaluate(learned, batch_size=4)
    old = _one_cache_file(learned, 1)
    record = workspace.task_record(workspace.tasks[0])
    relpath, _ = record.heldout_files[0]
    image = Path(record.source.root) / relpath
    stat = image.stat()
    draw((200, 40, 40), random.Random(99)).save(image)  # another picture...
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...with the old modification time
    with counting(monkeypatch, name) as counts:
        clipcl.evaluate(learned, batch_size=4)
    assert counts["frozen"] == record.heldout_images
    assert not old.exists() and _one_cache_file(learned, 1) != old  # the stale copy is gone, the new one kept


def test_a_cache_made_with_other_weights_is_not_used(learned: Path, tmp_path: Path) -> None:
    workspace = Workspace.open(learned)
    method = workspace.build_method()
    accelerator = make_accelerator("fp32")
    task = workspace.tasks[0]
    dataset = heldout_dataset(method, task.info, workspace.task_record(task))
    cache = FrozenFeatureCache(tmp_path / "features")
    entry = cache.entry(method, dataset, accelerator, "task-001")
    assert entry is not None and cache.load(entry) is None
    assert cache.store(entry, torch.ones(entry.count, 32)) and cache.load(entry) is not None
    method.backbone.weights_fingerprint = "0" * 64
    other = cache.entry(method, dataset, accelerator, "task-001")
    assert other is not None and other.setting != entry.setting and cache.load(other) is None
    assert not cache.store(entry, torch.full((entry.count, 32), float("nan")))  # nothing non-finite is kept


def test_two_processes_read_and_fill_the_cache(workspace: Path, task_factory, runner) -> None:
    """Under torchrun each process predicts its share: the features computed are gathered and kept by the main
    process, and kept ones are used only when every process found them."""
    import json
    import subprocess

    from conftest import PYTHON

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}

    def two_processes(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "clipcl.cli",
                               *args], capture_output=True, text=True, env=env, timeout=300)

    assert invoke(runner, "add-task", "-w", workspace, task_factory("a", ["red", "green"]), *FAST).exit_code == 0
    result = two_processes("add-task", "-w", str(workspace), str(task_factory("b", ["blue", "yellow"])), *FAST)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name[:9] for p in (workspace / FEATURES_DIR).glob("*.safetensors")) == ["task-001-", "task-002-"]
    plain = clipcl.evaluate(workspace, batch_size=4, feature_cache=False)
    kept = {p: p.stat().st_mtime_ns for p in (workspace / FEATURES_DIR).iterdir()}
    result = two_processes("eval", "-w", str(workspace), "--json", "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    assert {p: p.stat().st_mtime_ns for p in (workspace / FEATURES_DIR).iterdir()} == kept  # all found, none redone
    report = json.loads(result.stdout)
    assert [t["accuracy"] for t in report["per_task"]] == plain.evaluation.per_task
    assert report["task_id_accuracy"] == plain.evaluation.task_id_accuracy
    stored = Workspace.open(workspace).task_record(Workspace.open(workspace).tasks[1]).accuracy
    assert stored.per_task == plain.evaluation.per_task
