"""Layouts the model proposes (anchor), learned layout distributions, per-image layouts in one
batched call, and their bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compinv.concepts import concept_anchors
from compinv.errors import CompinvError
from compinv.layout_training import fit, read_prompts, train_layout_model
from compinv.models import build_tiny_pipeline
from compinv.pipeline import CompositionalStableDiffusionPipeline, use_scheduler
from compinv.spatial.layout_model import LayoutPredictor, box_to_params, load_layout_model, params_to_box
from compinv.spatial.options import GuidanceConfig, LayoutTrainConfig
from compinv.spatial.propose import MIN_SIDE, anchor_text, box_from_heat
from compinv.tokens import add_concept_token, single_token_id

FAST = dict(num_inference_steps=4, height=32, width=32, output_type="np")
LIGHT = GuidanceConfig(guided_steps=2, max_iterations=2, proposal_steps=2)
CONCEPT = "a <cute-cat> and a backpack"
ANCHORS = {"<cute-cat>": "cat"}
L1 = {"cat": (0.1, 0.2, 0.5, 0.8), "dog": (0.6, 0.2, 0.95, 0.8)}
L2 = {"cat": (0.5, 0.1, 0.9, 0.5), "dog": (0.0, 0.5, 0.4, 0.95)}


@pytest.fixture(scope="module")
def pipe():
    base = build_tiny_pipeline()
    cat = single_token_id(base.tokenizer, "cat", "--init-word")
    add_concept_token(base.tokenizer, base.text_encoder, "<cute-cat>", 2, cat)
    pipe = CompositionalStableDiffusionPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    use_scheduler(pipe, "lms")
    return pipe


def _seeds(n: int, start: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(start + i) for i in range(n)]


# ---- the box rule ---------------------------------------------------------------------------
def test_box_from_heat_takes_the_half_maximum_region_of_the_peak():
    heat = np.zeros((16, 16))
    heat[4:8, 2:10] = 1.0  # the peak's region
    heat[12:15, 12:15] = 0.9  # a second blob over the threshold, not connected to the peak
    heat[5, 5] = 1.2
    assert box_from_heat(heat) == (2 / 16, 4 / 16, 10 / 16, 8 / 16)
    assert box_from_heat(heat, threshold=0.95) == pytest.approx((
        5.5 / 16 - MIN_SIDE / 2, 5.5 / 16 - MIN_SIDE / 2, 5.5 / 16 + MIN_SIDE / 2, 5.5 / 16 + MIN_SIDE / 2))
    corner = np.zeros((8, 8))
    corner[0, 0] = 1.0  # widened to MIN_SIDE, kept inside the image
    assert box_from_heat(corner) == (0.0, 0.0, MIN_SIDE, MIN_SIDE)


def test_anchor_text_replaces_whole_concept_tokens_and_their_vectors():
    assert anchor_text("a <c> <c>_1 and a <c>-like dog", {"<c>": "cat"}) == "a cat cat and a <c>-like dog"
    assert anchor_text("<c> and <d>", {"<c>": "teddy bear", "<d>": "dog"}) == "teddy bear and dog"


def test_concept_anchors_are_read_from_the_run_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"token": "<a>", "class_word": "cat",
                                                      "anchor_word": "kitten"}))
    assert concept_anchors(tmp_path) == {"<a>": "kitten"}
    (tmp_path / "config.json").write_text(json.dumps({"concept_list": [
        {"token": "<a>", "class_word": "cat"}, {"token": "<b>", "init_word": "dog"}]}))
    assert concept_anchors(tmp_path) == {"<a>": "cat", "<b>": "dog"}
    assert concept_anchors(tmp_path / "none") == {}


# ---- per-image layouts in one batch ---------------------------------------------------------
def test_per_image_layouts_in_one_batch_equal_one_call_per_image(pipe):
    prompts = ["a cat and a dog", "a dog and a cat"]
    both = pipe(prompts, layout=[L1, L2], guidance=LIGHT, generator=_seeds(2), **FAST)
    singles = [pipe(p, layout=layout, guidance=LIGHT, generator=g, **FAST)
               for p, layout, g in zip(prompts, [L1, L2], _seeds(2))]
    np.testing.assert_allclose(both.images, np.concatenate([s.images for s in singles]), atol=1e-4)
    for mine, single in zip(both.image_guidance_losses, singles):
        np.testing.assert_allclose(sum(mine, []), sum(single.guidance_losses, []), rtol=1e-5)
    assert both.layout is None and [dict(x) for x in both.layouts] == [
        {p: (b,) for p, b in L1.items()}, {p: (b,) for p, b in L2.items()}]


def test_one_images_threshold_does_not_stop_anothers_guidance(pipe):
    prompts = ["a cat and a dog", "a dog and a cat"]
    probe = pipe(prompts, layout=[L1, L2], guidance=GuidanceConfig(guided_steps=3, max_iterations=2,
                                                                     loss_threshold=0.0),
                 generator=_seeds(2), **FAST).image_guidance_losses
    first = [losses[0][0] for losses in probe]
    low, high = sorted(first)
    easy = first.index(low)
    threshold = (low + high) / 2  # met by one image at its first iteration, not by the other
    settings = GuidanceConfig(guided_steps=3, max_iterations=2, loss_threshold=threshold)
    out = pipe(prompts, layout=[L1, L2], guidance=settings, generator=_seeds(2), **FAST)
    easy_losses, hard_losses = out.image_guidance_losses[easy], out.image_guidance_losses[1 - easy]
    assert [len(s) for s in easy_losses] == [1]  # done at once: not guided again (official rule)
    assert len(hard_losses) >= 2 and len(hard_losses[0]) == 2  # the other keeps iterating
    alone = pipe(prompts[1 - easy], layout=[L1, L2][1 - easy], guidance=settings,
                 generator=_seeds(1, 1 - easy)[0], **FAST)
    np.testing.assert_allclose(sum(hard_losses, []), sum(alone.guidance_losses, []), rtol=1e-5)


def test_a_per_image_list_of_the_wrong_length_is_refused(pipe):
    with pytest.raises(CompinvError, match="per-image list of 3 layouts for 2 images"):
        pipe("a cat and a dog", layout=[L1, L2, L1], num_images_per_prompt=2, guidance=LIGHT, **FAST)
    with pytest.raises(CompinvError, match="3 per-image phrase lists for 2 images"):
        pipe(["a cat and a dog"] * 2, layout="auto", phrases=[["cat"]] * 3, guidance=LIGHT, **FAST)


# ---- anchor layouts -------------------------------------------------------------------------
def test_anchor_layout_is_proposed_from_the_anchor_prompt_per_image(pipe):
    phrases = ["<cute-cat>", "backpack"]
    out = pipe(CONCEPT, layout="anchor", phrases=phrases, anchors=ANCHORS, guidance=LIGHT,
               generator=_seeds(2), num_images_per_prompt=2, **FAST)
    plain = pipe.propose_layouts(["a cat and a backpack"] * 2, [["cat", "backpack"]] * 2,
                                 num_inference_steps=4, generator=_seeds(2), height=32, width=32,
                                 guidance=LIGHT)
    assert [[b for _, b in layout] for layout in out.layouts] == [[b for _, b in x] for x in plain]
    assert [p for p, _ in out.layouts[0]] == phrases
    assert out.layouts[0] != out.layouts[1]  # each image's noise proposes its own layout
    assert len(out.image_guidance_losses) == 2 and all(out.image_guidance_losses)


def test_anchor_layout_keeps_the_generation_noise_and_needs_an_anchor_per_concept(pipe):
    guided = pipe(CONCEPT, layout="anchor", phrases=["<cute-cat>", "backpack"], anchors=ANCHORS,
                  guidance=GuidanceConfig(guided_steps=0, proposal_steps=2), generator=_seeds(1)[0],
                  **FAST)
    plain = pipe(CONCEPT, generator=_seeds(1)[0], **FAST)
    np.testing.assert_allclose(guided.images, plain.images, atol=1e-6)  # same noise, no guidance
    with pytest.raises(CompinvError, match="concept token '<cute-cat>' has no anchor word"):
        pipe(CONCEPT, layout="anchor", phrases=["backpack"], anchors={}, guidance=LIGHT, **FAST)


# ---- learned layouts ------------------------------------------------------------------------
def test_box_parameters_round_trip():
    box = (0.1, 0.25, 0.6, 0.9)
    assert params_to_box(box_to_params(box)) == pytest.approx(box, abs=1e-6)


def test_learned_layouts_differ_per_image_and_temperature_zero_is_the_mean(pipe, tmp_path):
    torch.manual_seed(0)
    model = LayoutPredictor(32, 2)
    phrases = ["<cute-cat>", "backpack"]
    kwargs = dict(layout="learned", phrases=phrases, anchors=ANCHORS, layout_model=model,
                  guidance=LIGHT, num_images_per_prompt=3, **FAST)
    sampled = pipe(CONCEPT, generator=torch.Generator().manual_seed(1), **kwargs).layouts
    assert len({tuple(x) for x in sampled}) == 3
    typical = pipe(CONCEPT, generator=torch.Generator().manual_seed(1), layout_temperature=0.0,
                   **kwargs).layouts
    assert len({tuple(x) for x in typical}) == 1
    again = pipe(CONCEPT, generator=torch.Generator().manual_seed(1), **kwargs).layouts
    assert again == sampled  # the seed fixes the layouts


def test_layout_model_for_another_encoder_or_too_many_phrases_is_refused(pipe):
    kwargs = dict(layout="learned", anchors=ANCHORS, guidance=LIGHT, **FAST)
    with pytest.raises(CompinvError, match="text encoder of width 768; this pipeline's has width 32"):
        pipe(CONCEPT, phrases=["backpack"], layout_model=LayoutPredictor(768, 2), **kwargs)
    with pytest.raises(CompinvError, match="at most 1 phrases; 2 were given"):
        pipe(CONCEPT, phrases=["<cute-cat>", "backpack"], layout_model=LayoutPredictor(32, 1), **kwargs)
    with pytest.raises(CompinvError, match="needs layout_model"):
        pipe(CONCEPT, phrases=["backpack"], **kwargs)


def test_fit_learns_the_mean_and_spread_of_harvested_boxes():
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(2, 77, 8, generator=gen)
    centre = torch.tensor([[-1.0, 0.0, -0.4, 0.4], [1.0, -1.0, -0.4, -0.4]])
    spread = torch.tensor([[0.3, 0.2, 0.1, 0.4], [0.2, 0.3, 0.4, 0.1]])
    params = (centre[:, None] + spread[:, None] * torch.randn(2, 64, 4, generator=gen)).flatten(0, 1)
    torch.manual_seed(0)
    model = LayoutPredictor(8, 1, hidden=4)
    history = fit(model, text.repeat_interleave(64, 0), params[:, None], torch.ones(128, 1),
                  epochs=600, lr=1e-2)
    assert history[-1] < history[0] - 1
    mean, log_std = model(text)
    samples = params.view(2, 64, 4)
    torch.testing.assert_close(mean[:, 0], samples.mean(1), atol=0.05, rtol=0)
    torch.testing.assert_close(log_std[:, 0].exp(), samples.std(1, unbiased=False), atol=0.05, rtol=0)


def test_train_layout_writes_a_loadable_model(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a [cat] and a [dog]\n\na photo of a [red backpack]\n")
    assert read_prompts(prompts) == [("a cat and a dog", ["cat", "dog"]),
                                     ("a photo of a red backpack", ["red backpack"])]
    out = tmp_path / "layout"
    train_layout_model(LayoutTrainConfig(model=str(tiny_model), prompts=str(prompts), out=str(out),
                                         samples_per_prompt=2, steps=3, proposal_steps=2,
                                         resolution=32, epochs=5))
    model = load_layout_model(out)
    config = json.loads((out / "layout_model.json").read_text())
    assert (model.text_dim, model.max_phrases, config["layouts"]) == (32, 2, 4)
    assert len(json.loads((out / "harvested_layouts.json").read_text())) == 4
    with pytest.raises(CompinvError, match="more phrases than max_phrases"):
        train_layout_model(LayoutTrainConfig(model=str(tiny_model), prompts=str(prompts),
                                             out=str(tmp_path / "o2"), max_phrases=1))


def test_shipped_toy_layout_model_loads_small():
    model = load_layout_model("toy")
    assert model.text_dim == 128 and model.max_phrases == 2
    assert sum(p.numel() for p in model.parameters()) * 4 < 1_000_000


# ---- the CLI --------------------------------------------------------------------------------
CLI_QUICK = ["--steps", "3", "--guided-steps", "2", "--max-iterations", "2", "--num-images", "2",
             "--height", "32", "--width", "32", "--proposal-steps", "2"]


def _generate(tiny_model, out, *flags):
    from compinv.cli import main

    assert main(["generate", "--model", str(tiny_model), "--prompt", "a cat and a dog",
                 "--phrase", "cat", "--phrase", "dog", "--out", str(out), *CLI_QUICK, *flags]) == 0
    return json.loads((out / "generation.json").read_text())


def test_cli_anchor_layout_records_every_images_layout_and_draws_it(tiny_model, tmp_path):
    from PIL import Image

    record = _generate(tiny_model, tmp_path / "anchor", "--layout", "anchor", "--save-layout")
    assert len(record["layouts"]) == 2 and [x["phrase"] for x in record["layouts"][0]] == ["cat", "dog"]
    assert record["layout"] is None or record["layouts"][0] == record["layouts"][1]
    assert record["layout_pictures"] == ["layout-0000.png", "layout-0001.png"]
    picture = Image.open(tmp_path / "anchor" / "layout-0000.png")
    assert picture.size == (256, 256)  # 32-px images drawn 8x larger
    assert len(record["guidance_losses"]) == 2


def test_cli_learned_layout_with_a_trained_model(tiny_model, tmp_path):
    torch.manual_seed(0)
    from compinv.spatial.layout_model import save_layout_model

    folder = tmp_path / "lm"
    folder.mkdir()
    save_layout_model(LayoutPredictor(32, 2), folder, {})
    record = _generate(tiny_model, tmp_path / "learned", "--layout", "learned", "--layout-model",
                       str(folder), "--layout-temperature", "1.0")
    assert len(record["layouts"]) == 2 and record["layouts"][0] != record["layouts"][1]
    assert record["config"]["layout_temperature"] == 1.0


def test_cli_batches_images_each_with_its_own_layout_as_single_calls_would(tiny_model, tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    from compinv.spatial.layout_model import save_layout_model

    folder = tmp_path / "lm"
    folder.mkdir()
    save_layout_model(LayoutPredictor(32, 2), folder, {})
    flags = ("--layout", "learned", "--layout-model", str(folder), "--num-images", "3")
    batched = _generate(tiny_model, tmp_path / "b3", *flags, "--batch-size", "3")
    single = _generate(tiny_model, tmp_path / "b1", *flags, "--batch-size", "1")
    assert batched["layouts"] == single["layouts"] and len({str(x) for x in batched["layouts"]}) == 3
    assert [len(x) for x in batched["guidance_losses"]] == [len(x) for x in single["guidance_losses"]]
    for name in batched["images"]:
        a, b = (np.asarray(Image.open(tmp_path / run / name), dtype=int) for run in ("b3", "b1"))
        assert np.abs(a - b).max() <= 2  # the same image, up to float summation order in a batch


@pytest.mark.parametrize("flags,message", [
    (["--layout", "learned"], "--layout learned needs --layout-model"),
    (["--layout", "anchor", "--layout-model", "toy"], "--layout-model is used with --layout learned"),
    (["--layout", "learned", "--layout-model", "toy"], "text encoder of width 128"),
    (["--layout", "learned", "--layout-model", "nowhere"], "--layout-model nowhere: no layout_model.json"),
    (["--layout", "anchor", "--layout-temperature", "-1"], "--layout-temperature"),
    (["--layout", "anchor", "--anchors", "cat"], "write TOKEN=WORDS"),
])
def test_cli_bad_layout_flags(tiny_model, tmp_path, capsys, flags, message):
    from helpers import cli_error

    line = cli_error(capsys, ["generate", "--model", str(tiny_model), "--prompt", "a cat and a dog",
                              "--phrase", "cat", "--phrase", "dog", "--out", str(tmp_path / "bad"),
                              *CLI_QUICK, *flags])
    assert message in line
    assert not (tmp_path / "bad").exists()


def test_attention_mass_is_the_mean_probability_on_each_phrase(pipe):
    out = pipe("a cat and a dog", phrases=["cat", "dog"], return_attention=True,
               generator=_seeds(1)[0], **FAST)
    (masses,) = out.image_attention_mass
    assert all(0 < m < 1 for m in masses) and masses[0] != masses[1]


def test_phrases_with_an_explicit_layout_and_unknown_layout_names_are_refused(pipe):
    with pytest.raises(CompinvError, match="phrases= is only used with layout='auto', 'anchor'"):
        pipe("a cat and a dog", layout=L1, phrases=["cat"], guidance=LIGHT, **FAST)
    with pytest.raises(CompinvError, match="'auto', 'anchor' or 'learned'"):
        pipe("a cat and a dog", layout="anchr", phrases=["cat"], guidance=LIGHT, **FAST)
