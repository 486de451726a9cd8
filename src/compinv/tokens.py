"""Concept tokens: add a multi-vector placeholder to the tokenizer and text encoder.

We follow diffusers' naming so artifacts and prompts agree with `load_textual_inversion`:
a concept `<cute-cat>` with N vectors is the tokens `<cute-cat>`, `<cute-cat>_1`, …,
`<cute-cat>_{N-1}`, and a prompt mentions it by its first name only: diffusers'
`maybe_convert_prompt` writes all N names at inference, and training prompts hold them all
(`ConceptToken.text`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from compinv.errors import CompinvError


@dataclass(frozen=True)
class ConceptToken:
    """A placeholder added to a tokenizer: its N token strings and their ids."""

    token: str
    names: tuple[str, ...]
    ids: tuple[int, ...]

    @property
    def text(self) -> str:
        """All vector names, space separated: what a prompt must contain to use every vector."""
        return " ".join(self.names)


def is_whole_word(token: str) -> bool:
    """A vocabulary entry that is a whole alphabetic word ("cat</w>"), not a sub-word piece or
    a byte symbol: what "a word of the vocabulary" means for anchors and nearest words."""
    return token.endswith("</w>") and token[:-4].isascii() and token[:-4].isalpha()


def vector_names(token: str, num_vectors: int) -> tuple[str, ...]:
    """diffusers' names for the vectors of a multi-vector token."""
    return (token,) + tuple(f"{token}_{i}" for i in range(1, num_vectors))


def single_token_id(tokenizer: CLIPTokenizer, word: str, argument: str) -> int:
    """The id of a word that must be exactly one token (an init or anchor word); `argument`
    names where the word came from in errors, e.g. "`init_word`"."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise CompinvError(
            f"{argument} {word!r} is {len(ids)} tokens {pieces}, but it must be exactly one; "
            "choose a single-token word (a common English noun such as 'cat' or 'toy')")
    return ids[0]


def add_concept_token(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, token: str, num_vectors: int,
    init_id: int,
) -> ConceptToken:
    """Add `token` with `num_vectors` vectors, each row initialised to the init word's row."""
    if num_vectors < 1:
        raise CompinvError(f"`num_vectors` {num_vectors}: must be at least 1")
    if not token or any(c.isspace() for c in token):
        raise CompinvError(f"`token` {token!r}: must be one word without spaces, e.g. '<cute-cat>'")
    names = vector_names(token, num_vectors)
    vocab = tokenizer.get_vocab()
    # A word that already tokenizes to one id ("cat" is "cat</w>") is taken as surely as an
    # added token: adding it again would silently redefine an ordinary word.
    taken = [n for n in names if n in vocab or len(tokenizer(n, add_special_tokens=False).input_ids) == 1]
    if taken:
        raise CompinvError(
            f"`token` {token!r} is already in the tokenizer's vocabulary ({', '.join(taken)}); "
            "choose a new word, e.g. one in angle brackets like '<my-cat>'")
    tokenizer.add_tokens(list(names), special_tokens=False)
    ids = tuple(tokenizer.convert_tokens_to_ids(list(names)))
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        weight = text_encoder.get_input_embeddings().weight
        weight[list(ids)] = weight[init_id].clone()
    return ConceptToken(token=token, names=names, ids=ids)


def add_concept_tokens(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                       specs: list[tuple[str, str, str]], num_vectors: int) -> list[ConceptToken]:
    """Add several concepts at once; `specs` are (token, init word, where the word came from).

    Every init word is checked before any token is added, so a bad second concept leaves the
    tokenizer as it was.
    """
    tokens = [t for t, _, _ in specs]
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise CompinvError(f"token {repeated[0]!r} is given to several concepts; give each its own")
    init_ids = [single_token_id(tokenizer, word, where) for _, word, where in specs]
    return [add_concept_token(tokenizer, text_encoder, token, num_vectors, init_id)
            for (token, _, _), init_id in zip(specs, init_ids)]


class TrainableRows:
    """The concepts' rows of the embedding table, optimised on their own.

    The gradient reaches the table through the embedding lookup (so the table keeps
    `requires_grad`, and under DDP its gradient is averaged with the text encoder's), but the
    optimiser holds only `rows`, a copy of the concept rows: `gather_gradients` moves their
    gradient over before clipping and the step, and `write` puts the updated rows back into the
    table. Every other row is never touched, so it stays bit-identical to the base model's. On
    the toy model (a 49,408 x 128 table) optimising the whole table and putting the frozen rows
    back cost about a third of a Textual Inversion step; the learned vectors are the same.
    """

    def __init__(self, text_encoder: CLIPTextModel, ids: list[int]):
        self._embedding = text_encoder.get_input_embeddings()
        self.table.requires_grad_(True)
        self.ids = list(ids)
        self.rows = self.table.detach()[self.ids].clone().requires_grad_(True)

    @property
    def table(self) -> torch.nn.Parameter:
        """The text encoder's table as it is now (moving a module may replace its parameters)."""
        return self._embedding.weight

    @torch.no_grad()
    def gather_gradients(self) -> None:
        """The concept rows' gradient, taken from the table's (which is then dropped)."""
        grad = self.table.grad
        if grad is not None:
            self.rows.grad = grad[self.ids].to(self.rows.dtype)
            self.table.grad = None

    @torch.no_grad()
    def write(self) -> None:
        """Put the optimised rows into the table (after a step, and after a resume). The rows
        first follow the table to its device (the trainer moves the text encoder to the GPU
        after the method was built, and calls this before it makes the optimiser), in place, so
        that the optimiser holds the tensor that lives there."""
        if self.rows.device != self.table.device:
            self.rows.data = self.rows.data.to(self.table.device)
        self.table[self.ids] = self.rows.to(self.table.dtype)

    def vectors(self, concept: ConceptToken) -> torch.Tensor:
        """A concept's vectors, [num_vectors, dim]."""
        return self.rows.detach()[[self.ids.index(i) for i in concept.ids]].clone()
