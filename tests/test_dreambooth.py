"""DreamBooth (full and LoRA) with semantic inversion and prior preservation on the tiny model."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from compinv.methods.dreambooth import DreamBoothConfig
from compinv.methods.dreambooth import LORA_WEIGHTS_NAME
from compinv.training import train


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from helpers import write_concept_images

    return write_concept_images(tmp_path_factory.mktemp("img") / "concept")


def db_config(model, images, out, **overrides) -> DreamBoothConfig:
    settings = dict(model=str(model), images=str(images), token="<dog1>", class_word="dog",
                    init_word="cat", out=str(out), steps=2, resolution=32, checkpoint_every=0,
                    save_every=0, validation_every=0, seed=1, lr=1e-3)
    settings.update(overrides)
    return DreamBoothConfig(**settings)


@pytest.fixture(scope="module")
def prior_run(tiny_model, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("db") / "run"
    return train(db_config(tiny_model, images, out, prior_weight=1.0,
                                      num_class_images=2, class_image_steps=2, num_vectors=2))


def test_prior_preservation_generates_and_caches_class_images(prior_run, tiny_model, images):
    assert prior_run.last_losses["prior"] > 0 and prior_run.last_losses["anchor"] > 0
    folder = prior_run.out / "class_images" / "photo-of-a-dog"
    pngs = sorted(folder.glob("class-*.png"))
    assert len(pngs) == 2
    stamps = [p.stat().st_mtime_ns for p in pngs]
    (pngs[1]).unlink()  # as if the run had been killed while generating
    again = train(db_config(tiny_model, images, prior_run.out, prior_weight=1.0,
                                       num_class_images=2, class_image_steps=2, num_vectors=2,
                                       steps=1, overwrite=True))
    assert again.steps == 1
    assert pngs[0].stat().st_mtime_ns == stamps[0] and pngs[1].is_file()


def test_saved_pipeline_reloads_with_matching_vocabulary(prior_run, tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(prior_run.artifact, local_files_only=True)
    rows = pipe.text_encoder.get_input_embeddings().weight.shape[0]
    assert len(pipe.tokenizer) == rows
    assert {"<dog1>", "<dog1>_1"} <= set(pipe.tokenizer.get_vocab())
    ids = pipe.tokenizer(pipe.maybe_convert_prompt("a <dog1>", pipe.tokenizer)).input_ids
    assert len(ids) == 2 + 1 + 2, "the saved tokenizer expands the token to both vectors"
    base = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    changed = [k for k, v in base.unet.state_dict().items()
               if not torch.equal(v, pipe.unet.state_dict()[k])]
    assert changed, "the whole UNet is trained"
    n = base.text_encoder.get_input_embeddings().weight.shape[0]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[:n],
                       base.text_encoder.get_input_embeddings().weight)


def test_real_class_images_with_captions_and_text_encoder(tiny_model, images, tmp_path):
    from helpers import write_concept_images

    classes = write_concept_images(tmp_path / "classes", n=2, seed=5)
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog on grass\na dog indoors\n")
    result = train(db_config(tiny_model, images, tmp_path / "run", prior_weight=1.0,
                                        class_images=str(classes), class_prompt=str(captions),
                                        train_text_encoder=True))
    assert result.last_losses["prior"] > 0
    assert not (tmp_path / "run" / "class_images").exists()


def test_lora_saves_and_loads_in_stock_diffusers(tiny_model, images, tmp_path):
    result = train(db_config(tiny_model, images, tmp_path / "lora", lora=True,
                                        lora_rank=2, lr=1e-2))
    folder = result.artifact
    weights = load_file(str(folder / LORA_WEIGHTS_NAME))
    assert weights and all("lora" in k for k in weights)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    gen = lambda: pipe("a photo", num_inference_steps=2, height=32, width=32, output_type="pt",
                       generator=torch.Generator().manual_seed(0)).images
    pipe.set_progress_bar_config(disable=True)
    before = gen()
    pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS_NAME)
    pipe.load_textual_inversion(str(folder / "dog1.safetensors"))
    assert "<dog1>" in pipe.tokenizer.get_vocab()
    assert not torch.allclose(before, gen())


@pytest.mark.parametrize("lora", [False, True])
def test_resume_ends_with_the_same_weights(tiny_model, images, tmp_path, lora):
    common = dict(steps=4, checkpoint_every=2, lora=lora, lora_rank=2)
    whole = train(db_config(tiny_model, images, tmp_path / "whole", **common))
    train(db_config(tiny_model, images, tmp_path / "parts", **{**common, "steps": 2}))
    resumed = train(db_config(tiny_model, images, tmp_path / "parts", resume="latest",
                                         **common))
    assert resumed.steps == 4
    files = sorted(p.relative_to(whole.artifact)
                   for p in whole.artifact.rglob("*.safetensors"))
    assert files
    for name in files:
        a, b = (load_file(str(r.artifact / name)) for r in (whole, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
