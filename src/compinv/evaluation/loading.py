"""Metric models from a local folder or a hub id, offline-first, on the GPU when there is one.

Evaluation must give the same numbers every time, so a model is looked up in the local folder or
the hub cache first and the hub is only asked when the cache lacks it and the hub is allowed
(`HF_HUB_OFFLINE` unset). When neither has it, the error names the model and the command that
fetches it once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compinv.errors import CompinvError
from compinv.models import _hub_offline


def metric_device() -> torch.device:
    """The first GPU when present: metric models are small next to a diffusion model."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pretrained(loader: Callable[..., Any], name: str, argument: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(name)` from a local folder or the hub cache, then the hub.

    `argument` is the Python argument that named the model; errors name it and the fix.
    """
    try:
        return _load(loader, name, argument, **kwargs)
    except ImportError as exc:  # e.g. DETR's main branch builds its backbone with timm
        raise CompinvError(
            f"`{argument}` {name}: loading it needs a package that is not installed ({exc}). "
            "Install it, or use a copy that does not need it (DETR: `huggingface-cli download "
            "facebook/detr-resnet-50 --revision no_timm --local-dir DIR`, then pass DIR)") from exc


def _load(loader: Callable[..., Any], name: str, argument: str, **kwargs: Any) -> Any:
    path = Path(name).expanduser()
    if path.exists():
        try:
            return loader.from_pretrained(str(path), local_files_only=True, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise CompinvError(f"`{argument}` {name}: cannot load this folder as a "
                               f"{_kind(loader)} ({exc})") from exc
    try:
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        if _hub_offline():
            raise _not_available(name, argument, "HF_HUB_OFFLINE is set") from None
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise _not_available(name, argument, type(exc).__name__) from exc


def _kind(loader: Any) -> str:
    return getattr(loader, "__name__", str(loader))


def _not_available(name: str, argument: str, why: str) -> CompinvError:
    return CompinvError(
        f"`{argument}` {name}: not a local folder and not in the hub cache ({why}); fetch it once "
        f"with `huggingface-cli download {name}` on a machine with internet, or pass the path of a "
        "local copy (a folder saved with save_pretrained)")


def features(output: Any) -> torch.Tensor:
    """The embedding tensor of `get_image_features`/`get_text_features` (transformers 5 returns
    an output object whose `pooler_output` is the projected embedding; 4.x a tensor)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
