"""Artifacts on disk: atomic writes and diffusers' textual-inversion file format.

Every file is written to a temporary name in its folder and renamed into place, so a run
folder never holds a half-written file, even when a run is killed mid-save.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from compinv.errors import CompinvError

EMBEDDINGS_FILE = "learned_embeds.safetensors"


def ensure_writable_dir(path: str | Path, flag: str) -> Path:
    """Create `path` as a folder or fail with a message naming the flag and the fix."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CompinvError(f"{flag} {path} is a file; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise CompinvError(f"{flag} {path} is not writable ({exc.strerror}); choose another "
                           "folder or fix its permissions") from exc
    return path


@contextmanager
def output_folder(path: str | Path, flag: str) -> Iterator[Path]:
    """`ensure_writable_dir`, removing the folder again if the run fails before writing to it.

    Bad inputs are found after the folder is checked; they must not leave an empty run folder.
    """
    existed = Path(path).exists()
    out = ensure_writable_dir(path, flag)
    try:
        yield out
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return _atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_image(image: Image.Image, path: str | Path) -> Path:
    return _atomic(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """A safetensors file, written atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return _atomic(Path(path), lambda tmp: save_file(tensors, tmp))


def save_embeddings(embeddings: dict[str, torch.Tensor], path: str | Path) -> Path:
    """diffusers' format: one key per concept token, value [num_vectors, dim] in float32."""
    return save_tensors({k: v.float() for k, v in embeddings.items()}, path)


def load_embeddings_file(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CompinvError(f"{path}: not a readable safetensors file ({exc})") from exc


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as flat safetensors entries ("<param index>.<name>"),
    so that resumable runs keep no pickles on disk."""
    return {f"{i}.{name}": value.cpu().contiguous() if torch.is_tensor(value) else torch.tensor(value)
            for i, entry in optimizer.state_dict()["state"].items() for name, value in entry.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of `optimizer_tensors`; param groups (lr etc.) stay as the optimizer has them."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".")
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
