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


def test_shipped_toy_concept_files_are_what_the_code_generates():
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from compinv.toy.concepts import CONCEPTS, IMAGES_PER_CONCEPT, render_concept

    folder = Path(__file__).parent.parent / "examples" / "toy-concepts"
    index = json.loads((folder / "concepts.json").read_text())
    assert sorted(index["concepts"]) == sorted(c.name for c in CONCEPTS)
    for concept in CONCEPTS:
        files = sorted((folder / concept.name).glob("*.png"))
        assert len(files) == IMAGES_PER_CONCEPT
        shipped = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        assert np.array_equal(shipped, render_concept(concept, seed=index["seed"]))
