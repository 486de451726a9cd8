"""Textual Inversion: learn only the new token's rows of the text encoder's embedding table.

Differences from the official code (KNOWLEDGE.md §3.2): every one of the N vectors appears in
every training prompt (`<tok> <tok>_1 … <tok>_{N-1} cat`), so all of them are trained and all
of them are what diffusers' `load_textual_inversion` uses at inference. Every other row of the
table is restored after each optimiser step, so it stays bit-identical to the base model's
(AdamW's weight decay would otherwise shrink all 49,408 rows).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextModel

from compinv.artifacts import EMBEDDINGS_FILE, output_folder, save_embeddings
from compinv.config import TrainConfig
from compinv.data import ConceptDataset, load_images
from compinv.models import load_pipeline
from compinv.tokens import (ConceptToken, TrainableRows, add_concept_token, expand_prompt,
                            single_token_id)
from compinv.trainer import Trainer, TrainResult, find_checkpoint


class TextualInversion:
    """Trainable state of TI: the embedding table, of which only the concept's rows may change."""

    name = "textual-inversion"
    artifact_name = EMBEDDINGS_FILE
    snapshot_dir = "embeddings"

    def __init__(self, text_encoder: CLIPTextModel, concept: ConceptToken):
        self.text_encoder = text_encoder
        self.concept = concept
        self.modules = [text_encoder]
        text_encoder.requires_grad_(False)
        self._rows = TrainableRows(text_encoder, list(concept.ids))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self._rows.table]

    def after_step(self) -> None:
        self._rows.restore()

    def learned_vectors(self) -> torch.Tensor:
        """The concept's vectors, [num_vectors, dim]."""
        return self._rows.vectors(self.concept)

    def expand_prompt(self, prompt: str) -> str:
        prompt = prompt.replace("{}", self.concept.token)
        return expand_prompt(prompt, self.concept)

    def save(self, path: Path) -> Path:
        """diffusers' format, `{token: [N, dim]}`: `pipe.load_textual_inversion(path)` loads it."""
        return save_embeddings({self.concept.token: self.learned_vectors()}, path)


def train_textual_inversion(config: TrainConfig) -> TrainResult:
    """Learn `config.token` from `config.images`; returns where the embedding was written.

    Everything is checked before any model is loaded or file is written, so a bad input costs
    seconds and leaves no half-made run folder behind.
    """
    with output_folder(config.resolved().out, "--out") as out:
        return build_trainer(config, out).run()


def build_trainer(config: TrainConfig, out: Path) -> Trainer:
    """Load the model, add the token and set up the loop; `.run()` trains (benchmarks time `.step()`)."""
    cfg = config.resolved()
    resume_from = find_checkpoint(out, cfg.resume)
    images = load_images(cfg.images)
    pipe = load_pipeline(cfg.model)
    tokenizer = pipe.tokenizer
    init_id = single_token_id(tokenizer, cfg.init_word, _source(config, "init_word"))
    anchor_id = (single_token_id(tokenizer, cfg.anchor_word, _source(config, "anchor_word"))
                 if cfg.anchor_word else None)
    concept = add_concept_token(tokenizer, pipe.text_encoder, cfg.token, cfg.num_vectors, init_id)
    subject = concept.text + (f" {cfg.class_word}" if cfg.class_word else "")
    dataset = ConceptDataset(images, cfg.resolution, subject, tokenizer, cfg.seed, concept.ids,
                             anchor_id, center_crop=cfg.center_crop, flip_p=cfg.flip_p)
    method = TextualInversion(pipe.text_encoder, concept)
    return Trainer(cfg, pipe, dataset, method, out, resume_from)


def _source(given: TrainConfig, name: str) -> str:
    """The flag a derived word came from, so an error names what the user actually typed."""
    if getattr(given, name):
        return "--" + name.replace("_", "-")
    origin = "--class-word" if given.class_word and not given.no_class_word else (
        "--anchor-word" if name == "init_word" else "--init-word")
    return f"{origin} (the default {name.replace('_', ' ')})"
