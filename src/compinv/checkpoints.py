"""Resumable training state without pickles: safetensors for tensors, JSON for the rest.

A checkpoint someone sent you must not be able to run code when you resume from it, so nothing
here is pickled (accelerate's `save_state` pickles the optimizer, the lr schedule and the RNG
states). A checkpoint folder holds:

- `trained.safetensors`: the tensors the method trains (`Trainable.parameters()`), and the
  semantic attractor's warm starts;
- `optimizer.safetensors`: the optimizer's per-parameter state;
- `state.json`: the step, the lr schedule, the optimizer's hyper-parameters, the gradient
  scaler, and the settings that shape the trained tensors (refused on resume when they differ);
- `rng-<process>.safetensors` / `rng-<process>.json`: every random generator, per process;
- `manifest.json`, written last: every file's size and SHA-256, so a checkpoint is known complete
  and intact before it is used. A corrupted newest checkpoint is named and the next older intact
  one is used instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from compinv.artifacts import (atomic_write_text, commit_staged, load_optimizer_tensors,
                               optimizer_tensors, save_tensors, staging_path)
from compinv.errors import CompinvError

log = logging.getLogger("compinv")

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = 2  # 1: accelerate's pickled save_state (compinv <= 0.1 before this module)


@dataclass
class ResumableState:
    """Everything a run needs to continue bit-identically, as the trainer holds it."""

    parameters: list[torch.nn.Parameter]
    optimizer: Any  # torch or accelerate optimizer
    scheduler: Any  # torch LR scheduler (accelerate's wrapper is unwrapped by the caller)
    scaler: Any = None  # torch.amp.GradScaler under fp16
    warm_starts: dict[int, torch.Tensor] = field(default_factory=dict)  # the attractor's
    settings: dict[str, Any] = field(default_factory=dict)  # what shapes the trained tensors


def checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


# ---- saving --------------------------------------------------------------------------------
def save_checkpoint(accelerator, out: Path, step: int, keep: int, state: ResumableState) -> Path:
    """The training state after `step` steps, as `out/checkpoints/checkpoint-<step>`.

    The folder is built under a staging name and renamed into place after the manifest is
    written; the newest `keep` checkpoints are kept.
    """
    root = out / CHECKPOINT_DIR
    final = root / f"checkpoint-{step}"
    staging = staging_path(final)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    tensors, record = _rng_state()
    save_tensors(tensors, staging / f"rng-{rank}.safetensors")
    atomic_write_text(staging / f"rng-{rank}.json", json.dumps(record))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_main(staging, step, state, accelerator.num_processes)
        commit_staged(staging, final)
        for old in sorted(root.glob("checkpoint-*"), key=checkpoint_step)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _save_main(folder: Path, step: int, state: ResumableState, processes: int) -> None:
    trained = {f"param.{i}": p.detach() for i, p in enumerate(state.parameters)}
    trained.update({f"warm_start.{k}": v for k, v in state.warm_starts.items()})
    save_tensors(trained, folder / "trained.safetensors")
    save_tensors(optimizer_tensors(state.optimizer), folder / "optimizer.safetensors")
    record = {
        "format": FORMAT, "step": step, "processes": processes, "settings": state.settings,
        "shapes": [list(p.shape) for p in state.parameters],
        "scheduler": state.scheduler.state_dict(),
        "param_groups": [{k: v for k, v in g.items() if k != "params"}
                         for g in state.optimizer.state_dict()["param_groups"]],
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
    }
    try:
        text = json.dumps(record, indent=2)
    except TypeError as exc:  # an lr schedule holding objects JSON cannot write
        raise CompinvError(f"checkpoint: the training state cannot be written without pickles "
                           f"({exc}); use another `lr_scheduler`") from exc
    atomic_write_text(folder / "state.json", text)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    manifest = {"format": FORMAT, "step": step,
                "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2))


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every generator a training step could draw from: Python, NumPy, torch CPU and CUDA."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    record = {"python": [version, list(internal), gauss],
              "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, record


# ---- finding and checking ------------------------------------------------------------------
def find_checkpoint(out: Path, resume: str | None) -> Path | None:
    """The intact checkpoint `resume` names ('latest' or a folder), or a clear error.

    'latest' skips checkpoints that fail their manifest check (with a warning naming the bad
    file) and takes the newest intact one.
    """
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        problem = checkpoint_problem(path)
        if problem:
            raise CompinvError(f"`resume` {resume}: {problem}; pass 'latest' or another checkpoint "
                               f"folder such as {out / CHECKPOINT_DIR}/checkpoint-500")
        return path
    found = sorted((out / CHECKPOINT_DIR).glob("checkpoint-*"), key=checkpoint_step, reverse=True)
    if not found:
        raise CompinvError(f"`resume` latest: no checkpoint in {out / CHECKPOINT_DIR}; run "
                           "without `resume` to start, or pass a checkpoint folder")
    for path in found:
        problem = checkpoint_problem(path)
        if not problem:
            return path
        log.warning("skipping %s: %s", path, problem)
    raise CompinvError(f"`resume` latest: no intact checkpoint in {out / CHECKPOINT_DIR} (newest: "
                       f"{checkpoint_problem(found[0])}); start again without `resume`")


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete, intact checkpoint of this format (None: it is)."""
    if not path.is_dir():
        return "not a checkpoint folder"
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if (path / "compinv_state.json").is_file():
            return ("written by an older compinv in accelerate's pickled format, which is not "
                    "loaded any more (pickles can run code); start the run again")
        return f"not a complete compinv checkpoint (no {MANIFEST})"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{manifest_path} is corrupted"
    if manifest.get("format") != FORMAT:
        return f"checkpoint format {manifest.get('format')!r}, this compinv reads {FORMAT}"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            return f"{file} is corrupted (its size or checksum differs from {MANIFEST})"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- loading -------------------------------------------------------------------------------
def load_checkpoint(accelerator, path: Path, state: ResumableState) -> int:
    """Restore what `save_checkpoint` wrote into `state`; returns the checkpoint's step."""
    record = json.loads((path / "state.json").read_text())
    _check_settings(path, record, state)
    trained = load_file(str(path / "trained.safetensors"))
    with torch.no_grad():
        for i, p in enumerate(state.parameters):
            p.copy_(trained[f"param.{i}"].to(p.device, p.dtype))
    for key in state.warm_starts:
        state.warm_starts[key] = trained[f"warm_start.{key}"]
    load_optimizer_tensors(state.optimizer, load_file(str(path / "optimizer.safetensors")))
    for group, saved in zip(state.optimizer.param_groups, record["param_groups"]):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    state.scheduler.load_state_dict(record["scheduler"])
    if state.scaler is not None and record["scaler"] is not None:
        state.scaler.load_state_dict(record["scaler"])
    _load_rng(path, accelerator.process_index)
    return int(record["step"])


def _check_settings(path: Path, record: dict, state: ResumableState) -> None:
    """A checkpoint of a run with other settings cannot continue this one: say which differ."""
    differ = [f"`{k}` {state.settings.get(k)!r} here, {v!r} in the checkpoint"
              for k, v in record["settings"].items() if state.settings.get(k) != v]
    shapes = [list(p.shape) for p in state.parameters]
    if not differ and record["shapes"] != shapes:
        differ = [f"trained tensors of shapes {record['shapes']} in the checkpoint, {shapes} here"]
    if differ:
        raise CompinvError(f"`resume` {path}: the checkpoint is from a run with other settings "
                           f"({'; '.join(differ)}); resume with the run's own settings or start "
                           "a new run in another folder")


def _load_rng(path: Path, rank: int) -> None:
    if not (path / f"rng-{rank}.json").is_file():
        raise CompinvError(f"`resume` {path}: no random state for process {rank}; resume with "
                           "the number of processes the run was started with")
    tensors = load_file(str(path / f"rng-{rank}.safetensors"))
    record = json.loads((path / f"rng-{rank}.json").read_text())
    version, internal, gauss = record["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = record["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")),
                                       key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
