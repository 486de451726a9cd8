"""Artifacts on disk: atomic files and folders, checkpoints, diffusers' embedding format.

Every file is written to a temporary name in its folder and renamed into place, and every
folder (a method's artifact, a checkpoint) is built under a staging name and renamed into
place once complete (`staged_folder`), so a run folder never holds a half-written file or
folder, even when a run is killed mid-save.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from compinv.errors import CompinvError

log = logging.getLogger("compinv")

EMBEDDINGS_FILE = "learned_embeds.safetensors"


def ensure_writable_dir(path: str | Path, argument: str) -> Path:
    """Create `path` as a folder or fail with a message naming the argument and the fix."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CompinvError(f"`{argument}` {path} is a file; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise CompinvError(f"`{argument}` {path} is not writable ({exc.strerror}); choose another "
                           "folder or fix its permissions") from exc
    return path


@contextmanager
def output_folder(path: str | Path, argument: str = "out") -> Iterator[Path]:
    """`ensure_writable_dir`, removing the folder again if the run fails before writing to it.

    Bad inputs are found after the folder is checked; they must not leave an empty run folder.
    """
    existed = Path(path).exists()
    out = ensure_writable_dir(path, argument)
    try:
        yield out
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files get the permissions the user's umask gives a new file (mkstemp alone makes them 0600).
FILE_MODE = 0o666 & ~_umask()


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
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


# ---- folders: staged, then renamed into place ------------------------------------------------
def staging_path(path: Path) -> Path:
    """The hidden name a folder is built under before it replaces `path`."""
    return path.with_name(f".{path.name}.partial")


def commit_staged(staging: Path, path: Path) -> None:
    """Move a complete staging folder to `path`; `path` is always old-complete or new-complete.

    The previous version is renamed away first and deleted after.
    """
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    staging.rename(path)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_folder(path: Path) -> Iterator[Path]:
    """Write a folder artifact under its staging name; it appears at `path` only once complete."""
    staging = staging_path(path)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        commit_staged(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- run folders: one run each -----------------------------------------------------------------
LOCK_FILE = ".compinv.lock"


@contextmanager
def run_lock(out: Path, held: bool = True) -> Iterator[None]:
    """An exclusive lock on the run folder for the block: a second process on the same folder
    gets a clear error instead of deleting the first one's staging folders. `held=False` (the
    other processes of one data-parallel run) takes no lock."""
    if not held:
        yield
        return
    import fcntl

    path = out / LOCK_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            raise CompinvError(f"`out` {out} is in use by another compinv run (pid {owner}); wait "
                               "for it to finish or choose another folder") from exc
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_staging(out: Path) -> None:
    """Staging folders left by a killed run (`.NAME.partial`, `.NAME.old`) are never complete."""
    for stale in list(out.rglob(".*.partial")) + list(out.rglob(".*.old")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


RUN_OUTPUTS = ("config.json", "checkpoints", "snapshots", "embeddings", "validation", "logs")


def claim_run_folder(out: Path, artifact_name: str, resume: str | None, overwrite: bool) -> None:
    """A run folder belongs to one run: refuse one holding another run unless resuming it, or
    clear it first with `overwrite` (the class-image cache stays)."""
    found = [n for n in (*RUN_OUTPUTS, artifact_name) if (out / n).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise CompinvError(f"`out` {out} already holds a run ({', '.join(found)}); pass `resume` "
                           "latest to continue it, `overwrite` to replace it, or another folder")
    log.info("overwrite: removing the previous run's %s from %s", ", ".join(found), out)
    for name in found:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
