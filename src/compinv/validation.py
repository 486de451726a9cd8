"""Validation images: what the concept looks like now, with the weights being trained.

Made with diffusers' own `StableDiffusionPipeline` over the live modules (no copy), with a
DPM-Solver scheduler so that a handful of steps gives a recognisable picture.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Paste rows of equally sized images into one picture."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * w, r * h))
    return grid


def validation_grid(pipe: StableDiffusionPipeline, text_encoder: torch.nn.Module,
                    prompts: list[str], expand: Callable[[str], str], num_images: int, steps: int,
                    resolution: int, seed: int) -> Image.Image:
    """One row per prompt, `num_images` seeds (seed + i) per row; modules keep their train mode."""
    validation = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(pipe.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    validation.set_progress_bar_config(disable=True)
    modes = [(m, m.training) for m in (text_encoder, pipe.unet)]
    for module, _ in modes:
        module.eval()
    try:
        with torch.no_grad():
            rows = [[validation(expand(prompt), num_inference_steps=steps, height=resolution,
                                width=resolution,
                                generator=torch.Generator(device="cpu").manual_seed(seed + i)).images[0]
                     for i in range(num_images)] for prompt in prompts]
    finally:
        for module, training in modes:
            module.train(training)
    return image_grid(rows)
