"""A damaged, tampered or foreign workspace is refused with an error naming what is wrong, and nothing that lands
in the workspace or is given as a model can run code."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, invoke, make_task, snapshot
from test_bad_input import assert_clean_failure


@pytest.fixture
def trained(workspace: Path, task_factory, runner) -> Path:
    result = invoke(runner, "add-task", "-w", workspace, task_factory("first", ["red", "green"]), *FAST)
    assert result.exit_code == 0, result.output
    return workspace


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # flip one byte in the middle
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])


@pytest.mark.parametrize(
    ("file", "how", "needle"),
    [
        ("tasks/task-001/tensors.safetensors", "flip", "checksum mismatch in"),
        ("tasks/task-001/tensors.safetensors", "truncate", "checksum mismatch in"),
        ("tasks/task-001/task.json", "truncate", "checksum mismatch in"),
        ("manifest.json", "truncate", "corrupt JSON in"),
    ],
)
def test_a_damaged_file_is_named_in_the_error(trained: Path, runner, file: str, how: str, needle: str) -> None:
    _damage(trained / file, how)
    before = snapshot(trained)
    result = invoke(runner, "eval", "-w", trained)
    assert_clean_failure(result, trained, before, needle)
    assert str(trained / file) in result.stderr


def test_a_newer_format_version_is_refused_naming_both_versions(trained: Path, runner) -> None:
    manifest = json.loads((trained / "manifest.json").read_text())
    manifest["format_version"] = 7
    (trained / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(trained)
    result = invoke(runner, "tasks", "-w", trained)
    assert_clean_failure(result, trained, before, "workspace format version 7 is not supported")
    assert "reads version 1" in result.stderr


def test_adapters_are_never_loaded_on_different_base_weights(tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                                             task_factory, runner) -> None:
    import open_clip
    from safetensors.torch import save_file

    weights = tmp_path / "base.safetensors"
    shutil.copy(tiny_weights, weights)
    ws = tmp_path / "ws"
    assert invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", weights).exit_code == 0
    assert invoke(runner, "add-task", "-w", ws, task_factory("a", ["red", "green"]), *FAST).exit_code == 0
    recorded = json.loads((ws / "manifest.json").read_text())["model"]["weights_sha256"]
    assert len(recorded) == 64

    torch.manual_seed(1)  # other weights for the same architecture, in the same file
    save_file({k: v.contiguous() for k, v in open_clip.create_model(tiny_config.stem).state_dict().items()}, weights)
    before = snapshot(ws)
    result = invoke(runner, "predict", "-w", ws, next((tmp_path / "data" / "a" / "red").iterdir()))
    assert_clean_failure(result, ws, before, "weights file changed since the workspace was created")

    # the same check for weights that are not a local file (a tag, the hub): the recorded tensor fingerprint
    manifest = json.loads((ws / "manifest.json").read_text())
    manifest["model"]["weights_sha256"] = "0" * 64
    shutil.copy(tiny_weights, weights)
    manifest["model"]["pretrained_sha256"] = None
    (ws / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(ws)
    result = invoke(runner, "eval", "-w", ws)
    assert_clean_failure(result, ws, before, "now loads different weights than the ones this workspace's adapters")


class _RunsCode:
    """A pickle payload: unpickling it creates a folder (what an attacker's code would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return os.mkdir, (str(self.marker),)


def test_a_pickled_checkpoint_cannot_run_code(tmp_path: Path, tiny_config: Path, runner) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _RunsCode(marker)}, evil)
    ws = tmp_path / "ws"
    result = invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", evil)
    assert_clean_failure(result, None, None, "cannot load")  # init loads the model before it creates anything
    assert not ws.exists()
    assert not marker.exists()


def test_every_torch_load_under_clipcl_is_weights_only(tmp_path: Path, monkeypatch) -> None:
    from clipcl.backbone import _pickle_free_loading

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _RunsCode(marker)}, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # what a user's environment might say
    with _pickle_free_loading(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(evil, weights_only=False)  # even a caller that asks for pickles
    assert not marker.exists()
    import os

    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # the environment is given back as it was


def test_a_full_disk_during_the_commit_keeps_the_previous_state(trained: Path, task_factory, runner,
                                                                monkeypatch) -> None:
    import clipcl.workspace

    before = snapshot(trained)
    real = clipcl.workspace.write_synced

    def disk_full(path: Path, data: bytes) -> None:
        if path.name == "tensors.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(clipcl.workspace, "write_synced", disk_full)
    result = invoke(runner, "add-task", "-w", trained, task_factory("b", ["blue", "yellow"]), *FAST)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert "Traceback" not in result.output
    after = snapshot(trained)
    # only the epoch checkpoint (hidden, for --resume) was added; the committed state is byte-for-byte the same
    assert {k: v for k, v in after.items() if not k.startswith(".resume/")} == before
    monkeypatch.undo()
    listing = invoke(runner, "tasks", "-w", trained, "--json")
    assert [t["name"] for t in json.loads(listing.stdout)["tasks"]] == ["first"]
    resumed = invoke(runner, "add-task", "-w", trained, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert len(json.loads(invoke(runner, "tasks", "-w", trained, "--json").stdout)["tasks"]) == 2


def test_a_decompression_bomb_is_skipped_and_reported(trained: Path, tmp_path: Path, runner) -> None:
    from PIL import Image

    folder = make_task(tmp_path / "bombs", ["blue", "yellow"], per_class=6)
    limit = Image.MAX_IMAGE_PIXELS
    side = int((limit * 1.2) ** 0.5) + 1  # over the warning limit: Pillow's own guard must stay on
    Image.new("1", (side, side)).save(folder / "blue" / "bomb.png", optimize=True)
    result = invoke(runner, "add-task", "-w", trained, folder, *FAST)
    assert result.exit_code == 0, result.output
    assert "skipped blue/bomb.png: DecompressionBomb" in result.stderr
    assert limit == Image.MAX_IMAGE_PIXELS  # unchanged by clipcl
    details = json.loads((trained / "tasks/task-002/task.json").read_text())
    assert details["skipped_files"] == ["blue/bomb.png"]


def test_a_symlink_loop_in_a_dataset_does_not_hang_the_scan(trained: Path, tmp_path: Path, runner) -> None:
    folder = make_task(tmp_path / "loops", ["blue", "yellow"], per_class=6)
    (folder / "blue" / "again").symlink_to(folder / "blue", target_is_directory=True)
    (folder / "yellow" / "up").symlink_to(folder, target_is_directory=True)
    result = invoke(runner, "add-task", "-w", trained, folder, *FAST)
    assert result.exit_code == 0, result.output
    details = json.loads((trained / "tasks/task-002/task.json").read_text())
    assert sum(details["counts"]["train"].values()) + sum(details["counts"]["heldout"].values()) == 12


LOADERS = {("torch", "load"), ("open_clip", "create_model_and_transforms"), ("open_clip", "create_model"),
           ("open_clip", "load_checkpoint"), ("open_clip", "create_model_from_pretrained")}


def _weight_loading_calls(tree) -> list[tuple[object, list[object]]]:
    """Every call in ``tree`` that reads a weights file (torch.load, open_clip's model loaders), with the ``with``
    statements around it."""
    import ast

    found = []

    def visit(node: ast.AST, withs: list[ast.With]) -> None:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in LOADERS:
            found.append((node, withs))
        inner = [*withs, node] if isinstance(node, ast.With) else withs
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, [])
    return found


def test_every_weights_load_in_clipcl_is_pickle_free() -> None:
    """Each call that reads weights either passes ``weights_only=True`` (torch.load) or runs inside
    ``_pickle_free_loading()`` (open_clip's loaders, which call torch.load themselves); and there are such calls to
    check, so the test cannot pass on an empty list."""
    import ast

    import clipcl

    package = Path(clipcl.__file__).parent
    checked = []
    for path in sorted(package.rglob("*.py")):
        for call, withs in _weight_loading_calls(ast.parse(path.read_text())):
            guarded = any(isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", "")
                          == "_pickle_free_loading" for w in withs for item in w.items)
            weights_only = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                               for k in call.keywords)
            checked.append((path.name, call.lineno))
            assert guarded or weights_only, f"{path.name}:{call.lineno} loads weights without the pickle guard"
    assert ("backbone.py" in {name for name, _ in checked}), checked  # open_clip's model loading is among them
