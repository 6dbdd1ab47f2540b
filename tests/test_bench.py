"""`clipcl bench` on a tiny generated split, the split-writing example, and the `finetune` baseline."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, FAST, draw, invoke, make_task

from clipcl import Workspace
from clipcl.data import load_image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def make_split(root: Path, tasks: list[list[str]], train: int = 8, test: int = 4) -> Path:
    for t, classes in enumerate(tasks, start=1):
        make_task(root / f"task-{t}" / "train", classes, per_class=train)
        make_task(root / f"task-{t}" / "test", classes, per_class=test, seed=1)
    return root


@pytest.fixture
def split(tmp_path: Path) -> Path:
    return make_split(tmp_path / "split", [["red", "green"], ["blue", "yellow"]])


def test_bench_compares_methods_and_writes_json(split: Path, tmp_path: Path, tiny_config: Path,
                                                tiny_weights: Path, runner) -> None:
    out = tmp_path / "results.json"
    kept = tmp_path / "kept"
    result = invoke(runner, "bench", split, "--methods", "ncm,zeroshot,finetune,joint", "--model", tiny_config,
                    "--pretrained", tiny_weights, "--epochs", "2", "--batch-size", "8", "--workers", "0",
                    "--out", out, "--workspaces", kept, "--plot", tmp_path / "curves.png", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("ncm", "zeroshot", "finetune", "joint", "Avg", "Forgetting", "train img/s", "passes/img"):
        assert name in result.stdout
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    report = json.loads(out.read_text())
    assert report["tasks"] == ["task-1", "task-2"]
    assert report["settings"]["epochs"] == 2 and report["hardware"]["cpu_count"] >= 1
    rows = {row["method"]: row for row in report["methods"]}
    assert list(rows) == ["ncm", "zeroshot", "finetune", "joint"]
    for row in rows.values():
        assert [len(r) for r in row["matrix"]] == [1, 2]
        assert row["avg"] == pytest.approx(sum(row["accuracy_after_task"]) / 2)
        assert row["last"] == row["accuracy_after_task"][-1]
    assert rows["ncm"]["train_s"] == 0 and rows["ncm"]["train_images_per_s"] is None
    assert all(row["encoder_passes_per_image"] == 1 and row["eval_s"] > 0 for row in rows.values())
    assert rows["finetune"]["train_images_per_s"] > 0
    assert rows["ncm"]["last"] >= 0.9  # distinct colours, class means of any features
    # answering among the image's own task's classes can only help, and a one-task row is the same either way
    for name in ("ncm", "zeroshot", "finetune"):
        within, matrix = rows[name]["within_task_matrix"], rows[name]["matrix"]
        assert [len(r) for r in within] == [1, 2] and within[0] == matrix[0]
        pairs = [pair for rows_ in zip(within, matrix, strict=True) for pair in zip(*rows_, strict=True)]
        assert all(w >= a for w, a in pairs)
        assert rows[name]["within_task_last"] >= rows[name]["last"]
    assert "task given" in result.stdout and rows["joint"]["within_task_matrix"] is None
    # the matrix of each method is the one its kept workspace stored; joint's last row is its plain evaluation
    ncm = Workspace.open(kept / "ncm")
    assert rows["ncm"]["matrix"] == [ncm.task_record(t).accuracy.per_task for t in ncm.tasks]
    joint = json.loads(invoke(runner, "eval", "-w", kept / "joint", "--json", "--workers", "0").stdout)
    assert [t["name"] for t in joint["per_task"]] == ["joint"]
    assert rows["joint"]["last"] == pytest.approx(joint["accuracy"])
    # after task 1, joint answers among task 1's classes only
    workspace = Workspace.open(kept / "joint")
    method = workspace.build_method()
    images, labels = [], []
    for path, label in workspace.task_record(workspace.tasks[0]).heldout_files:
        if method.classes[label] in ("red", "green"):
            images.append(method.backbone.eval_transform(load_image(kept / "joint-data" / path)))
            labels.append(label)
    columns = [method.classes.index(name) for name in ("green", "red")]
    probs = method.predict_proba(torch.stack(images))[:, columns]
    hits = [columns[i] == label for i, label in zip(probs.argmax(dim=1).tolist(), labels, strict=True)]
    assert rows["joint"]["matrix"][0][0] == pytest.approx(sum(hits) / len(hits))


def test_bench_compares_a_method_with_its_ablation(split: Path, tmp_path: Path, tiny_config: Path,
                                                  tiny_weights: Path, runner) -> None:
    out = tmp_path / "ablation.json"
    kept = tmp_path / "kept"
    result = invoke(runner, "bench", split, "--methods", "tppt-v,tppt-v:contrastive_weight=0", "--model",
                    tiny_config, "--pretrained", tiny_weights, "--epochs", "1", "--batch-size", "8", "--workers", "0",
                    "--out", out, "--workspaces", kept)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["methods"]
    assert [row["method"] for row in rows] == ["tppt-v", "tppt-v:contrastive_weight=0"]
    config = json.loads((kept / "tppt-v_contrastive_weight-0" / "manifest.json").read_text())["method"]["config"]
    assert config["contrastive_weight"] == 0.0
    trained = [(kept / name / "tasks/task-001/tensors.safetensors").read_bytes()
               for name in ("tppt-v", "tppt-v_contrastive_weight-0")]
    assert trained[0] != trained[1]  # the option reached training


def test_bench_runs_dma_through_the_same_engine(split: Path, tmp_path: Path, tiny_config: Path,
                                               tiny_weights: Path, runner) -> None:
    out = tmp_path / "dma.json"
    kept = tmp_path / "kept"
    result = invoke(runner, "bench", split, "--methods", "dma", "--model", tiny_config, "--pretrained",
                    tiny_weights, "--epochs", "1", "--batch-size", "8", "--workers", "0", "--out", out,
                    "--workspaces", kept)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())["methods"]
    assert row["method"] == "dma" and len(row["matrix"]) == 2
    report = json.loads(invoke(runner, "eval", "-w", kept / "dma", "--json", "--batch-size", "8").stdout)
    assert row["task_id_accuracy"] == pytest.approx(report["task_id_accuracy"])
    assert row["matrix"][-1] == [t["accuracy"] for t in report["per_task"]]
    # a routed answer has no scores for the tasks it skipped: no task-given accuracy, rather than a wrong one
    assert row["within_task_matrix"] is None and row["within_task_last"] is None
    assert all(t["within_task_accuracy"] is None for t in report["per_task"])


@pytest.mark.parametrize(
    ("change", "args", "needle"),
    [
        ("none", ["--methods", "ncm,nope"], "unknown method 'nope'"),
        ("none", ["--methods", "cma:nope=1"], "method cma has no option 'nope'"),
        ("none", ["--methods", "cma:align_weight"], "expected NAME:KEY=VALUE"),
        ("none", ["--methods", "joint:lr=1"], "joint takes no options"),
        ("gap", [], "lacks task-2"),
        ("no-test", [], "no train/ and test/"),
        ("empty", [], "no task-1"),
        ("none", ["--out", "/nowhere/r.json"], "--out: folder /nowhere does not exist"),
        ("none", ["--out", "/tmp"], "--out: /tmp is a folder"),
        ("none", ["--lr", "-1"], "--lr must be positive"),
        ("twice", [], "are both task 2"),
        ("zero", [], "numbered from task-1"),
        ("shared-class", [], "class 'red' is in both task-1 and task-2"),
        ("none", ["--workspaces", "/etc/passwd"], "exists and is not a folder"),
        ("none", ["--plot", "/nowhere/curves.png"], "--plot: folder /nowhere does not exist"),
        ("none", ["--validation", "0"], "--validation must be a share between 0 and 1"),
    ],
)
def test_bench_refuses_bad_input_before_training(split: Path, tiny_config: Path, tiny_weights: Path, runner,
                                                 change: str, args: list[str], needle: str) -> None:
    import shutil

    if change == "gap":
        (split / "task-2").rename(split / "task-3")
    elif change == "no-test":
        shutil.rmtree(split / "task-2" / "test")
    elif change == "empty":
        for task in split.iterdir():
            shutil.rmtree(task)
    elif change == "twice":
        shutil.copytree(split / "task-2", split / "task-02")
    elif change == "zero":
        shutil.copytree(split / "task-2", split / "task-0")
    elif change == "shared-class":
        shutil.copytree(split / "task-1" / "train" / "red", split / "task-2" / "train" / "red")
    result = invoke(runner, "bench", split, "--model", tiny_config, "--pretrained", tiny_weights, *args)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.output


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_split_writes_the_layout_bench_reads(tmp_path: Path, tiny_config: Path, tiny_weights: Path) -> None:
    make_split_module = _load_example("make_split")
    names = ["red", "green", "blue", "yellow", "magenta", "cyan"]
    rng = random.Random(0)
    train = [(draw(COLOURS[name], rng), label) for label, name in enumerate(names) for _ in range(3)]
    test = [(draw(COLOURS[name], rng), label) for label, name in enumerate(names) for _ in range(2)]
    out = tmp_path / "split"
    tasks = make_split_module.write_split(train, test, names, out, n_tasks=3, seed=1993)
    assert sorted(c for task in tasks for c in task) == sorted(names)
    assert tasks == json.loads((out / "split.json").read_text())["tasks"]
    assert tasks == make_split_module.write_split(train, test, names, tmp_path / "again", n_tasks=3, seed=1993)
    for t, classes in enumerate(tasks, start=1):
        assert sorted(p.name for p in (out / f"task-{t}" / "train").iterdir()) == sorted(classes)
        assert all(len(list((out / f"task-{t}" / "test" / c).glob("*.png"))) == 2 for c in classes)
    from clipcl.bench import split_tasks

    assert [p.name for p in split_tasks(out)] == ["task-1", "task-2", "task-3"]
    with pytest.raises(SystemExit, match="do not split"):
        make_split_module.write_split(train, test, names, tmp_path / "uneven", n_tasks=4)


def test_finetune_trains_one_shared_lora_and_never_rewrites_a_task(workspace: Path, tiny_config: Path,
                                                                   tiny_weights: Path, task_factory, runner,
                                                                   tmp_path: Path) -> None:
    ws = tmp_path / "ft"
    invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights, "--method", "finetune")
    first = invoke(runner, "add-task", "-w", ws, task_factory("a", ["red", "green"]), *FAST)
    assert first.exit_code == 0, first.output
    stored = (ws / "tasks/task-001/tensors.safetensors").read_bytes()
    result = invoke(runner, "add-task", "-w", ws, task_factory("b", ["blue", "yellow"]), *FAST)
    assert result.exit_code == 0, result.output
    assert (ws / "tasks/task-001/tensors.safetensors").read_bytes() == stored
    workspace_ = Workspace.open(ws)
    one, two = (workspace_.task_tensors(t) for t in workspace_.tasks)
    lora_keys = [k for k in one if k.startswith("lora.")]
    assert lora_keys and set(lora_keys) == {k for k in two if k.startswith("lora.")}
    assert any(not (one[k] == two[k]).all() for k in lora_keys)  # the shared LoRA kept training
    assert one["prompt.context"].shape[0] == two["prompt.context"].shape[0] == 2  # prompts of its own classes
    accuracy = workspace_.task_record(workspace_.tasks[1]).accuracy
    assert accuracy.per_task[1] >= 0.8  # the newest task is learned
    method = workspace_.build_method()
    assert method.lora.names == ["shared"] and len(method.classes) == 4


_AUDITED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _AUDITED is not None and event in ("open", "os.listdir", "os.scandir") and args and args[0] is not None:
        _AUDITED.append(str(args[0]) if not isinstance(args[0], int) else "")


def test_bench_validation_holds_out_training_images_and_never_reads_the_test_folders(
        split: Path, tmp_path: Path, tiny_config: Path, tiny_weights: Path, runner) -> None:
    import sys

    global _AUDITED
    sys.addaudithook(_audit)  # every file opened or folder listed in this process, from here on
    out = tmp_path / "val.json"
    kept = tmp_path / "kept"
    _AUDITED = []
    try:
        result = invoke(runner, "bench", split, "--methods", "ncm,joint", "--model", tiny_config, "--pretrained",
                        tiny_weights, "--epochs", "1", "--batch-size", "8", "--workers", "0", "--validation", "0.25",
                        "--out", out, "--workspaces", kept)
    finally:
        touched, _AUDITED = _AUDITED, None
    assert result.exit_code == 0, result.output
    test_dirs = [str((split / f"task-{t}" / "test").resolve()) for t in (1, 2)]
    assert touched and not [p for p in touched if any(p.startswith(d) for d in test_dirs)]
    report = json.loads(out.read_text())
    assert report["evaluated_on"].startswith("validation") and report["settings"]["validation"] == 0.25
    # 8 training images a class: 2 become the class's test set, 6 train; the real test images are nowhere
    ncm = Workspace.open(kept / "ncm")
    for task in ncm.tasks:
        record = ncm.task_record(task)
        assert all(n == 6 for n in record.counts.train.values())
        assert all(n == 2 for n in record.counts.heldout.values())
        held = {Path(record.source.root, rel).resolve() for rel, _ in record.heldout_files}
        assert all("/train/" in str(path) for path in held)
    assert [row["method"] for row in report["methods"]] == ["ncm", "joint"]
    bad = invoke(runner, "bench", split, "--model", tiny_config, "--pretrained", tiny_weights, "--validation", "1")
    assert bad.exit_code == 2 and "--validation must be a share between 0 and 1" in bad.stderr
