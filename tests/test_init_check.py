"""`clipcl init` loads the model before it creates anything: a model that cannot be loaded, or weights that cannot be
downloaded, are refused in one line (within seconds when offline), and no workspace is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import invoke


def init_in_subprocess(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `clipcl init` with an empty model cache: the Hugging Face client reads its settings at import."""
    cache = tmp_path / "hf-home"
    full_env = {**os.environ, "HF_HOME": str(cache), "HOME": str(tmp_path), **env}
    full_env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "clipcl", "init", "-w", str(tmp_path / "ws"), *args],
                          capture_output=True, text=True, timeout=300, env=full_env)


def assert_refused(result: subprocess.CompletedProcess, tmp_path: Path, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("model", [("--model", "ViT-B-16", "--pretrained", "openai"),
                                   ("--model", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")],
                         ids=["tag", "hf-hub"])
def test_offline_without_cached_weights_is_refused_at_once(tmp_path: Path, model: tuple[str, ...]) -> None:
    result = init_in_subprocess(tmp_path, *model, env={"HF_HUB_OFFLINE": "1"})
    assert_refused(result, tmp_path, "not in the local cache and HF_HUB_OFFLINE is set")


def test_an_unreachable_hub_is_refused_in_one_line(tmp_path: Path) -> None:
    """Port 9 on loopback refuses connections: the stand-in for a machine without a network."""
    result = init_in_subprocess(tmp_path, "--model", "ViT-B-16", "--pretrained", "openai",
                                env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})
    assert_refused(result, tmp_path, "127.0.0.1 is unreachable")


def test_weights_that_do_not_load_are_refused_before_the_workspace_exists(tmp_path: Path, tiny_config: Path,
                                                                         runner) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    result = invoke(runner, "init", "-w", tmp_path / "ws", "--model", tiny_config, "--pretrained", broken)
    assert result.exit_code == 2
    assert "cannot load" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ws").exists()


def test_init_records_the_weights_fingerprint(tmp_path: Path, tiny_config: Path, tiny_weights: Path, runner) -> None:
    """The fingerprint is what a later load is checked against, so adapters never land on other weights."""
    ws = tmp_path / "ws"
    result = invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights)
    assert result.exit_code == 0, result.output
    from clipcl import Workspace, load_backbone

    manifest = json.loads((ws / "manifest.json").read_text())
    loaded = load_backbone(Workspace.open(ws).model_spec, ws / "model")
    assert manifest["model"]["weights_sha256"] == loaded.weights_fingerprint
