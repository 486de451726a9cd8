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

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel


def input_embeddings(text_encoder: CLIPTextModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Token + position embeddings, exactly what enters the first transformer layer.

    transformers < 5 nests the modules under `.text_model`; 5.x has them on the model itself.
    """
    return getattr(text_encoder, "text_model", text_encoder).embeddings(input_ids=input_ids)


def anchor_loss(text_encoder: CLIPTextModel, input_ids: torch.Tensor,
                anchor_ids: torch.Tensor) -> torch.Tensor:
    """MSE between the prompt's input embeddings and the anchor prompt's (a fixed target).

    The target is detached: the anchor word is an attractor, it must not be pulled toward the
    concept (its row is frozen anyway, but a gradient on it would waste optimizer state).
    """
    prompt = input_embeddings(text_encoder, input_ids)
    with torch.no_grad():
        target = input_embeddings(text_encoder, anchor_ids)
    return F.mse_loss(prompt.float(), target.float())
