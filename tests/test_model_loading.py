"""Loading a base model does no avoidable work and trusts nothing stale: a second load of the same weights file
hashes nothing, a changed file is always hashed again (clipcl.fingerprint_cache), and a model whose checkpoint
overwrites every tensor is not filled with random values first (the same weights as open_clip's own load)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, invoke

import clipcl.backbone
import clipcl.fingerprint_cache
from clipcl.backbone import ModelSpec, load_backbone, resolve_model_spec
from clipcl.errors import ModelError
from clipcl.fingerprint_cache import FingerprintCache


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the weights file was hashed (``file``) and the loaded tensors were fingerprinted (``tensors``)."""
    counts = {"file": 0, "tensors": 0}
    file_sha, fingerprint = clipcl.backbone.sha256_of_file, clipcl.backbone.weights_fingerprint

    def counted_file_sha(*args, **kwargs):
        counts["file"] += 1
        return file_sha(*args, **kwargs)

    def counted_fingerprint(model):
        counts["tensors"] += 1
        return fingerprint(model)

    monkeypatch.setattr(clipcl.backbone, "sha256_of_file", counted_file_sha)
    monkeypatch.setattr(clipcl.backbone, "weights_fingerprint", counted_fingerprint)
    return counts


def _taken(counts: dict[str, int]) -> dict[str, int]:
    """The counts so far, set back to zero."""
    taken = dict(counts)
    counts.update(dict.fromkeys(counts, 0))
    return taken


def _other_weights(tiny_config: Path, path: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    open_clip.add_model_config(tiny_config)
    torch.manual_seed(1)  # other weights for the same architecture: a file of the same size
    save_file({k: v.contiguous() for k, v in open_clip.create_model(tiny_config.stem).state_dict().items()}, path)


def test_a_second_load_hashes_nothing_and_a_changed_file_is_hashed_again(
        tmp_path: Path, tiny_config: Path, tiny_weights: Path, hashes: dict[str, int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clipcl.fingerprint_cache, "RACY_SECONDS", 0.0)
    weights = tmp_path / "base.safetensors"
    shutil.copy(tiny_weights, weights)
    spec = resolve_model_spec(str(tiny_config), str(weights))
    cache = FingerprintCache(tmp_path / "cache" / "fingerprints.json")
    first = load_backbone(spec, tiny_config.parent, fingerprint_cache=cache)
    assert _taken(hashes) == {"file": 1, "tensors": 1}
    second = load_backbone(spec, tiny_config.parent, fingerprint_cache=cache)
    assert _taken(hashes) == {"file": 0, "tensors": 0}
    assert second.weights_fingerprint == first.weights_fingerprint

    stat = weights.stat()
    _other_weights(tiny_config, weights)
    assert weights.stat().st_size == stat.st_size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old size and modification time
    with pytest.raises(ModelError, match="changed since the workspace was created"):
        load_backbone(spec, tiny_config.parent, fingerprint_cache=cache)
    assert _taken(hashes)["file"] == 1

    # the same for the tensors' fingerprint, which is all there is to check for weights that are not a local file
    unpinned = ModelSpec(spec.name, spec.pretrained, None, spec.config)
    changed = load_backbone(unpinned, tiny_config.parent, fingerprint_cache=cache)
    assert _taken(hashes) == {"file": 0, "tensors": 1}
    assert changed.weights_fingerprint != first.weights_fingerprint
    again = load_backbone(unpinned, tiny_config.parent, fingerprint_cache=cache)
    assert _taken(hashes) == {"file": 0, "tensors": 0} and again.weights_fingerprint == changed.weights_fingerprint
    shutil.copy(tiny_weights, weights)  # back to the first weights: hashed again, and found to be those
    assert load_backbone(spec, tiny_config.parent, fingerprint_cache=cache).weights_fingerprint == \
        first.weights_fingerprint
    assert _taken(hashes) == {"file": 1, "tensors": 1}


def test_a_file_written_just_now_is_not_remembered(tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                                   hashes: dict[str, int]) -> None:
    """Timestamps are coarse: a file changed within RACY_SECONDS could change again without its change time moving."""
    weights = tmp_path / "base.safetensors"
    shutil.copy(tiny_weights, weights)
    spec = resolve_model_spec(str(tiny_config), str(weights))
    cache = FingerprintCache(tmp_path / "fingerprints.json")
    for _ in range(2):
        load_backbone(spec, tiny_config.parent, fingerprint_cache=cache)
        assert _taken(hashes) == {"file": 1, "tensors": 1}
    assert not cache.path.exists()


@pytest.mark.parametrize("damage", ["garbage", "fifo", "folder", "wrong format"])
def test_a_damaged_cache_is_ignored(damage: str, tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                    hashes: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clipcl.fingerprint_cache, "RACY_SECONDS", 0.0)
    spec = resolve_model_spec(str(tiny_config), str(tiny_weights))
    path = tmp_path / "fingerprints.json"
    if damage == "garbage":
        path.write_bytes(b"\xff{{{ not json")
    elif damage == "fifo":
        os.mkfifo(path)
    elif damage == "folder":
        path.mkdir()
    else:
        path.write_text(json.dumps({"format": "something else", "files": {str(tiny_weights.resolve()): "x"}}))
    cache = FingerprintCache(path)
    expected = load_backbone(spec, tiny_config.parent, fingerprint_cache=FingerprintCache(None)).weights_fingerprint
    _taken(hashes)
    assert load_backbone(spec, tiny_config.parent, fingerprint_cache=cache).weights_fingerprint == expected
    assert _taken(hashes) == {"file": 1, "tensors": 1}
    if damage != "folder":  # replaced by a sound file, used by the next load
        assert load_backbone(spec, tiny_config.parent, fingerprint_cache=cache).weights_fingerprint == expected
        assert _taken(hashes) == {"file": 0, "tensors": 0}


def test_predict_in_a_new_process_reuses_the_fingerprints(workspace: Path, task_factory, runner, user_cache: Path,
                                                          hashes: dict[str, int],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clipcl.fingerprint_cache, "RACY_SECONDS", 0.0)
    folder = task_factory("a", ["red", "green"])
    assert invoke(runner, "add-task", "-w", workspace, folder, *FAST).exit_code == 0
    _taken(hashes)
    image = next((folder / "red").iterdir())
    for _ in range(2):
        result = invoke(runner, "predict", "-w", workspace, image, "--json")
        assert result.exit_code == 0, result.output
    assert _taken(hashes) == {"file": 0, "tensors": 0}  # init and add-task left them in the user's cache
    assert (user_cache / clipcl.fingerprint_cache.FILE_NAME).is_file()
    monkeypatch.setenv(clipcl.fingerprint_cache.CACHE_ENV, "")  # an empty CLIPCL_CACHE_DIR turns the cache off
    assert invoke(runner, "predict", "-w", workspace, image).exit_code == 0
    assert _taken(hashes) == {"file": 1, "tensors": 1}


def test_a_checkpointed_model_skips_random_initialisation_and_loads_the_same_weights(
        tiny_config: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip

    spec = resolve_model_spec(str(tiny_config), str(tiny_weights))
    originals = {name: getattr(torch.nn.init, name) for name in clipcl.backbone.INIT_FUNCTIONS
                 if hasattr(torch.nn.init, name)}
    drawn: list[str] = []
    normal = torch.nn.init.normal_

    def counted_normal(tensor, *args, **kwargs):
        drawn.append("normal_")
        return normal(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", counted_normal)
    originals["normal_"] = counted_normal
    loaded = load_backbone(spec, tiny_config.parent, fingerprint_cache=FingerprintCache(None))
    assert drawn == []  # nothing drawn for values the checkpoint replaces
    assert {name: getattr(torch.nn.init, name) for name in originals} == originals  # given back
    open_clip.add_model_config(tiny_config)
    reference = open_clip.create_model(tiny_config.stem, pretrained=str(tiny_weights)).state_dict()
    assert drawn  # open_clip's own load draws them
    state = loaded.model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


def test_a_model_not_loaded_whole_is_built_again_initialised(tiny_config: Path, tiny_weights: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip

    spec = resolve_model_spec(str(tiny_config), str(tiny_weights))
    skipped: list[bool] = []  # per model creation: was random initialisation skipped?
    create, normal = open_clip.create_model_and_transforms, torch.nn.init.normal_

    def counted_create(*args, **kwargs):
        skipped.append(torch.nn.init.normal_ is not normal)
        return create(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", counted_create)
    monkeypatch.setattr(clipcl.backbone, "_whole_checkpoint", lambda read: None)  # as if loaded some other way
    loaded = load_backbone(spec, tiny_config.parent, fingerprint_cache=FingerprintCache(None))
    assert skipped == [True, False]
    reference = load_backbone(spec, tiny_config.parent, fingerprint_cache=FingerprintCache(None))
    assert loaded.weights_fingerprint == reference.weights_fingerprint


def test_a_model_without_weights_is_still_initialised(tiny_config: Path) -> None:
    import json

    spec = ModelSpec(tiny_config.stem, None, None, json.loads(tiny_config.read_text()))
    model = load_backbone(spec, tiny_config.parent, fingerprint_cache=FingerprintCache(None)).model
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    assert weights and all(float(w.std()) > 0 and bool(torch.isfinite(w).all()) for w in weights)
