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

import ctypes
import ctypes.util
import functools
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


def _per_image(targets: Sequence[Target] | Sequence[Sequence[Target]], batch: int) -> list[Sequence[Target]]:
    """One target list per image: a flat list of Targets is shared by every image."""
    if targets and isinstance(targets[0], Target):
        return [targets] * batch
    if len(targets) != batch:
        raise CompinvError(f"`targets`: {len(targets)} per-image target lists for a batch of {batch}")
    return list(targets)


class TargetBatch:
    """Every image's targets as tensors, so one batched loss serves per-image layouts.

    `columns`: the token positions any target reads (the loss gathers only those); `weights`
    [B, K, C]: 1/n for the n tokens of image b's k-th target, 0 elsewhere (K = the most targets
    of any image; images with fewer have all-zero rows); `count` [B]: each image's number of
    targets. Masks are built once per attention-map grid and cached.
    """

    def __init__(self, targets: Sequence[Sequence[Target]]):
        self.targets = [list(t) for t in targets]
        self.columns = sorted({p for image in self.targets for t in image for p in t.positions})
        index = {p: i for i, p in enumerate(self.columns)}
        width = max((len(image) for image in self.targets), default=0)
        self.weights = torch.zeros(len(self.targets), width, len(self.columns))
        for b, image in enumerate(self.targets):
            for k, target in enumerate(image):
                for p in target.positions:
                    self.weights[b, k, index[p]] += 1.0 / len(target.positions)
        self.count = torch.tensor([max(len(image), 1) for image in self.targets], dtype=torch.float32)
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def masks(self, grid: tuple[int, int]) -> torch.Tensor:
        """[B, K, gh*gw] box masks of every image's targets on an attention-map grid."""
        if grid not in self._masks:
            masks = torch.zeros(*self.weights.shape[:2], grid[0] * grid[1])
            for b, image in enumerate(self.targets):
                for k, target in enumerate(image):
                    masks[b, k] = box_mask(target.boxes, *grid).flatten()
            self._masks[grid] = masks
        return self._masks[grid]

    def select(self, rows: torch.Tensor) -> TargetBatch:
        """The targets of the images `rows` (indices), e.g. those still being guided."""
        return TargetBatch([self.targets[i] for i in rows.tolist()])


def attention_loss(maps: dict[str, torch.Tensor],
                   targets: Sequence[Target] | Sequence[Sequence[Target]] | TargetBatch,
                   latent_hw: tuple[int, int]) -> torch.Tensor:
    """Unscaled loss per image, shape [batch]; `maps` hold [batch, heads, HW, tokens] tensors.

    `targets`: one list shared by every image, one list per image, or a TargetBatch. Per image:
    the mean over its targets and maps of each target's mean over tokens of (1 - act)^2.
    """
    batch_size = next(iter(maps.values())).shape[0]
    batch = targets if isinstance(targets, TargetBatch) else TargetBatch(_per_image(targets, batch_size))
    columns = batch.columns
    total = 0.0
    for probs in maps.values():
        grid = map_grid(probs.shape[2], latent_hw)
        weights = batch.weights.to(probs)
        token_maps = probs if probs.shape[-1] == len(columns) else probs[..., columns]  # [B, h, HW, C]
        inside = torch.einsum("bhpc,bkp->bhkc", token_maps, batch.masks(grid).to(probs))
        act = inside / token_maps.sum(2)[:, :, None]  # [B, heads, K, C]
        total = total + (((1 - act) ** 2).mean(1) * weights).sum((1, 2))
    return total / (batch.count.to(total) * len(maps))


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
    """Run the UNet only as far as the last recorded map; return the maps with their graph.

    The UNet's parameters are frozen for the pass (and restored after): the loss is
    differentiated w.r.t. the latents only, and with trainable weights autograd would also
    keep every linear layer's input for a weight gradient nobody asks for.
    """
    previous_mode, recorder.mode = recorder.mode, "guide"
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
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
        for parameter in trainable:
            parameter.requires_grad_(True)
    return recorder.take()


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None on other C libraries."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the memory freed by a guidance step's graph back to the system.

    glibc keeps freed heap memory for reuse, but the plain steps and the VAE decode that follow
    allocate differently sized blocks, so on the mid benchmark model the freed graph stayed
    resident (about 50 MB) on top of the decode's peak. Trimming after each guided step costs
    well under a millisecond per step. A no-op where glibc is not the C library.
    """
    trim = _malloc_trim() if not torch.cuda.is_initialized() else None
    if trim is not None:
        trim(0)


class GuidedStep(NamedTuple):
    """What one guided denoising step did.

    losses: each iteration's unscaled loss, the mean over the images it guided, measured before
    its update. image_losses: per image, its own losses of this step (empty if not guided).
    done: per image, whether its last loss was at or below the threshold; converged: all are.
    Under the official stopping rule an image that is done is not guided again.
    """

    latents: torch.Tensor
    losses: list[float]
    converged: bool
    image_losses: list[list[float]]
    done: torch.Tensor


def guide_step(unet, scheduler, recorder: AttentionRecorder, latents: torch.Tensor,
               step_index: int, cond_embeds: torch.Tensor,
               targets: Sequence[Target] | Sequence[Sequence[Target]] | TargetBatch,
               config: GuidanceConfig, cross_attention_kwargs: dict | None = None,
               active: torch.Tensor | None = None) -> GuidedStep:
    """Guidance iterations of one denoising step for the images in `active` (default: all).

    Each image iterates, at least once, until its own loss is at most the threshold or
    `max_iterations` ran; an image that met the threshold leaves the batch, so it is neither
    updated nor computed again, and no image's loss decides another's guidance. Each pass runs
    the UNet on the images still iterating only. No graph survives an iteration.
    """
    batch = targets if isinstance(targets, TargetBatch) else TargetBatch(_per_image(targets, len(latents)))
    timestep = scheduler.timesteps[step_index]
    scale = update_scale(scheduler, step_index, timestep)
    running = (torch.ones(len(latents), dtype=torch.bool) if active is None else active.clone().cpu())
    done = torch.zeros(len(latents), dtype=torch.bool)
    image_losses: list[list[float]] = [[] for _ in range(len(latents))]
    losses = []
    latents = latents.detach().clone()
    for _ in range(config.max_iterations):
        rows = running.nonzero().flatten()
        if not len(rows):
            break
        subset = batch if len(rows) == len(latents) else batch.select(rows)
        z = latents[rows.to(latents.device)].requires_grad_(True)
        with torch.enable_grad():
            maps = guided_pass(unet, recorder, scheduler.scale_model_input(z, timestep),
                               timestep, cond_embeds[rows.to(cond_embeds.device)], cross_attention_kwargs)
            loss = attention_loss(maps, subset, tuple(z.shape[-2:]))
            del maps  # the graph lives in `loss` only, and is freed by the backward pass
            (grad,) = torch.autograd.grad(loss.sum() * config.loss_scale, z)
        latents[rows.to(latents.device)] = (z - grad * scale).detach()
        values = loss.detach().cpu()
        losses.append(float(values.mean()))
        for row, value in zip(rows.tolist(), values.tolist()):
            image_losses[row].append(value)
        met = values <= config.loss_threshold
        done[rows[met]] = True
        running[rows[met]] = False
    guided = (torch.ones(len(latents), dtype=torch.bool) if active is None else active.cpu())
    release_freed_memory()
    return GuidedStep(latents, losses, bool(done[guided].all()), image_losses, done)
