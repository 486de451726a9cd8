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


def moved_concept():
    """A tiny encoder with a 2-vector concept moved away from its init word, two prompts using
    it, and the official anchor prompts (the concept's ids replaced by "cat")."""
    from compinv.models import build_tiny_pipeline
    from compinv.tokens import add_concept_token, single_token_id

    pipe = build_tiny_pipeline()
    tok, enc = pipe.tokenizer, pipe.text_encoder
    cat = single_token_id(tok, "cat", "--anchor-word")
    concept = add_concept_token(tok, enc, "<x>", 2, single_token_id(tok, "dog", "--init-word"))
    table = enc.get_input_embeddings().weight
    with torch.no_grad():
        table[list(concept.ids)] += torch.randn(2, table.shape[1])
    prompts = [f"a photo of a {concept.text} cat", f"{concept.text} on a beach"]
    ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    anchor_ids = torch.where(torch.isin(ids, torch.tensor(concept.ids)), cat, ids)
    return enc, table, cat, concept, ids, anchor_ids
