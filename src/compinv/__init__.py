"""compinv: compositional inversion for Stable Diffusion (semantic and spatial inversion).

The public API is imported lazily, so `import compinv` (and `compinv --help`) stays instant
while torch and diffusers load only when a function is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "train": "compinv.training",
    "TrainConfig": "compinv.methods.textual_inversion",
    "CustomDiffusionConfig": "compinv.methods.custom_diffusion",
    "DreamBoothConfig": "compinv.methods.dreambooth",
    "TrainResult": "compinv.trainer",
    "METHODS": "compinv.methods",
    "GenerateConfig": "compinv.config",
    "CompinvError": "compinv.errors",
    "train_textual_inversion": "compinv.training",
    "train_custom_diffusion": "compinv.training",
    "train_dreambooth": "compinv.training",
    "load_concepts": "compinv.concepts",
    "inspect_run": "compinv.inspection",
    "attention_shares": "compinv.diagnostics",
    "embedding_report": "compinv.diagnostics",
    "generate": "compinv.generate",
    "load_pipeline": "compinv.models",
    "build_tiny_pipeline": "compinv.models",
    "save_tiny_model": "compinv.models",
    "clip_tokenizer": "compinv.models",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'compinv' has no attribute {name!r}")
