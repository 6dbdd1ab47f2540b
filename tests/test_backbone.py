"""Model loading through open_clip and the two adaptations clipcl makes to its modules."""

from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import invoke
from safetensors.torch import save_file

from clipcl.backbone import (
    ModelSpec,
    context_tokens,
    encode_text_with_context,
    linearize_attention,
    load_backbone,
    resolve_model_spec,
)
from clipcl.errors import ModelError
from clipcl.methods import TaskInfo
from clipcl.methods.dma import DMA, DMAConfig


@pytest.fixture
def backbone(tiny_config: Path):
    return load_backbone(resolve_model_spec(str(tiny_config), None, allow_random_weights=True), tiny_config.parent)


def test_linear_attention_computes_what_multihead_attention_did(backbone) -> None:
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    expected = backbone.model.encode_image(images)
    assert linearize_attention(backbone.model.visual) == 2
    torch.testing.assert_close(backbone.model.encode_image(images), expected, rtol=1e-5, atol=1e-5)


def test_masked_text_attention_is_preserved(backbone) -> None:
    tokens = backbone.tokenize(["a photo of a dog.", "a cat"])
    model = copy.deepcopy(backbone.model)
    expected = model.encode_text(tokens)
    linearize_attention(model.transformer)
    torch.testing.assert_close(model.encode_text(tokens), expected, rtol=1e-5, atol=1e-5)


def test_template_context_reproduces_zero_shot_text_features(backbone) -> None:
    phrase_tokens = backbone.tokenize(["a photo of a"])[0]
    context = backbone.token_embedding()(phrase_tokens[1:5]).detach()
    features = encode_text_with_context(backbone, context_tokens(backbone, ["dog", "traffic light"], 4), context)
    torch.testing.assert_close(features, backbone.encode_texts(["a photo of a dog.", "a photo of a traffic light."]))


def test_fresh_dma_task_reproduces_zero_shot_logits(backbone) -> None:
    """Zero-initialised LoRA and template-initialised prompts give zero-shot CLIP's logits (docs/methods.md)."""
    images = torch.randn(4, 3, 32, 32)
    classes = ["dog", "cat", "bird"]
    zero_shot = backbone.logit_scale() * backbone.encode_images(images) @ backbone.encode_texts(
        [f"a photo of a {c}." for c in classes]).T
    method = DMA(backbone, DMAConfig(context_tokens=4))
    task = TaskInfo(1, tuple(classes), 0)
    method.begin(task)
    method.finish([(images, torch.tensor([0, 1, 2, 0]))])
    features = method.backbone.encode_images(images)  # the task's LoRA is the active one
    logits = method.backbone.logit_scale() * features @ method.prompts.features(method.tasks).T
    torch.testing.assert_close(logits, zero_shot, rtol=1e-4, atol=1e-4)
    # with one task, the router's vote is the task's own softmax: zero-shot CLIP's probabilities
    method.config.router = "mahalanobis"
    torch.testing.assert_close(method.predict_proba(images), zero_shot.softmax(dim=-1), rtol=1e-4, atol=1e-5)


def test_local_weights_load_as_safetensors_and_as_pickle_free_pt(tmp_path: Path, tiny_config: Path) -> None:
    reference = load_backbone(resolve_model_spec(str(tiny_config), None, allow_random_weights=True), tiny_config.parent)
    state = {k: v.contiguous() for k, v in reference.model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    images = torch.randn(2, 3, 32, 32)
    for name in ("w.safetensors", "w.pt"):
        spec = resolve_model_spec(str(tiny_config), str(tmp_path / name))
        assert spec.pretrained_sha256 is not None
        loaded = load_backbone(spec, tiny_config.parent)
        torch.testing.assert_close(loaded.encode_images(images), reference.encode_images(images))


def test_pickled_code_in_a_pt_file_is_not_executed(tmp_path: Path, tiny_config: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"weights": Payload()}, tmp_path / "evil.pt")
    spec = resolve_model_spec(str(tiny_config), str(tmp_path / "evil.pt"))
    with pytest.raises(ModelError, match="cannot load"):
        load_backbone(spec, tiny_config.parent)
    assert not marker.exists()


def test_changed_weights_file_is_refused(tmp_path: Path, tiny_config: Path) -> None:
    reference = load_backbone(resolve_model_spec(str(tiny_config), None, allow_random_weights=True), tiny_config.parent)
    save_file({k: v.contiguous() for k, v in reference.model.state_dict().items()}, tmp_path / "w.safetensors")
    spec = resolve_model_spec(str(tiny_config), str(tmp_path / "w.safetensors"))
    (tmp_path / "w.safetensors").write_bytes(b"different")
    with pytest.raises(ModelError, match="changed since the workspace was created"):
        load_backbone(spec, tiny_config.parent)


def test_named_models_and_tags_are_checked_without_downloading() -> None:
    assert resolve_model_spec("ViT-B-16", "openai") == ModelSpec("ViT-B-16", "openai")
    assert resolve_model_spec("hf-hub:timm/ViT-B-16-SigLIP", None).name == "hf-hub:timm/ViT-B-16-SigLIP"
    with pytest.raises(ModelError, match="drop --pretrained"):
        resolve_model_spec("hf-hub:timm/ViT-B-16-SigLIP", "openai")
    assert "ViT-B-16" in open_clip.list_models()


def test_workspace_keeps_its_own_copy_of_a_custom_config(tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                                         runner) -> None:
    config = tmp_path / "MovedCLIP.json"
    config.write_text(tiny_config.read_text())
    invoke(runner, "init", "-w", tmp_path / "ws", "--model", config, "--pretrained", tiny_weights)
    config.unlink()
    assert (tmp_path / "ws" / "model" / "MovedCLIP.json").is_file()
    from clipcl import Workspace

    method = Workspace.open(tmp_path / "ws").build_method()
    assert method.backbone.spec.name == "MovedCLIP"


def test_lora_dropout_is_active_in_training_while_the_base_stays_in_eval_mode(backbone) -> None:
    method = DMA(backbone, DMAConfig(lora_dropout=0.5))
    method.begin(TaskInfo(1, ("a", "b"), 0))
    method.train()
    modes = {name: m.training for name, m in method.clip.visual.named_modules()}
    assert any(mode for name, mode in modes.items() if "lora_dropout" in name)
    assert not modes["transformer.resblocks.0.mlp"] and not modes["transformer.resblocks.0.attn.q_proj.base_layer"]
    method.eval()
    assert not any(m.training for m in method.clip.visual.modules())
