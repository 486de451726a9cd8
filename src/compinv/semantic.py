"""Semantic inversion: the anchor loss that keeps learned vectors near real word embeddings.

The official loss compares the text encoder's *input* embeddings (token + position, before the
transformer) of the training prompt and of a reference prompt in which the placeholder is
replaced by the anchor word, with a mean squared error over all B x 77 x dim elements. Only the
placeholder rows differ, so this is an L2 pull of each learned vector toward the anchor word's
row, scaled by 1 / (77 * dim) per occurrence; we keep that normalisation so the published loss
weights (0.95 anchor / 0.05 reconstruction) mean the same thing here.

The input embeddings come from the encoder's own embedding module: no forked text encoder.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel

from compinv.errors import CompinvError
from compinv.tokens import is_whole_word


def input_embeddings(text_encoder: CLIPTextModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Token + position embeddings, exactly what enters the first transformer layer.

    transformers < 5 nests the modules under `.text_model`; 5.x has them on the model itself.
    """
    return getattr(text_encoder, "text_model", text_encoder).embeddings(input_ids=input_ids)


@contextmanager
def captured_input_embeddings(text_encoder: CLIPTextModel) -> Iterator[list[torch.Tensor]]:
    """Keep the input embeddings the encoder computes in its own forward pass.

    The anchor loss reads the very tensor the transformer consumed, so the training step does
    no second lookup and no second backward into the 49,408-row table: the anchor gradient joins
    the reconstruction gradient before the one embedding backward.
    """
    captured: list[torch.Tensor] = []
    module = getattr(text_encoder, "text_model", text_encoder).embeddings
    handle = module.register_forward_hook(lambda _m, _inputs, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


def anchor_loss(prompt_embeddings: torch.Tensor, anchor_embeddings: torch.Tensor) -> torch.Tensor:
    """MSE over all B x 77 x dim elements between a prompt's and its anchor prompt's embeddings.

    `anchor_embeddings` is a fixed target (compute it under no_grad): the anchor word is an
    attractor and must not be pulled toward the concept.
    """
    return F.mse_loss(prompt_embeddings.float(), anchor_embeddings.detach().float())


# ---- anchor sets: the paper's attractors with sparse weights ------------------------------------
#
# The paper pulls the learned embedding toward the "core distribution" with several anchors and
# a sparse regularisation; the official code only ever used one anchor. Our reading, documented
# in docs/semantic.md: each learned vector v is pulled toward A^T w, where A holds the anchors'
# input embeddings (one row per anchor word; a word of several tokens is the mean of their
# rows) and w are sparse non-negative weights summing to 1:
#   a* = argmin_{a >= 0} ||v - A^T a||^2 + lambda * s * ||a||_1   (s = mean squared anchor norm)
#   w  = a* / sum(a*)        (the nearest anchor when a* = 0)
# so the target is a convex combination of anchors (it keeps an anchor-like norm), lambda makes
# it sparse, and with one anchor w = 1: the target is the anchor itself and the loss is exactly
# the official one.

_ITERATIONS = 25  # projected-gradient steps per optimisation step, warm-started


class AnchorAttractor:
    """The anchors of every concept and the current sparse weights of every learned vector.

    `anchors[c]` is concept c's [k_c, dim] anchor matrix; `owners` maps each placeholder token id
    to its concept. Weights are solved under no_grad and warm-started from the previous step.
    """

    def __init__(self, anchors: list[torch.Tensor], names: list[tuple[str, ...]],
                 owners: dict[int, int], sparsity: float = 0.0):
        self.anchors = [a.detach().float() for a in anchors]
        self.names, self.owners, self.sparsity = names, owners, sparsity
        self._gram = [a @ a.T for a in self.anchors]
        # 1 / Lipschitz constant of the gradient 2(Ga - b): converges for any start.
        self._step = [0.5 / float(torch.linalg.eigvalsh(g).max().clamp_min(1e-12)) for g in self._gram]
        self._penalty = [sparsity * float((a * a).sum(1).mean()) for a in self.anchors]
        # The previous step's solution of each vector (checkpoints keep it, so resume is exact).
        self.warm_starts = {p: torch.zeros(len(self.anchors[c])) for p, c in owners.items()}
        self.weights: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def solve(self, table: torch.Tensor) -> dict[int, torch.Tensor]:
        """Update every vector's weights from the embedding table's current rows; returns them."""
        for p, c in self.owners.items():
            anchors, gram = self.anchors[c].to(table.device), self._gram[c].to(table.device)
            b = anchors @ table[p].float()
            a = self.warm_starts[p].to(table.device)
            for _ in range(_ITERATIONS):
                a = (a - self._step[c] * (2 * (gram @ a - b) + self._penalty[c])).clamp_min(0)
            self.warm_starts[p] = a.cpu()
            if float(a.sum()) <= 0:  # no anchor correlates with v: the nearest anchor
                a = torch.zeros_like(a)
                a[int(torch.cdist(table[p].float()[None], anchors).argmin())] = 1.0
            self.weights[p] = (a / a.sum()).cpu()
        return self.weights

    def targets(self, table: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each vector's attractor: the weighted combination of its concept's anchors."""
        weights = self.solve(table)
        return {p: (weights[p].to(table.device) @ self.anchors[c].to(table.device)).to(table.dtype)
                for p, c in self.owners.items()}

    @torch.no_grad()
    def reference(self, prompt_embeddings: torch.Tensor, input_ids: torch.Tensor,
                  table: torch.Tensor) -> torch.Tensor:
        """The reference prompt's input embeddings: the prompt's own, with each placeholder's
        token row swapped for its attractor (the position embedding is the same, so this is
        the official anchor prompt when the attractor is one anchor word)."""
        reference = prompt_embeddings.detach().clone()
        for p, target in self.targets(table).items():
            where = input_ids.to(reference.device) == p
            reference[where] += (target - table[p]).to(reference.dtype)
        return reference

    def summary(self, token_of: dict[int, str], top: int = 5) -> dict[str, str]:
        """{vector name: "0.71 cat + 0.18 kitten + 0.04 pet"}, the largest weights first."""
        lines = {}
        for p, c in self.owners.items():
            w = self.weights[p]
            order = w.argsort(descending=True)[:top].tolist()
            lines[token_of[p]] = " + ".join(f"{float(w[i]):.2f} {self.names[c][i]}"
                                            for i in order if float(w[i]) > 0)
        return lines


MAX_PIECES = 3  # an anchor word split into more tokens than this is not a word the model knows


def anchor_row(tokenizer, table: torch.Tensor, word: str, where: str) -> torch.Tensor:
    """A word's input embedding: its token's row, or the mean of its tokens' rows."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not 1 <= len(ids) <= MAX_PIECES:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise CompinvError(f"{where}: anchor word {word!r} is not in the vocabulary (it splits into "
                           f"{len(ids)} pieces {pieces}); use common words such as 'cat' or 'toy'")
    return table[ids].float().mean(0)


def read_vocabulary(path: str | Path, tokenizer, where: str) -> list[str]:
    """Anchor words from a file, one per line ('#' starts a comment); unknown words are skipped."""
    path = Path(path)
    if not path.is_file():
        raise CompinvError(f"{where}: anchor vocabulary {path} not found; give a file with one word "
                           "per line, or nearest:K")
    lines = [line.split("#")[0].strip() for line in path.read_text(errors="replace").splitlines()]
    words = [w for w in dict.fromkeys(lines)
             if w and 1 <= len(tokenizer(w, add_special_tokens=False).input_ids) <= MAX_PIECES]
    if not words:
        raise CompinvError(f"{where}: anchor vocabulary {path} has no usable word (one word of at "
                           f"most {MAX_PIECES} tokens per line)")
    return words


def nearest_words(tokenizer, table: torch.Tensor, word: str, k: int, exclude: set[int]) -> list[str]:
    """The k whole words whose rows are nearest (cosine) to `word`'s, the word itself excluded."""
    own = set(tokenizer(word, add_special_tokens=False).input_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(table.shape[0])))
    usable = torch.tensor([is_whole_word(t) and i not in own | exclude for i, t in enumerate(tokens)])
    unit = F.normalize(table.float(), dim=1)
    similarity = (unit @ F.normalize(table[sorted(own)].float().mean(0), dim=0)).masked_fill(~usable, -2)
    return [tokens[i][:-4] for i in similarity.topk(k).indices.tolist()]


def concept_anchor_words(spec, tokenizer, table: torch.Tensor, exclude: set[int]) -> list[str]:
    """A concept's anchors: its anchor word(s), then its anchor vocabulary (a file or nearest:K)."""
    words = list(spec.anchor_words)
    vocabulary = spec.anchor_vocabulary
    where = spec.where if spec.where != "`token`" else "`anchor_vocabulary`"
    if vocabulary and vocabulary.startswith("nearest:"):
        count = vocabulary.split(":", 1)[1]
        if not count.isdigit() or not 1 <= int(count) <= 10_000:
            raise CompinvError(f"{where}: {vocabulary!r}: write nearest:K with K from 1 to 10000")
        words += nearest_words(tokenizer, table, spec.init_word, int(count), exclude)
    elif vocabulary:
        words += read_vocabulary(vocabulary, tokenizer, where)
    return list(dict.fromkeys(words))


def build_attractor(tokenizer, text_encoder, specs, tokens, sparsity: float) -> AnchorAttractor:
    """The attractor of a run's concepts (`specs`, their added `tokens`)."""
    if sparsity < 0 or not math.isfinite(sparsity):
        raise CompinvError(f"`anchor_sparsity` {sparsity}: must be a finite number >= 0")
    table = text_encoder.get_input_embeddings().weight.detach()
    added = {i for t in tokens for i in t.ids}
    names, matrices, owners = [], [], {}
    for c, (spec, token) in enumerate(zip(specs, tokens)):
        where = spec.where if spec.where != "`token`" else "`anchor_words`"
        words = concept_anchor_words(spec, tokenizer, table, added)
        matrices.append(torch.stack([anchor_row(tokenizer, table, w, where) for w in words]))
        names.append(tuple(words))
        owners.update({i: c for i in token.ids})
    return AnchorAttractor(matrices, names, owners, sparsity)
