"""Where localllm keeps things: one function per path, flag > environment > default."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CHECKOUT_MODELS", "ENV_CACHE", "ENV_HOME", "cache_root", "state_root", "store_root"]

ENV_HOME = "LOCALLLM_HOME"
ENV_CACHE = "LOCALLLM_CACHE"
PACKAGE_DIR = Path(__file__).resolve().parent
# A checkout keeps its models next to the package (models/catalog.toml marks it).
CHECKOUT_MODELS = PACKAGE_DIR.parent / "models"


def store_root(override: str | os.PathLike[str] | None = None) -> Path:
    """Where models live: flag > $LOCALLLM_HOME > the checkout's models/ > ~/.local/share."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    if (CHECKOUT_MODELS / "catalog.toml").is_file():
        return CHECKOUT_MODELS
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "localllm" / "models"


def cache_root() -> Path:
    """Where measured facts are cached (memory bandwidth, ...): $LOCALLLM_CACHE or XDG."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "localllm"


def state_root() -> Path:
    """Where state worth keeping across runs lives (chat sessions): $XDG_STATE_HOME/localllm."""
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "localllm"
