"""Where Corral keeps things on this machine (XDG directories via platformdirs)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or platformdirs.user_cache_dir()) / "corral"


def state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or platformdirs.user_state_dir()) / "corral"


def config_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or platformdirs.user_config_dir()) / "corral"


def system_config_dir() -> Path:
    """/etc/corral; CORRAL_SYSTEM_CONFIG_DIR names another directory (tests use their own)."""
    return Path(os.environ.get("CORRAL_SYSTEM_CONFIG_DIR") or "/etc/corral")
