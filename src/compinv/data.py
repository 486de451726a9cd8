"""Concept data: read the user's images robustly and turn them into deterministic batches.

Every random choice of a training sample (which image, which prompt template, flip, crop,
VAE sample, noise, timestep) comes from a generator seeded by (run seed, global sample index).
A sample is therefore the same whether the run was resumed, and whether the batch is split
over one process or several: resume and data-parallel runs reproduce a single-process run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from compinv.errors import CompinvError

log = logging.getLogger("compinv")

# The "a photo of a {}" object templates of Textual Inversion, used by the official code.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency on white, 16-bit scaled, CMYK/gray/palette converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_images(folder: str | Path, flag: str = "--images") -> list[Image.Image]:
    """Read every decodable image of a folder; skip (with a warning) what cannot be decoded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CompinvError(f"{flag} {folder}: no such folder; pass the folder with the concept's images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CompinvError(f"{flag} {folder}: the folder is empty; put 3-20 images of the concept in it")
    images = []
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
                images.append(to_rgb(img))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            log.warning("skipping %s: not a readable image (%s)", path, exc)
    if not images:
        raise CompinvError(f"{flag} {folder}: none of its {len(files)} files is a readable image "
                           "(PNG, JPEG, WebP, ...); add the concept's photos")
    return images


def resize_shorter_side(image: Image.Image, size: int) -> torch.Tensor:
    """Resize so the shorter side is `size`; returns a [3, H, W] tensor in [-1, 1]."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


def sample_generator(seed: int, index: int, salt: int = 0) -> torch.Generator:
    """A CPU generator owned by one training sample (see the module docstring)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7_919 + salt) % (2**63 - 1))


@dataclass
class Batch:
    """What the trainer needs for one micro-batch; `generators` seed the sample's noise."""

    pixels: torch.Tensor
    input_ids: torch.Tensor
    anchor_ids: torch.Tensor | None
    generators: list[torch.Generator]


class ConceptDataset:
    """The concept's images with Textual-Inversion prompts; `batch()` is a pure function of its indices."""

    def __init__(self, images: list[Image.Image], resolution: int, prompt_subject: str,
                 tokenizer, seed: int, placeholder_ids: tuple[int, ...], anchor_id: int | None,
                 center_crop: bool = True, flip_p: float = 0.5):
        self.pixels = [resize_shorter_side(im, resolution) for im in images]
        self.resolution = resolution
        self.subject = prompt_subject
        self.tokenizer = tokenizer
        self.seed = seed
        self.center_crop = center_crop
        self.flip_p = flip_p
        self.placeholder_ids = torch.tensor(placeholder_ids)
        self.anchor_id = anchor_id
        self._prompt_ids = self._tokenize([t.format(prompt_subject) for t in OBJECT_TEMPLATES])

    def __len__(self) -> int:
        return len(self.pixels)

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", truncation=True,
                              max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids

    def _image_index(self, index: int) -> int:
        """Sample `index` of an endless stream that visits every image once per epoch, shuffled."""
        epoch, offset = divmod(index, len(self.pixels))
        order = torch.randperm(len(self.pixels), generator=sample_generator(self.seed, epoch, salt=1))
        return int(order[offset])

    def _crop(self, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        _, h, w = pixels.shape
        size = self.resolution
        if self.center_crop:
            top, left = (h - size) // 2, (w - size) // 2
        else:
            top = int(torch.randint(0, h - size + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - size + 1, (1,), generator=gen))
        return pixels[:, top : top + size, left : left + size]

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = sample_generator(self.seed, index)
        pixels = self._crop(self.pixels[self._image_index(index)], gen)
        if float(torch.rand(1, generator=gen)) < self.flip_p:
            pixels = pixels.flip(-1)
        template = int(torch.randint(0, len(OBJECT_TEMPLATES), (1,), generator=gen))
        return pixels, self._prompt_ids[template]

    def anchor_ids_for(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The reference prompt: every placeholder vector's id replaced by the anchor word's id."""
        if self.anchor_id is None:
            return None
        is_placeholder = torch.isin(input_ids, self.placeholder_ids)
        return torch.where(is_placeholder, torch.full_like(input_ids, self.anchor_id), input_ids)

    def batch(self, indices: list[int]) -> Batch:
        pixels, ids = zip(*(self.sample(i) for i in indices))
        input_ids = torch.stack(ids)
        return Batch(
            pixels=torch.stack(pixels),
            input_ids=input_ids,
            anchor_ids=self.anchor_ids_for(input_ids),
            generators=[sample_generator(self.seed, i, salt=2) for i in indices],
        )
