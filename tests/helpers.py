"""Small builders shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from compinv.methods.textual_inversion import TrainConfig


def ti_config(model: Path, images: Path, out: Path, **overrides) -> TrainConfig:
    """A TI run that takes a second or two on the tiny model."""
    settings = dict(model=str(model), images=str(images), token="<cute-cat>", class_word="cat",
                    out=str(out), steps=4, batch_size=2, grad_accum=1, resolution=32,
                    checkpoint_every=0, save_every=0, validation_every=0, seed=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def learned(path: Path, token: str = "<cute-cat>") -> torch.Tensor:
    return load_file(str(path))[token]
