"""What the run looks like now, with the weights being trained: validation images, and the
diagnostics of the paper's two failure signs (docs/diagnostics.md) as numbers for TensorBoard.

Everything runs through diffusers' own `StableDiffusionPipeline` over the live modules (no
copy), with a DPM-Solver scheduler so that a handful of steps gives a recognisable picture.
Prompts keep the concept's first token name; diffusers writes its other vectors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image

from compinv.diagnostics import VocabularyStats, attention_shares
from compinv.tokens import ConceptToken


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Paste rows of equally sized images into one picture."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * w, r * h))
    return grid


@contextmanager
def live_pipeline(pipe: StableDiffusionPipeline, text_encoder: torch.nn.Module) -> Iterator[StableDiffusionPipeline]:
    """A pipeline over the modules being trained, in eval mode for the block (then restored)."""
    live = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(pipe.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    live.set_progress_bar_config(disable=True)
    modes = [(m, m.training) for m in (text_encoder, pipe.unet)]
    for module, _ in modes:
        module.eval()
    try:
        with torch.no_grad():
            yield live
    finally:
        for module, training in modes:
            module.train(training)


def validation_grid(live: StableDiffusionPipeline, prompts: list[str], num_images: int, steps: int,
                    resolution: int, seed: int) -> Image.Image:
    """One row per prompt, `num_images` seeds (seed + i) per row."""
    return image_grid([[live(prompt, num_inference_steps=steps, height=resolution, width=resolution,
                             generator=torch.Generator(device="cpu").manual_seed(seed + i)).images[0]
                        for i in range(num_images)] for prompt in prompts])


def concept_scalars(live: StableDiffusionPipeline, stats: VocabularyStats, tokens: list[ConceptToken],
                    prompts: list[str], steps: int, seed: int) -> dict[str, float]:
    """TensorBoard scalars: each learned vector's out-of-distribution score and norm percentile
    (the paper's Figure 2), and on each validation prompt the concept's and the padding's share
    of cross-attention (its Figure 3: a concept that takes a growing share crowds the rest out)."""
    table = live.text_encoder.get_input_embeddings().weight
    scalars = {}
    for token in tokens:
        for name, row in zip(token.names, table[list(token.ids)]):
            report = stats.report(name, row)
            scalars[f"ood_score/{name}"] = report.ood_score
            scalars[f"norm_percentile/{name}"] = report.norm_percentile
    concept_names = {n for t in tokens for n in t.names}
    for k, prompt in enumerate(prompts):
        shares = attention_shares(live, prompt, steps, seeds=(seed,))
        scalars[f"attention_share/prompt{k}/concept"] = sum(
            s.share for s in shares if s.token in concept_names)
        scalars[f"attention_share/prompt{k}/other_words"] = sum(
            s.share for s in shares if s.kind == "word" and s.token not in concept_names)
        scalars[f"attention_share/prompt{k}/padding"] = sum(s.share for s in shares if s.kind == "padding")
    return scalars
