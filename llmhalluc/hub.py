"""The Hugging Face hub, asked once and quickly: a name that is neither a local folder nor reachable fails in
seconds with one line, instead of a minute of download retries."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from llmhalluc.errors import UserError

PROBE_SECONDS = 3.0


def hub_reachable() -> bool:
    """Whether the hub endpoint accepts a TCP connection within a few seconds (False when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False


def check_hub_name(key: str, name: str, kind: str = "model") -> None:
    """Fail fast when `name` is no local folder, not in the local hub cache, and the hub cannot be reached; when
    it is cached and the hub cannot be reached, use the cache (HF_HUB_OFFLINE=1) instead of retrying."""
    if Path(name).exists():
        return
    if _cached(name, kind):
        if not hub_reachable():
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["HF_DATASETS_OFFLINE"] = "1"
        return
    if not hub_reachable():
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else (
                f"it is not in the local cache and the hub ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) "
                "cannot be reached"
            )
        )
        raise UserError(f"{key}: {name!r} is not a local folder, and {why}: download it first or point at a folder")


def _cached(name: str, kind: str) -> bool:
    """Whether the hub cache holds a snapshot of the repository."""
    from huggingface_hub import scan_cache_dir

    try:
        cache = scan_cache_dir()
    except Exception:  # no cache folder yet
        return False
    return any(repo.repo_id == name and repo.repo_type == kind for repo in cache.repos)
