"""Generation with learned concepts: load embeddings, optionally guide a layout, write PNGs.

Images come from `CompositionalStableDiffusionPipeline`, which without a layout is exactly
diffusers' `StableDiffusionPipeline`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw

from compinv.artifacts import EMBEDDINGS_FILE, atomic_write_text, output_folder, save_image
from compinv.concepts import load_concepts
from compinv.config import GenerateConfig
from compinv.errors import CompinvError
from compinv.methods.textual_inversion import load_embedding_file
from compinv.models import load_pipeline
from compinv.pipeline import CompositionalStableDiffusionPipeline, use_scheduler
from compinv.spatial.layout import Box, layout_to_json, parse_box_flag, resolve_layout
from compinv.versions import library_versions


def resolve_embeddings_file(path: str | Path) -> Path:
    """Accept a `learned_embeds.safetensors` file or a training run folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / EMBEDDINGS_FILE
    if not path.is_file():
        raise CompinvError(f"`embedding_files` {path}: no such file; pass learned_embeds.safetensors "
                           "or the --out folder of a training run")
    return path


def load_embeddings(pipe: StableDiffusionPipeline, files: list[str | Path]) -> list[str]:
    """Load each file with diffusers' own `load_textual_inversion`; return the tokens added."""
    return [t for file in files
            for t in load_embedding_file(pipe, resolve_embeddings_file(file), Path(file),
                                         "embedding_files")]


def generate(config: GenerateConfig) -> list[Path]:
    """Generate `num_images` images of `prompt`, `batch_size` per pipeline call (guidance runs
    a call's images, each with its own layout, in one UNet pass); image i uses seed + i whatever
    the batch, so any image can be remade alone. Returns the PNG paths."""
    cfg = config.resolved()
    layout = _layout_request(cfg)
    with output_folder(cfg.out) as out:
        return _generate(cfg, out, layout)


def _layout_request(cfg: GenerateConfig) -> dict:
    """The pipeline's layout/phrases/guidance arguments for these flags, checked before loading."""
    if cfg.box:
        request = {"layout": resolve_layout([parse_box_flag(spec) for spec in cfg.box]),
                   "guidance": cfg.guidance()}
    elif cfg.layout == "auto":
        request = {"layout": resolve_layout(cfg.layout, cfg.phrase), "guidance": cfg.guidance()}
    elif cfg.layout:
        request = {"layout": cfg.layout, "phrases": cfg.phrase, "guidance": cfg.guidance()}
        if cfg.layout == "learned":
            from compinv.spatial.layout_model import load_layout_model

            request.update(layout_model=load_layout_model(cfg.layout_model),
                           layout_temperature=cfg.layout_temperature)
    else:
        request = {"phrases": cfg.phrase} if cfg.phrase else {}
    if cfg.save_attention:
        request["return_attention"] = True
    return request


def _generate(cfg: GenerateConfig, out: Path, layout: dict) -> list[Path]:
    pipe = CompositionalStableDiffusionPipeline.from_pipe(load_pipeline(cfg.model))
    pipe.set_progress_bar_config(disable=True)
    use_scheduler(pipe, cfg.scheduler)
    tokens = load_concepts(pipe, cfg.concept) + load_embeddings(pipe, cfg.embeddings)
    if cfg.anchors:
        pipe.concept_anchors = {**getattr(pipe, "concept_anchors", {}),
                                **dict(_anchor_flag(spec) for spec in cfg.anchors)}
    paths, losses, heat_maps, layouts, pictures = [], [], [], [], []
    for start in range(0, cfg.num_images, cfg.batch_size):
        indices = range(start, min(start + cfg.batch_size, cfg.num_images))
        generators = [torch.Generator(device=pipe.device).manual_seed(cfg.seed + i) for i in indices]
        result = pipe(
            cfg.prompt, negative_prompt=cfg.negative_prompt, num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width,
            num_images_per_prompt=len(indices), generator=generators, **layout,
        )
        for j, i in enumerate(indices):
            image = result.images[j]
            paths.append(save_image(image, out / f"{i:04d}.png"))
            if not layout:
                continue
            image_layout = result.layouts[j] if result.layouts else []
            if result.layouts:
                layouts.append(image_layout)
                losses.append(result.image_guidance_losses[j])
            heat_maps += _save_heat_maps(image, result, j, image_layout, out, i)
            if cfg.save_layout:
                pictures.append(save_image(layout_picture(image, image_layout), out / f"layout-{i:04d}.png"))
    record = {
        "config": {k: v for k, v in vars(cfg).items()},
        "tokens_loaded": tokens,
        "scheduler": type(pipe.scheduler).__name__,
        "images": [p.name for p in paths],
        "layout": (layout_to_json(layouts[0]) if layouts and all(x == layouts[0] for x in layouts)
                   else None),
        "layouts": [layout_to_json(x) for x in layouts] if layouts else None,
        "guidance_losses": losses if layouts else None,
        "attention_maps": [p.name for p in heat_maps],
        "layout_pictures": [p.name for p in pictures],
        "versions": library_versions(),
    }
    atomic_write_text(out / "generation.json", json.dumps(record, indent=2))
    return paths


def _save_heat_maps(image: Image.Image, result, row: int, layout, out: Path, index: int) -> list[Path]:
    """attention-<image>-<phrase>.png for each phrase of batch row `row`, when attention maps
    were asked for."""
    if not result.attention_maps:
        return []
    boxes = dict(layout)
    paths = []
    for k, (phrase, heat) in enumerate(result.attention_maps.items()):
        picture = heat_map_picture(image, heat[row].numpy(), boxes.get(phrase, ()))
        slug = "".join(c if c.isalnum() else "-" for c in phrase).strip("-") or str(k)
        paths.append(save_image(picture, out / f"attention-{index:04d}-{k}-{slug}.png"))
    return paths


def _anchor_flag(spec: str) -> tuple[str, str]:
    token, _, words = spec.partition("=")
    return token.strip(), " ".join(words.split())


LAYOUT_COLOURS = ((255, 60, 60), (60, 200, 255), (255, 220, 0), (120, 255, 120), (255, 120, 255))


def layout_picture(image: Image.Image, layout, scale: int = 0) -> Image.Image:
    """The image with each phrase's boxes outlined in its own colour and labelled; small images
    are enlarged (nearest neighbour) so the labels stay readable."""
    picture = image.convert("RGB")
    scale = scale or max(1, 256 // max(picture.size))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    w, h = picture.size
    for k, (phrase, boxes) in enumerate(layout):
        colour = LAYOUT_COLOURS[k % len(LAYOUT_COLOURS)]
        for x0, y0, x1, y1 in boxes:
            draw.rectangle([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], outline=colour, width=2)
            draw.text((x0 * w + 3, y0 * h + 2), phrase, fill=colour)
    return picture


def heat_map_picture(image: Image.Image, heat: np.ndarray, boxes: tuple[Box, ...] = ()) -> Image.Image:
    """The image dimmed, with `heat` ([H, W] in [0, 1]) as a dark-blue-to-red overlay and the
    phrase's boxes outlined, so one sees where a concept's attention went."""
    anchors = np.array([0.0, 0.33, 0.66, 1.0])
    colours = np.array([[0, 0, 80], [0, 160, 255], [255, 230, 0], [255, 0, 0]], dtype=float)
    rgb = np.stack([np.interp(heat, anchors, colours[:, c]) for c in range(3)], -1)
    base = np.asarray(image.convert("RGB"), dtype=float)
    picture = Image.fromarray((0.35 * base + 0.65 * rgb).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    w, h = picture.size
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], outline=(255, 255, 255))
    return picture
