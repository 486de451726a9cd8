"""What a training method is, to the rest of compinv: one `Method` entry per method module.

The CLI subcommands, `compinv.train`, `load_concepts`, the toy ablation and the tests all
iterate `compinv.methods.METHODS`; adding a method is one module that defines its config class,
its trainable state, how it writes its artifact and how it reads it back, plus one entry in
`compinv/methods/__init__.py`. Nothing here imports the training loop, so generation code can
use the readers without loading accelerate's training machinery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compinv.data import DataRecipe

# (pipeline, artifact path, run as the user gave it) -> the tokens now usable in prompts
Loader = Callable[[Any, Path, Path], list[str]]


@dataclass(frozen=True)
class ArtifactReader:
    """One kind of artifact a run folder can hold, and how it goes into a pipeline."""

    kind: str  # shown in messages, e.g. "custom-diffusion"
    folder: str  # the artifact's sub-folder of the run folder ("." for the run folder itself)
    marker: str  # the file that marks the artifact
    load: Loader
    exclusive: bool = False  # two of this kind change the same weights: refuse to combine them
    first: bool = False  # replaces the text encoder: must be loaded before anything else


@dataclass(frozen=True)
class Method:
    """A training method: its options, its data, its trainable state and its artifacts."""

    name: str  # the CLI subcommand and config.json's "method"
    short: str  # in tables: "TI + semantic"
    help: str
    config_class: type
    recipe: Callable[[Any], DataRecipe]  # config -> prompt source and loss masks
    build: Callable[[Any, Any, list], Any]  # (config, pipeline, concept tokens) -> Trainable
    artifact_name: Callable[[Any], str]  # config -> file or folder name in the run folder
    readers: tuple[ArtifactReader, ...]
    snapshot_dir: str = "snapshots"
    prior_lr_factor: float = 1.0  # lr multiplier when class images share the batch
