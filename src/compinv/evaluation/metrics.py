"""The paper's metrics over `Sample`s, with real metric models through transformers.

Every metric has the same shape: `columns` it fills and `score(samples, images)` returning one
array per column ([N], NaN where a sample has nothing to score), so the evaluator, the protocol
runner and the report treat CLIP, DINO, a detector and the toy classifier alike.

Scales (always reported with the backbone, since papers differ):
- `clip_t`: raw cosine of CLIP image and plain-prompt text embeddings (DreamBench's CLIP-T);
- `clip_score`: 2.5 * max(cos, 0), CLIPScore as in the paper and CustomConcept101
  (torchmetrics' CLIPScore is 100 * max(cos, 0): divide by 40);
- `clip_i`, `dino`: mean raw cosine to the concept's references;
- `inclusion`: 1 when every object of the sample is detected, else 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from compinv.data import load_images
from compinv.evaluation.defaults import DEFAULT_CLIP, DEFAULT_DINO
from compinv.evaluation.loading import features, load_pretrained, metric_device
from compinv.evaluation.samples import Sample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Metric(Protocol):
    """Scores of a batch of samples; `describe()` says backbone and scale for the reports."""

    columns: tuple[str, ...]

    def score(self, samples: Sequence[Sample], images: Sequence[Image.Image]) -> dict[str, np.ndarray]: ...

    def describe(self) -> dict[str, str]: ...


def check_inputs(metric: Metric, samples: Sequence[Sample]) -> None:
    """A metric's own input checks (`check(samples)`, optional), run before any image is scored."""
    check = getattr(metric, "check", None)
    if check is not None:
        check(samples)


def batches(items: Sequence, size: int, label: str):
    """Consecutive slices of `items`, with a progress bar on stderr."""
    starts = range(0, len(items), size)
    for start in tqdm(starts, desc=label, leave=False, disable=len(starts) < 2):
        yield items[start : start + size]


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class ReferenceCache:
    """Reference embeddings per reference set: 80 prompts share one concept's 5-20 photos."""

    def __init__(self, embed):
        self.embed = embed
        self._cache: dict[tuple[str, ...], torch.Tensor] = {}

    def __call__(self, references: tuple) -> torch.Tensor:
        key = tuple(map(str, references))
        if key not in self._cache:
            self._cache[key] = self.embed([_open(p) for p in references])
        return self._cache[key]


def _open(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def mean_reference_similarity(embeddings: torch.Tensor, samples: Sequence[Sample],
                              references: ReferenceCache) -> np.ndarray:
    """Mean cosine of each image to its sample's references (NaN without references)."""
    out = np.full(len(samples), np.nan)
    for i, sample in enumerate(samples):
        if sample.references:
            out[i] = float((references(sample.references) @ embeddings[i]).mean())
    return out


class ClipMetrics:
    """Text alignment (raw and CLIPScore) and CLIP-I with one CLIP model."""

    columns = ("clip_t", "clip_score", "clip_i")

    def __init__(self, model: str = DEFAULT_CLIP, batch_size: int = 32, device=None):
        from transformers import CLIPModel, CLIPProcessor

        self.name = model
        self.device = device or metric_device()
        self.model = load_pretrained(CLIPModel, model, "clip_model").to(self.device).eval()
        self.processor = load_pretrained(CLIPProcessor, model, "clip_model")
        self.batch_size = batch_size
        self.references = ReferenceCache(self.embed_images)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for chunk in batches(images, self.batch_size, "CLIP images"):
            pixels = self.processor(images=list(chunk), return_tensors="pt")["pixel_values"]
            out.append(unit(features(self.model.get_image_features(
                pixel_values=pixels.to(self.device)))).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for chunk in batches(texts, self.batch_size, "CLIP texts"):
            tokens = self.processor(text=list(chunk), return_tensors="pt", padding=True,
                                    truncation=True)
            out.append(unit(features(self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device)))).float().cpu())
        return torch.cat(out)

    def score(self, samples: Sequence[Sample], images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        image_emb = self.embed_images(images)
        text_emb = self.embed_texts([s.plain_prompt for s in samples])
        cos = (image_emb * text_emb).sum(-1).numpy().astype(np.float64)
        return {"clip_t": cos, "clip_score": 2.5 * np.maximum(cos, 0.0),
                "clip_i": mean_reference_similarity(image_emb, samples, self.references)}

    def describe(self) -> dict[str, str]:
        return {"clip_t": f"raw cosine, image vs plain prompt, {self.name}",
                "clip_score": f"2.5 * max(cosine, 0) (CLIPScore), {self.name}",
                "clip_i": f"mean cosine to the references, {self.name}"}


def dino_preprocess(image: Image.Image, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """CustomConcept101's DINO transform: shorter side to 256 (bicubic), centre crop 224,
    ImageNet normalisation. [3, crop, crop]."""
    w, h = image.size
    scale = resize / min(w, h)
    image = image.convert("RGB").resize((max(resize, round(w * scale)), max(resize, round(h * scale))),
                                        Image.BICUBIC)
    w, h = image.size
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (pixels - mean) / std


class DinoMetric:
    """Image alignment with a self-supervised ViT's [CLS] feature (any transformers ViT/DINOv2)."""

    columns = ("dino",)

    def __init__(self, model: str = DEFAULT_DINO, batch_size: int = 32, device=None):
        from transformers import AutoModel

        self.name = model
        self.device = device or metric_device()
        self.model = load_pretrained(AutoModel, model, "dino_model").to(self.device).eval()
        self.batch_size = batch_size
        self.references = ReferenceCache(self.embed_images)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for chunk in batches(images, self.batch_size, "DINO images"):
            pixels = torch.stack([dino_preprocess(im) for im in chunk]).to(self.device)
            hidden = self.model(pixel_values=pixels).last_hidden_state
            out.append(unit(hidden[:, 0]).float().cpu())
        return torch.cat(out)

    def score(self, samples: Sequence[Sample], images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        return {"dino": mean_reference_similarity(self.embed_images(images), samples, self.references)}

    def describe(self) -> dict[str, str]:
        return {"dino": f"mean cosine of [CLS] features to the references, {self.name} "
                        "(resize 256, centre crop 224)"}


def reference_images(folder: str | Path, argument: str = "references") -> tuple[Path, ...]:
    """The readable image files of a reference folder; a missing, empty or unreadable folder is
    an error naming `argument` (load_images' checks and messages)."""
    load_images(folder, f"`{argument}`", "the concept's reference photos")
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    return tuple(p for p in files if _readable(p))


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # noqa: BLE001 - load_images already warned about this file
        return False
