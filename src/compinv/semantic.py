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

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel


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
