"""Toy text-to-image model training: both phases run, resume is exact, the folder is stock SD."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

import compinv.toy.model as toy_model
from compinv.errors import CompinvError
from compinv.toy.model import ToyModelSettings, train_toy_model

SMALL = ToyModelSettings(vae_steps=3, steps=4, batch_size=4, vae_batch_size=4,
                         unet_channels=(32, 64), text_hidden=32, text_layers=1)


class _Interrupt(Exception):
    pass


def _interrupting_tqdm(after: int):
    """A tqdm stand-in that stops the run after `after` updates in all, like a killed job."""
    count = {"n": 0}

    class Bar:
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n):
            count["n"] += n
            if count["n"] >= after:
                raise _Interrupt

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    return Bar


def _weights(folder):
    return {name: load_file(str(folder / "training" / f"{name}.safetensors"))
            for name in ("vae", "unet", "text_encoder")}


def test_training_resumes_exactly_where_it_stopped(tmp_path, monkeypatch):
    whole = train_toy_model(tmp_path / "whole", SMALL, checkpoint_every=1, progress=False)
    assert (whole.out / "model_index.json").is_file()

    with monkeypatch.context() as patch:  # killed in phase 2, after its second step
        patch.setattr(toy_model, "tqdm", _interrupting_tqdm(SMALL.vae_steps + 2))
        with pytest.raises(_Interrupt):
            train_toy_model(tmp_path / "cut", SMALL, checkpoint_every=1, progress=False)
    train_toy_model(tmp_path / "cut", SMALL, resume=True, checkpoint_every=1, progress=False)

    expected, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    for name in expected:
        for key, value in expected[name].items():
            assert torch.equal(value, resumed[name][key]), f"{name}.{key} differs after resume"


def test_saved_model_is_fp16_and_loads_in_stock_diffusers(tmp_path):
    run = train_toy_model(tmp_path / "run", SMALL, checkpoint_every=0, progress=False)
    stored = load_file(str(run.out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    pipe = StableDiffusionPipeline.from_pretrained(run.out)  # no dtype: must not mix fp16 and fp32
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the trained autoencoder
    image = pipe("a red star on sand", num_inference_steps=2, guidance_scale=3.0, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_fresh_run_refuses_an_existing_run_and_resume_refuses_other_settings(tmp_path):
    train_toy_model(tmp_path / "run", SMALL, checkpoint_every=0, progress=False)
    with pytest.raises(CompinvError, match="pass --resume"):
        train_toy_model(tmp_path / "run", SMALL, progress=False)
    other = ToyModelSettings(**{**SMALL.__dict__, "steps": 5})
    with pytest.raises(CompinvError, match="steps=4"):
        train_toy_model(tmp_path / "run", other, resume=True, progress=False)


def test_training_captions_include_inversion_templates():
    from compinv.toy.model import training_caption
    from compinv.toy.world import sample_scenes

    scene = sample_scenes(1, "train", 3)[0]
    world, template, bare = (training_caption(scene, d, 0) for d in (0.1, 0.8, 0.95))
    assert world.endswith(("on grass", "on sand", "on snow", "at night"))
    assert template.startswith("a photo of a ") and template.endswith(world.split()[-1])
    assert bare.startswith(("a ", "an ")) and "on " not in bare and "at night" not in bare
