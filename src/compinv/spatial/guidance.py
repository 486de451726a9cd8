"""Layout guidance: the cross-attention loss and the latent update.

Same algorithm and constants as the official code (after Chen et al. 2023; see "Layout guidance"
in docs/official-code.md): for each concept,
token and attention map, act = sum(A_t * M) / sum(A_t) and the loss is (1 - act)^2, averaged
over heads and tokens, summed over concepts and maps, divided by (#concepts x #maps). On each
guided step: while loss > threshold and fewer than max iterations, z <- z - grad(scale * loss)
* sigma_t^2 (in sigma-space latents; `update_scale` converts for variance-preserving
schedulers). A guidance pass is conditional-only and stops the UNet right after the last map
the loss reads. Whether a step that met the threshold also ends guidance for the later steps
(the official rule) is the pipeline's decision (`GuidanceConfig.stop_rule`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from compinv.errors import CompinvError
from compinv.spatial.attention import AttentionRecorder, StopForward
from compinv.spatial.layout import Box, box_mask
from compinv.spatial.options import GuidanceConfig


@dataclass(frozen=True)
class Target:
    """One concept of the layout: its phrase, token positions and boxes."""

    phrase: str
    positions: tuple[int, ...]
    boxes: tuple[Box, ...]


def map_grid(num_pixels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an attention map with `num_pixels` cells for latents of `latent_hw`.

    Each UNet level halves the latent size (rounding up), so try the downsampling factors in turn;
    this also covers non-square images, which the official sqrt(HW) did not.
    """
    h, w = latent_hw
    for level in range(8):
        gh, gw = math.ceil(h / 2**level), math.ceil(w / 2**level)
        if gh * gw == num_pixels:
            return gh, gw
    raise RuntimeError(f"attention map of {num_pixels} cells does not fit latents of {h}x{w}")


def attention_loss(maps: dict[str, torch.Tensor], targets: Sequence[Target],
                   latent_hw: tuple[int, int]) -> torch.Tensor:
    """Unscaled loss per image, shape [batch]; `maps` hold [batch, heads, HW, tokens] tensors."""
    total = 0.0
    for probs in maps.values():
        gh, gw = map_grid(probs.shape[2], latent_hw)
        for target in targets:
            mask = box_mask(target.boxes, gh, gw).to(probs).flatten()
            token_maps = probs[..., list(target.positions)]  # [B, heads, HW, n]
            act = (token_maps * mask[:, None]).sum(2) / token_maps.sum(2)  # [B, heads, n]
            total = total + ((1 - act) ** 2).mean(1).mean(-1)
    return total / (len(targets) * len(maps))


def noise_level(scheduler, step_index: int, timestep: torch.Tensor) -> float:
    """The scheduler's sigma at this step, else sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > step_index:
        return float(sigmas[step_index])
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise CompinvError(f"scheduler {type(scheduler).__name__} has neither sigmas nor "
                           "alphas_cumprod, so layout guidance has no noise level to scale its "
                           "step with; use --scheduler lms, ddim, pndm, euler or dpm")
    alpha = alphas[int(timestep)].double()
    return float(((1 - alpha) / alpha).sqrt())


def update_scale(scheduler, step_index: int, timestep: torch.Tensor) -> float:
    """The factor of the gradient step: the official sigma_t^2, in the latents' own space.

    The official code runs LMS, whose latents live in sigma space (z = x_t / sqrt(alpha_bar),
    init_noise_sigma > 1). Variance-preserving schedulers (DDIM, PNDM, DPM-Solver: their
    init_noise_sigma is 1) hold x_t = sqrt(alpha_bar) z; the same step there is
    x -= grad_x * (1 - alpha_bar_t). Using sigma_t^2 on x_t would step up to 1 / alpha_bar_t
    (about 200x at the first step) too far and wreck the image.
    """
    sigma = noise_level(scheduler, step_index, timestep)
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0:
        return sigma**2
    return sigma**2 / (1 + sigma**2)  # = 1 - alpha_bar_t, as sigma_t^2 = (1 - alpha_bar) / alpha_bar


def check_scheduler(scheduler) -> None:
    """Fail before generating when the scheduler offers no noise level at all."""
    if getattr(scheduler, "sigmas", None) is None and getattr(scheduler, "alphas_cumprod", None) is None:
        noise_level(scheduler, 0, torch.tensor(0))


def guided_pass(unet, recorder: AttentionRecorder, model_input: torch.Tensor, timestep,
                cond_embeds: torch.Tensor, cross_attention_kwargs: dict | None) -> dict[str, torch.Tensor]:
    """Run the UNet only as far as the last recorded map; return the maps with their graph."""
    previous_mode, recorder.mode = recorder.mode, "guide"
    try:
        unet(model_input, timestep, encoder_hidden_states=cond_embeds,
             cross_attention_kwargs=cross_attention_kwargs, return_dict=False)
    except StopForward:
        pass
    except BaseException:
        recorder.maps = {}  # a failed pass must not keep its partial graph alive
        raise
    finally:
        recorder.mode = previous_mode
    return recorder.take()


class GuidedStep(NamedTuple):
    """What one guided denoising step did.

    losses: each iteration's unscaled loss (mean over the batch), measured before its update.
    converged: the last iteration's loss was at or below the threshold for every image, which
    under the official stopping rule ends guidance for the rest of the run.
    """

    latents: torch.Tensor
    losses: list[float]
    converged: bool


def guide_step(unet, scheduler, recorder: AttentionRecorder, latents: torch.Tensor,
               step_index: int, cond_embeds: torch.Tensor, targets: Sequence[Target],
               config: GuidanceConfig, cross_attention_kwargs: dict | None = None,
               ) -> GuidedStep:
    """Guidance iterations of one denoising step, at least one, until every image's loss is at
    most the threshold or `max_iterations` ran. No graph survives an iteration."""
    timestep = scheduler.timesteps[step_index]
    scale = update_scale(scheduler, step_index, timestep)
    losses = []
    for _ in range(config.max_iterations):
        z = latents.detach().requires_grad_(True)
        with torch.enable_grad():
            maps = guided_pass(unet, recorder, scheduler.scale_model_input(z, timestep),
                               timestep, cond_embeds, cross_attention_kwargs)
            loss = attention_loss(maps, targets, tuple(z.shape[-2:]))
            (grad,) = torch.autograd.grad(loss.sum() * config.loss_scale, z)
        latents = (z - grad * scale).detach()
        loss = loss.detach()
        losses.append(float(loss.mean()))
        if float(loss.max()) <= config.loss_threshold:
            return GuidedStep(latents, losses, True)
    return GuidedStep(latents, losses, False)
