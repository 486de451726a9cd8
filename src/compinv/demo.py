"""`compinv demo`: the whole train → generate path, offline, on a CPU, in about a minute.

Until the toy world (a small trained text-to-image model shipped with the project) lands, the
demo runs on a tiny *random* SD-shaped model built on the spot: it exercises every step a user
runs on real weights (vanilla TI vs. semantic inversion, then generation with the learned token)
and prints how far each learned vector ended from its anchor word, but its images are noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from compinv.artifacts import atomic_write_text, ensure_writable_dir
from compinv.config import GenerateConfig, TrainConfig
from compinv.generate import generate
from compinv.methods.textual_inversion import train_textual_inversion
from compinv.models import load_pipeline, save_tiny_model

TOKEN = "<demo-cat>"
PROMPT = f"a photo of {TOKEN} and a backpack on the beach"


def write_demo_images(folder: Path, n: int = 4, size: int = 64) -> Path:
    """A red square on a noisy background, n slightly shifted views: the demo's 'user photos'."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
        lo = size // 4 + i
        pixels[lo : lo + size // 2, lo : lo + size // 2] = (220, 40, 40)
        Image.fromarray(pixels).save(folder / f"view{i}.png")
    return folder


def _anchor_distance(run: Path, model: Path, word: str) -> float:
    pipe = load_pipeline(model)
    row = pipe.text_encoder.get_input_embeddings().weight[
        pipe.tokenizer(word, add_special_tokens=False).input_ids[0]]
    vectors = load_file(str(run / "learned_embeds.safetensors"))[TOKEN]
    return float((vectors - row.detach()).norm(dim=1).mean())


def run_demo(out: Path, steps: int = 100) -> Path:
    """Train vanilla TI and TI + semantic inversion on the same images, then generate with both."""
    out = ensure_writable_dir(out, "--out")
    model = out / "tiny-model"
    if not (model / "model_index.json").is_file():
        save_tiny_model(model)
    images = write_demo_images(out / "concept-images")
    print(f"demo: model = a tiny random SD-1.x-shaped pipeline at {model} (the trained toy model "
          "is not shipped yet, so images are noise; the pipeline and files are the real ones)")
    summary = {}
    for name, settings in {"vanilla-ti": {"no_anchor": True}, "semantic-ti": {}}.items():
        run = out / name
        torch.manual_seed(0)
        train_textual_inversion(TrainConfig(
            model=str(model), images=str(images), token=TOKEN, class_word="cat", steps=steps,
            batch_size=2, grad_accum=1, resolution=64, out=str(run), checkpoint_every=0,
            save_every=0, validation_every=0, **settings))
        generate(GenerateConfig(model=str(model), embeddings=[str(run)], prompt=PROMPT,
                                num_images=2, steps=20, out=str(run / "images")))
        summary[name] = {"distance_to_anchor_cat": _anchor_distance(run, model, "cat"),
                         "images": str(run / "images")}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(f"{'variant':<14}{'distance to anchor':>20}  images")
    for name, row in summary.items():
        print(f"{name:<14}{row['distance_to_anchor_cat']:>20.4f}  {row['images']}")
    return out
