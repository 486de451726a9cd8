"""Plain generation with learned concepts: load embeddings into a stock pipeline, write PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from compinv.artifacts import EMBEDDINGS_FILE, atomic_write_text, output_folder, save_image
from compinv.config import GenerateConfig
from compinv.errors import CompinvError
from compinv.models import load_pipeline
from compinv.versions import library_versions


def resolve_embeddings_file(path: str | Path) -> Path:
    """Accept a `learned_embeds.safetensors` file or a training run folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / EMBEDDINGS_FILE
    if not path.is_file():
        raise CompinvError(f"--embeddings {path}: no such file; pass learned_embeds.safetensors "
                           "or the --out folder of a training run")
    return path


def load_embeddings(pipe: StableDiffusionPipeline, files: list[str | Path]) -> list[str]:
    """Load each file with diffusers' own `load_textual_inversion`; return the tokens added."""
    before = set(pipe.tokenizer.get_vocab())
    for file in files:
        path = resolve_embeddings_file(file)
        try:
            pipe.load_textual_inversion(str(path))
        except (ValueError, OSError) as exc:
            raise CompinvError(f"--embeddings {path}: cannot be loaded ({exc})") from exc
    return sorted(set(pipe.tokenizer.get_vocab()) - before)


def generate(config: GenerateConfig) -> list[Path]:
    """Generate `num_images` images of `prompt`; image i uses seed + i. Returns the PNG paths."""
    cfg = config.resolved()
    with output_folder(cfg.out, "--out") as out:
        return _generate(cfg, out)


def _generate(cfg: GenerateConfig, out: Path) -> list[Path]:
    pipe = load_pipeline(cfg.model)
    tokens = load_embeddings(pipe, cfg.embeddings)
    paths = []
    for i in range(cfg.num_images):
        generator = torch.Generator(device=pipe.device).manual_seed(cfg.seed + i)
        image = pipe(
            cfg.prompt, negative_prompt=cfg.negative_prompt, num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width,
            generator=generator,
        ).images[0]
        paths.append(save_image(image, out / f"{i:04d}.png"))
    record = {
        "config": {k: v for k, v in vars(cfg).items()},
        "tokens_loaded": tokens,
        "scheduler": type(pipe.scheduler).__name__,
        "images": [p.name for p in paths],
        "versions": library_versions(),
    }
    atomic_write_text(out / "generation.json", json.dumps(record, indent=2))
    return paths
