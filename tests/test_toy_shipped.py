"""The shipped toy weights: the classifier meets its bar, the toy model is stock SD and draws."""

import torch
from diffusers import StableDiffusionPipeline

from compinv.toy.ablation import evaluate_toy_model
from compinv.toy.classifier import evaluate, load_classifier
from compinv.toy.model import SHIPPED_MODEL_DIR


def test_shipped_classifier_is_accurate_on_heldout_renders():
    metrics = evaluate(load_classifier(), n=1000, split="heldout")
    assert metrics["exact_set"] >= 0.98
    assert metrics["background"] >= 0.99


def test_shipped_toy_model_is_small_and_loads_in_stock_diffusers():
    size = sum(p.stat().st_size for p in SHIPPED_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 40 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    image = pipe("a photo of a red square on snow", num_inference_steps=25, guidance_scale=3.0,
                 generator=generator).images[0]
    assert image.size == (32, 32)
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
    assert pixels.std() > 10  # a picture, not a flat or black square


def test_shipped_toy_model_draws_the_captioned_background_and_colours():
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    scores = evaluate_toy_model(pipe, load_classifier(), n=64, seed=5)
    assert scores["background"] >= 0.9
    assert scores["colours_one"] >= 0.7
