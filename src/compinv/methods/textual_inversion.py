"""Textual Inversion: learn only the new token's rows of the text encoder's embedding table.

Differences from the official code (docs/official-code.md): every one of the N vectors appears
in every training prompt (`<tok> <tok>_1 … <tok>_{N-1} cat`), so all of them are trained and
all of them are what diffusers' `load_textual_inversion` uses at inference. Every other row of
the table is restored after each optimiser step, so it stays bit-identical to the base model's
(AdamW's weight decay would otherwise shrink all 49,408 rows).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from compinv.artifacts import EMBEDDINGS_FILE, save_embeddings
from compinv.config import (ConceptOptions, DataOptions, LossOptions, OptimizerOptions,
                            RunOptions, resolve_common, single_concept)
from compinv.data import TEMPLATE_SETS, DataRecipe, template_prompts
from compinv.errors import CompinvError
from compinv.methods.registry import ArtifactReader, Method
from compinv.options import option
from compinv.tokens import ConceptToken, TrainableRows


@dataclass
class TrainConfig(ConceptOptions, LossOptions, OptimizerOptions, DataOptions, RunOptions):
    """Settings of one Textual Inversion run with semantic inversion (official TI defaults)."""

    no_class_word: bool = option(False, "train with vanilla prompts ('a photo of a <cute-cat>')")
    templates: str = option("official", "prompt templates: the official code's 22 ('photo of a "
                                        "{}', ...) or the original Textual Inversion list ('a photo "
                                        "of a {}', ...)", choices=sorted(TEMPLATE_SETS))

    def resolved(self) -> TrainConfig:
        """The run's settings with derived values filled and every check done (once per run)."""
        cfg = resolve_common(self)
        if cfg.no_class_word:
            cfg.class_word = None
        if cfg.templates not in TEMPLATE_SETS:
            raise CompinvError(f"`templates` {cfg.templates!r}: use one of {', '.join(TEMPLATE_SETS)}")
        if cfg.anchor_weight > 0 and not (cfg.anchor_word or cfg.class_word or cfg.init_word):
            raise CompinvError("`anchor_word` is required for semantic inversion (or `no_anchor` "
                               "for vanilla Textual Inversion)")
        return dataclasses.replace(cfg, concept_list=(single_concept(cfg),))


class TextualInversion:
    """Trainable state of TI: the embedding table, of which only the concept's rows may change."""

    def __init__(self, text_encoder, concept: ConceptToken):
        self.text_encoder = text_encoder
        self.concept = concept
        self.modules = [text_encoder]
        text_encoder.requires_grad_(False)
        self._rows = TrainableRows(text_encoder, list(concept.ids))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self._rows.rows]

    def prepare_gradients(self) -> None:
        self._rows.gather_gradients()

    def after_step(self) -> None:
        self._rows.write()

    def learned_vectors(self) -> torch.Tensor:
        """The concept's vectors, [num_vectors, dim]."""
        return self._rows.vectors(self.concept)

    def save(self, path: Path) -> Path:
        """diffusers' format, `{token: [N, dim]}`: `pipe.load_textual_inversion(path)` loads it."""
        return save_embeddings({self.concept.token: self.learned_vectors()}, path)


MAX_VECTORS = 75  # the most a 77-token prompt can hold next to its BOS and EOS


def read_embedding_file(path: Path, dim: int, argument: str) -> tuple[str, torch.Tensor]:
    """(token, [N, dim] vectors) of a diffusers embedding file, checked before it goes into a
    model: a safetensors file with one token of 1..75 finite vectors of the model's width."""
    try:
        data = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CompinvError(f"{argument}: {path.name} is not a safetensors file ({exc})") from exc
    if len(data) != 1:
        raise CompinvError(f"{argument}: {path.name} holds {len(data)} tensors; expected one "
                           "token's embedding")
    (token, vectors), = data.items()
    vectors = vectors.reshape(-1, vectors.shape[-1]) if vectors.dim() else vectors.reshape(1, 1)
    if vectors.shape[-1] != dim:
        raise CompinvError(f"{argument}: {path.name} has vectors of width {vectors.shape[-1]}, this "
                           f"model's text encoder has {dim}; load it into the model it was trained for")
    if not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise CompinvError(f"{argument}: {path.name} holds {vectors.shape[0]} vectors for {token!r}; "
                           f"a prompt can hold 1 to {MAX_VECTORS}")
    if not torch.isfinite(vectors).all():
        raise CompinvError(f"{argument}: {path.name} has NaN or infinite values; the run that "
                           "wrote it diverged")
    return token, vectors


def load_embedding_file(pipe, path: Path, run: Path, argument: str = "runs") -> list[str]:
    """One diffusers embedding file via `load_textual_inversion`, checked to have arrived
    (the Textual Inversion reader; also each token file of the other methods).

    Refuses to redefine a token already in the tokenizer (another run's, or a word of the model).
    """
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    token, vectors = read_embedding_file(path, dim, f"`{argument}` {run}")
    if token in pipe.tokenizer.get_vocab():
        raise CompinvError(f"`{argument}` {run}: token {token!r} is already loaded (from another "
                           "run or the model); train the concepts with different tokens")
    pipe.load_textual_inversion({token: vectors}, token=token)
    names = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    if not torch.equal(table[ids].cpu().float(), vectors.float()):
        raise CompinvError(f"`{argument}` {run}: {token!r} did not load into the text encoder")
    return [token]


def token_files(folder: Path, weight_files: set[str]) -> list[Path]:
    """The per-token embedding files of a Custom Diffusion or LoRA artifact folder."""
    return sorted(p for p in folder.glob("*.safetensors") if p.name not in weight_files)


def _build(cfg: TrainConfig, pipe, tokens: list[ConceptToken]) -> TextualInversion:
    return TextualInversion(pipe.text_encoder, tokens[0])


METHOD = Method(
    name="textual-inversion",
    short="TI",
    help="Textual Inversion with semantic inversion",
    config_class=TrainConfig,
    recipe=lambda cfg: DataRecipe(prompts=template_prompts(TEMPLATE_SETS[cfg.templates])),
    build=_build,
    artifact_name=lambda cfg: EMBEDDINGS_FILE,
    readers=(ArtifactReader("textual-inversion", ".", EMBEDDINGS_FILE, load_embedding_file),),
    snapshot_dir="embeddings",
)
