"""How a workspace names its base model (:class:`ModelSpec`), and the checks on a ``--model``/``--pretrained`` pair.

Kept apart from :mod:`clipcl.backbone` so that reading a workspace (``clipcl tasks``) needs neither torch nor
open_clip; open_clip is imported only to check a name against its registry.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError
from .reading import read_json_bounded, regular_file_problem, sha256_of_file

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the same base model in another process.

    ``config`` holds the model-config JSON's content for custom architectures; ``pretrained_sha256`` fingerprints a
    local weights file so that adapters are never loaded on top of different weights.
    """

    name: str
    pretrained: str | None = None
    pretrained_sha256: str | None = None
    config: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**{k: data.get(k) for k in ("name", "pretrained", "pretrained_sha256", "config")})

    def describe(self) -> str:
        if self.pretrained is None:
            return self.name
        return f"{self.name} ({Path(self.pretrained).name if self.pretrained_sha256 else self.pretrained})"


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.lower().endswith((*WEIGHT_SUFFIXES, ".json"))


def resolve_model_spec(model: str, pretrained: str | None, allow_random_weights: bool = False) -> ModelSpec:
    """Check a ``--model``/``--pretrained`` pair without loading weights, and pin it down as a :class:`ModelSpec`.

    A model without pretrained weights is refused unless ``allow_random_weights``: open_clip would initialise it
    randomly on every load, so adapters stored on top of it could never be used again.
    """
    config = None
    if model.lower().endswith(".json"):
        path = Path(model).expanduser()
        problem = regular_file_problem(path)
        if problem is not None:
            raise ModelError(f"model config not found: {path}" if problem == "missing"
                             else f"cannot read model config {path}: {problem}")
        try:
            config = read_json_bounded(path)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read model config {path}: {exc}") from exc
        if not isinstance(config, dict) or not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ModelError(f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        name = path.stem
    elif model.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        name = model
        if pretrained is not None:
            raise ModelError(f"{model} carries its own weights: drop --pretrained")
    else:
        name = model
        import open_clip  # only for a model named by open_clip: seconds to import

        known = open_clip.list_models()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (see open_clip.list_models())"
            raise ModelError(f"unknown model {name!r}{hint}")

    sha = None
    if pretrained is not None and (Path(pretrained).expanduser().exists() or _looks_like_path(pretrained)):
        path = Path(pretrained).expanduser()
        problem = regular_file_problem(path)
        if problem is not None:
            raise ModelError(f"pretrained weights file not found: {path}" if problem == "missing"
                             else f"cannot use the pretrained weights {path}: {problem}")
        pretrained = str(path.resolve())
        sha = sha256_of_file(path)
    elif pretrained is not None and config is None:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            offered = ", ".join(tags) if tags else "none; pass a weights file"
            raise ModelError(f"unknown pretrained tag {pretrained!r} for {name} (known: {offered})")
    elif pretrained is not None:
        raise ModelError(f"a custom model config takes a weights file for --pretrained, not the tag {pretrained!r}")
    elif not name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)) and not allow_random_weights:
        raise ModelError(f"--pretrained is required for {name}: a tag such as openai, or a weights file")
    return ModelSpec(name=name, pretrained=pretrained, pretrained_sha256=sha, config=config)
