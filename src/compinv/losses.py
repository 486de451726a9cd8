"""The diffusion loss terms, as pure functions of tensors (the anchor term is in semantic.py).

The training loop only computes the model's prediction and sums these terms with their weights:
loss = recon_weight * rec + anchor_weight * anchor + prior_weight * prior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise, or the velocity for v-prediction models."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def reconstruction_terms(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                         is_prior: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Reconstruction error of the concept images and of the prior-preservation class images.

    Without a mask the concept term is the mean squared error over all elements (TI,
    DreamBooth). With a [B, 1, h, w] mask it is the official Custom Diffusion loss: per image,
    the squared error summed over the latent channels of every masked cell, divided by the
    number of masked cells (4x a per-element mean for SD's 4 latent channels). Class images are
    always scored by the plain mean, as in the official scripts.
    """
    pred, target = pred.float(), target.float()
    prior = torch.zeros((), device=pred.device)
    if is_prior is not None:  # class images: a plain mean; the rest are the concept's
        concept = ~is_prior.to(pred.device)
        prior = F.mse_loss(pred[~concept], target[~concept])
        pred, target = pred[concept], target[concept]
        mask = None if mask is None else mask.to(pred.device)[concept]
    if mask is None:
        return {"rec": F.mse_loss(pred, target), "prior": prior}
    mask = mask.to(pred.device)
    error = (pred - target).pow(2)
    return {"rec": ((error * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3))).mean(), "prior": prior}


def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The optimised loss: each term times its weight (terms without a weight count 0)."""
    return sum(weights.get(name, 0.0) * value for name, value in terms.items())
