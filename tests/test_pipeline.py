"""CompositionalStableDiffusionPipeline: stock behaviour without a layout, guidance with one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from compinv.errors import CompinvError
from compinv.models import build_tiny_pipeline
from compinv.pipeline import CompositionalStableDiffusionPipeline, use_scheduler
from compinv.spatial.options import GuidanceConfig
from compinv.tokens import add_concept_token, single_token_id

PROMPT = "a <cute-cat> and a backpack"
LAYOUT = {"<cute-cat>": (0.1, 0.2, 0.5, 0.8), "backpack": (0.6, 0.2, 0.95, 0.8)}
FAST = dict(num_inference_steps=4, height=32, width=32, output_type="np")
LIGHT = GuidanceConfig(guided_steps=2, max_iterations=2)


@pytest.fixture(scope="module")
def base():
    base = build_tiny_pipeline()
    base.set_progress_bar_config(disable=True)
    cat = single_token_id(base.tokenizer, "cat", "--init-word")
    add_concept_token(base.tokenizer, base.text_encoder, "<cute-cat>", 2, cat)
    return base


@pytest.fixture(scope="module")
def pipe(base):
    pipe = CompositionalStableDiffusionPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _seed():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("scheduler", ["lms", "euler-a"])
def test_without_layout_output_is_bit_identical_to_stock(base, pipe, scheduler):
    use_scheduler(pipe, scheduler)
    stock = StableDiffusionPipeline(**base.components)
    stock.scheduler = pipe.scheduler
    stock.set_progress_bar_config(disable=True)
    expected = stock(PROMPT, generator=_seed(), **FAST).images
    ours = pipe(PROMPT, generator=_seed(), **FAST)
    assert type(ours).__name__ == "StableDiffusionPipelineOutput"
    assert np.array_equal(ours.images, expected)
    off = pipe(PROMPT, generator=_seed(), layout=LAYOUT, guidance=GuidanceConfig(guided_steps=0), **FAST)
    assert np.array_equal(off.images, expected)  # guidance switched off: the stock loop untouched
    assert off.guidance_losses == [] and [p for p, _ in off.layout] == list(LAYOUT)


@pytest.mark.parametrize("scheduler", ["lms", "ddim", "dpm"])
def test_layout_guides_the_first_steps(pipe, scheduler):
    use_scheduler(pipe, scheduler)
    plain = pipe(PROMPT, generator=_seed(), **FAST).images
    seen_steps = []

    def user_callback(p, i, t, tensors):
        seen_steps.append(i)
        return {}

    out = pipe(PROMPT, generator=_seed(), layout=LAYOUT, guidance=LIGHT,
               callback_on_step_end=user_callback, **FAST)
    assert seen_steps == [0, 1, 2, 3]  # the user's callback still runs
    assert len(out.guidance_losses) == 2 and all(len(step) == 2 for step in out.guidance_losses)
    assert out.layout == [(p, (b,)) for p, b in LAYOUT.items()]
    assert np.isfinite(out.images).all() and not np.array_equal(out.images, plain)


def _guided(pipe, **guidance):
    return pipe(PROMPT, generator=_seed(), layout=LAYOUT, guidance=GuidanceConfig(**guidance), **FAST)


def test_official_rule_guides_no_step_after_the_first_that_meets_the_threshold(pipe):
    use_scheduler(pipe, "lms")
    settings = dict(guided_steps=3, max_iterations=2)
    losses = _guided(pipe, **settings, loss_threshold=0.0).guidance_losses  # never met
    threshold = losses[1][0]  # met by step 1's first iteration, not by step 0
    assert [len(step) for step in losses] == [2, 2, 2] and min(losses[0]) > threshold
    official = _guided(pipe, **settings, loss_threshold=threshold)  # the default rule
    assert official.guidance_losses == [losses[0], [threshold]]  # step 2 is not guided
    per_step = _guided(pipe, **settings, loss_threshold=threshold, stop_rule="per-step")
    assert per_step.guidance_losses[:2] == official.guidance_losses
    assert len(per_step.guidance_losses) == 3 and not np.array_equal(per_step.images, official.images)
    two_steps = _guided(pipe, guided_steps=2, max_iterations=2, loss_threshold=threshold)
    assert np.array_equal(official.images, two_steps.images)  # no hidden update after stopping


def test_threshold_met_at_once_official_guides_one_step_per_step_rule_all(pipe):
    use_scheduler(pipe, "lms")
    settings = dict(guided_steps=3, max_iterations=2, loss_threshold=1.0)  # the loss is <= 1
    official = _guided(pipe, **settings)
    per_step = _guided(pipe, **settings, stop_rule="per-step")
    assert [len(step) for step in official.guidance_losses] == [1]
    assert [len(step) for step in per_step.guidance_losses] == [1, 1, 1]
    assert per_step.guidance_losses[0] == official.guidance_losses[0]
    assert np.array_equal(official.images, _guided(pipe, **{**settings, "guided_steps": 1}).images)


def test_several_images_per_prompt(pipe):
    use_scheduler(pipe, "lms")
    out = pipe(PROMPT, generator=_seed(), layout=LAYOUT, guidance=LIGHT, num_images_per_prompt=2,
               return_attention=True, **FAST)
    assert out.images.shape[0] == 2 and out.attention_maps["backpack"].shape == (2, 32, 32)
    assert len(out.guidance_losses) == 2


def test_attention_maps_per_phrase(pipe):
    use_scheduler(pipe, "lms")
    out = pipe(PROMPT, generator=_seed(), layout="auto", phrases=["<cute-cat>", "backpack"],
               guidance=LIGHT, return_attention=True, **FAST)
    assert set(out.attention_maps) == {"<cute-cat>", "backpack"}
    for heat in out.attention_maps.values():
        assert heat.shape == (1, 32, 32) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    assert not torch.equal(out.attention_maps["<cute-cat>"], out.attention_maps["backpack"])
    look = pipe(PROMPT, generator=_seed(), phrases=["backpack"], return_attention=True, **FAST)
    assert look.guidance_losses is None and set(look.attention_maps) == {"backpack"}


@pytest.mark.parametrize("kwargs,message", [
    (dict(layout={"dog": (0.1, 0.2, 0.5, 0.8)}), "tokens are: a <cute-cat> <cute-cat>_1 and a backpack"),
    (dict(layout=[("backpack", (0, 0, 1, 1)), ("Backpack", (0, 0, 1, 1))]), "given twice"),
    (dict(layout={"backpack": (0.6, 0.2, 0.5, 0.8)}), "x0 < x1"),
    (dict(layout={"backpack": (0.6, 0.2, 1.2, 0.8)}), r"\[0, 1\]"),
    (dict(layout=LAYOUT, guidance=GuidanceConfig(guided_steps=5)), "guided steps 5"),
    (dict(layout="auto"), "at least one phrase"),
    (dict(phrases=["backpack"]), "need layout="),
])
def test_bad_inputs_raise_one_clear_error(pipe, kwargs, message):
    if "layout" in kwargs:
        kwargs = {"guidance": LIGHT, **kwargs}
    with pytest.raises(CompinvError, match=message):
        pipe(PROMPT, generator=_seed(), **kwargs, **FAST)


def test_scheduler_without_noise_level_is_rejected(pipe):
    use_scheduler(pipe, "ddim")
    del pipe.scheduler.alphas_cumprod
    try:
        with pytest.raises(CompinvError, match="no noise level"):
            pipe(PROMPT, layout=LAYOUT, guidance=LIGHT, **FAST)
    finally:
        use_scheduler(pipe, "lms")


def test_from_pretrained_folder(tiny_model):
    pipe = CompositionalStableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    assert isinstance(pipe, StableDiffusionPipeline)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat and a dog", layout="auto", phrases=["cat", "dog"], guidance=LIGHT, **FAST)
    assert len(out.guidance_losses) == 2
