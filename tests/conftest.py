"""Shared offline fixtures: a tiny SD-shaped model folder and small concept image folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import write_concept_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random SD 1.x-shaped pipeline folder, built once per test session."""
    from compinv.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def concept_images(tmp_path) -> Path:
    return write_concept_images(tmp_path / "concept")
