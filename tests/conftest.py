"""Shared offline fixtures: a tiny SD-shaped model folder and small concept image folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random SD 1.x-shaped pipeline folder, built once per test session."""
    from compinv.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def write_concept_images(folder: Path, n: int = 3, size: int = 48, seed: int = 0) -> Path:
    """Small RGB images of a red blob on noise: enough signal for a few training steps."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4, 0] = 220
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def concept_images(tmp_path) -> Path:
    return write_concept_images(tmp_path / "concept")
