"""Whether a model's weights can be had before anything tries to download them.

A pretrained tag (``ViT-B-16`` + ``openai``) or an ``hf-hub:`` id makes open_clip download the weights on first load,
and without a network the Hugging Face client retries for a minute or more before it gives up, mid-way through the
user's first ``add-task``. :func:`check_weights_reachable` answers in seconds instead: weights already in the local
cache are fine; otherwise ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) refuses at once, and one short TCP
connection to the download host tells an offline machine from an online one.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from .errors import ModelError
from .modelspec import HF_HUB_PREFIX, ModelSpec

OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
CONNECT_TIMEOUT_S = 5.0
OPEN_CLIP_URL_CACHE = "~/.cache/clip"  # where open_clip keeps weights downloaded from a plain URL


@dataclass(frozen=True)
class Download:
    """Where open_clip would fetch a model's weights from, and whether they are already cached here."""

    host: str
    port: int
    cached: bool


def offline_setting() -> str | None:
    """The environment variable that puts the Hugging Face client offline, if one is set to a true value."""
    for name in OFFLINE_ENVS:
        if os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}:
            return name
    return None


def _hub_download(repo_id: str, filename: str) -> Download:
    from huggingface_hub import constants, try_to_load_from_cache

    endpoint = urlparse(constants.ENDPOINT)
    cached = isinstance(try_to_load_from_cache(repo_id, filename), str)
    return Download(endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80),
                    cached)


def download_needed(spec: ModelSpec) -> Download | None:
    """What loading ``spec`` would download, or ``None`` when its weights are local (a file, a folder, a random
    initialisation)."""
    if spec.pretrained_sha256 is not None or spec.config is not None:
        return None  # a local weights file, or a custom architecture (which takes only a file)
    if spec.name.startswith(HF_HUB_PREFIX):
        return _hub_download(spec.name[len(HF_HUB_PREFIX):].rstrip("/"), "open_clip_config.json")
    if spec.pretrained is None:
        return None
    from open_clip.pretrained import get_pretrained_cfg, has_hf_hub

    cfg = get_pretrained_cfg(spec.name, spec.pretrained)
    if not cfg or "file" in cfg:
        return None
    if cfg.get("hf_hub") and has_hf_hub():  # open_clip prefers the hub where it has the entry
        repo_id, filename = os.path.split(cfg["hf_hub"])
        return _hub_download(repo_id.rstrip("/") or cfg["hf_hub"], filename or "open_clip_pytorch_model.bin")
    url = urlparse(cfg.get("url", ""))
    if not url.hostname:
        return None
    target = os.path.join(os.path.expanduser(OPEN_CLIP_URL_CACHE), os.path.basename(url.path))
    return Download(url.hostname, url.port or (443 if url.scheme == "https" else 80), os.path.isfile(target))


def can_connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_weights_reachable(spec: ModelSpec) -> None:
    """Refuse in one line, within seconds, weights that would have to be downloaded and cannot be."""
    download = download_needed(spec)
    if download is None or download.cached:
        return
    offline = offline_setting()
    if offline is not None:
        raise ModelError(f"the weights of {spec.describe()} are not in the local cache and {offline} is set: "
                         "run `clipcl init` once online, or pass a weights file with --pretrained")
    if not can_connect(download.host, download.port):
        raise ModelError(f"cannot download the weights of {spec.describe()}: {download.host} is unreachable "
                         "(offline?); run `clipcl init` once online, or pass a weights file with --pretrained")
