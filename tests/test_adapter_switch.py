"""dma switches its tasks' LoRAs cheaply while predicting (ImageLoRA.select) and answers exactly as with peft's own
switch, leaving peft's state (active adapter, what trains) as it found it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST, invoke, make_task
from typer.testing import CliRunner

from clipcl import Workspace
from clipcl.evaluation import heldout_dataset
from clipcl.methods.components import ImageLoRA


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path, tiny_weights: Path) -> Path:
    runner = CliRunner()
    root = tmp_path_factory.mktemp("switch")
    ws = root / "ws"
    assert invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights).exit_code == 0
    for name, classes in (("warm", ["red", "green"]), ("cool", ["blue", "yellow"]), ("pink", ["magenta", "cyan"])):
        result = invoke(runner, "add-task", "-w", ws, make_task(root / "data" / name, classes, per_class=8), *FAST,
                        "--no-eval")
        assert result.exit_code == 0, result.output
    return ws


def _state(method) -> tuple[object, dict[str, bool]]:
    peft = method.lora.peft
    return peft.base_model.active_adapter, {n: p.requires_grad for n, p in peft.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("route", [1, 2, "all"])
def test_the_cheap_switch_answers_as_peft_switching(three_tasks: Path, route, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    workspace = Workspace.open(three_tasks)
    method = workspace.build_method()
    images = torch.stack([heldout_dataset(method, t.info, workspace.task_record(t))[i][0]
                          for t in workspace.tasks for i in range(2)])
    before = _state(method)
    selects: list[str] = []
    select = ImageLoRA.select

    def counted_select(self, name):
        selects.append(name)
        return select(self, name)

    with monkeypatch.context() as patch:
        patch.setattr(ImageLoRA, "select", counted_select)
        cheap = method.predict(images, route=route)
    assert selects and _state(method) == before  # given back as it was
    assert method.lora._layers  # the cheap switch, not its fallback to peft's
    with monkeypatch.context() as patch:
        patch.setattr(ImageLoRA, "select", ImageLoRA.activate)  # peft's own switch, every time
        full = method.predict(images, route=route)
    assert torch.equal(cheap.probs, full.probs) and torch.equal(cheap.task_scores, full.task_scores)
    assert _state(method) == before
