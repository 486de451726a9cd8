"""Every bad input: one clear error naming the input and the fix, exit != 0, nothing half-written."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from compinv.cli import main
from compinv.data import load_images
from compinv.errors import CompinvError
from helpers import cli_error, learned, ti_config


def _train_argv(model, images, out, *extra):
    return ["train", "textual-inversion", "--model", str(model), "--images", str(images),
            "--token", "<cute-cat>", "--class-word", "cat", "--steps", "2", "--resolution", "32",
            "--batch-size", "1", "--grad-accum", "1", "--out", str(out), *extra]


def _write_awkward_images(folder):
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "deep.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.gif")
    full = folder / "full.png"
    Image.fromarray(rgb).save(full)
    (folder / "truncated.png").write_bytes(full.read_bytes()[:200])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 50)
    (folder / "notes.txt").write_text("not an image")


def test_awkward_images_convert_or_skip_with_warning(tmp_path, caplog):
    _write_awkward_images(tmp_path / "mixed")
    with caplog.at_level(logging.WARNING, logger="compinv"):
        images = load_images(tmp_path / "mixed")
    assert len(images) == 6
    assert all(im.mode == "RGB" for im in images)
    skipped = sorted(r.getMessage().split()[1].rsplit("/", 1)[-1].rstrip(":") for r in caplog.records)
    assert skipped == ["corrupt.jpg", "notes.txt", "truncated.png"]
    deep = [im for im in images if np.asarray(im).max() > 200]
    assert deep, "16-bit images must be scaled, not clipped to white or black"


def test_multi_token_init_and_anchor_words(capsys, tiny_model, concept_images, tmp_path):
    msg = cli_error(capsys, _train_argv(tiny_model, concept_images, tmp_path / "o",
                                         "--init-word", "teddybear"))
    assert "--init-word 'teddybear' is 2 tokens ['teddy', 'bear</w>']" in msg
    # An anchor may be several tokens (the mean of their rows), but not an unknown string.
    assert main(_train_argv(tiny_model, concept_images, tmp_path / "ok", "--anchor-word", "hydrant")) == 0
    msg = cli_error(capsys, _train_argv(tiny_model, concept_images, tmp_path / "o",
                                         "--anchor-word", "qxzqvkwjqxzq"))
    assert "anchor word 'qxzqvkwjqxzq' is not in the vocabulary" in msg


def test_out_is_a_file_or_not_writable(capsys, tiny_model, concept_images, tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    assert "is a file" in cli_error(capsys, _train_argv(tiny_model, concept_images, file))
    msg = cli_error(capsys, _train_argv(tiny_model, concept_images, file / "sub"))
    assert "not writable" in msg


def test_non_finite_loss_stops_and_keeps_last_good_embedding(tiny_model, concept_images, tmp_path):
    """A loss that turns NaN at step 3 (options are range-checked, so the NaN is injected)."""
    from compinv.artifacts import output_folder
    from compinv.training import prepare

    cfg = ti_config(tiny_model, concept_images, tmp_path / "nan", steps=5).resolved()
    with output_folder(cfg.out) as out:
        trainer = prepare(cfg, out)
    losses = trainer.losses

    def poisoned(batch):
        terms = losses(batch)
        if trainer.global_step == 2:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    trainer.losses = poisoned
    with pytest.raises(CompinvError, match=r"not finite .* at step 3; stopped") as info:
        trainer.run()
    assert "last good embedding" in str(info.value)
    assert torch.isfinite(learned(tmp_path / "nan" / "learned_embeds.safetensors")).all()




def test_unreadable_folder(capsys, tiny_model, concept_images, tmp_path, monkeypatch):
    """Root reads every folder, so the refusal is simulated where listing happens."""
    from pathlib import Path

    real = Path.iterdir

    def iterdir(self):
        if self == concept_images:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    line = cli_error(capsys, _train_argv(tiny_model, concept_images, tmp_path / "out"))
    assert f"--images {concept_images}: the folder cannot be read (Permission denied)" in line
    assert not (tmp_path / "out").exists()
