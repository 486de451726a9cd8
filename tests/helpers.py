"""Small builders shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from compinv.cli import main

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


def write_concept_images(folder: Path, n: int = 3, size: int = 48, seed: int = 0) -> Path:
    """Small RGB images of a red blob on noise: enough signal for a few training steps."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4, 0] = 220
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI on a bad input: exit code 2, exactly one `error:` line on stderr (libraries'
    progress bars may also write there), no traceback. Returns that line."""
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]
