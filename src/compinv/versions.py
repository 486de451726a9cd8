"""Library versions recorded in every run's config, so results can be reproduced."""

from __future__ import annotations

import platform
from importlib import metadata

_PACKAGES = ("compinv", "torch", "diffusers", "transformers", "accelerate", "safetensors", "peft")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
