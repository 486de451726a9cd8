"""Toy world and model v2: pattern rendering, held-out identities, the toy CLIP, the three
training phases at tiny scale, exact resume, and a stock-diffusers folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from compinv.toy import model_v2
from compinv.errors import CompinvError
from compinv.toy import world_v2
import compinv.toy.clip as toy_clip
from compinv.toy.clip import ToyClipSettings
from compinv.toy.model_v2 import ToyModelV2Settings, train_toy_model_v2

TINY = ToyModelV2Settings(
    clip=ToyClipSettings(steps=3, batch_size=4, text_hidden=32, text_layers=1, vision_hidden=32,
                         vision_layers=1, projection_dim=16, image_tower="resnet"),
    vae_steps=3, vae_batch_size=2, steps=3, batch_size=2, unet_channels=(16, 32, 32), eval_scenes=8)


def _object(**kw) -> world_v2.PatternObject:
    values = dict(colour="red", colour2="blue", pattern="striped", shape="square", x=24.0, y=24.0,
                  radius=14.0, angle=0.0)
    return world_v2.PatternObject(**{**values, **kw})


def _draw(obj: world_v2.PatternObject, background: str = "night") -> np.ndarray:
    return world_v2.render([world_v2.SceneV2(background, (obj,), 0, 0)])[0].astype(int)


def _count(image: np.ndarray, colour: str) -> int:
    return int((np.abs(image - np.array(world_v2.COLOURS[colour])).sum(axis=-1) < 30).sum())


def test_patterns_paint_both_colours_where_they_belong():
    solid = _draw(_object(pattern="solid", colour2="red"))
    assert _count(solid, "red") > 300 and _count(solid, "blue") == 0
    for pattern in ("striped", "dotted", "checked", "two-tone"):
        image = _draw(_object(pattern=pattern))
        red, blue = _count(image, "red"), _count(image, "blue")
        assert red > 40 and blue > 20, (pattern, red, blue)
    halves = _draw(_object(pattern="two-tone"))
    assert _count(halves[:, :24], "red") > 100 and _count(halves[:, :24], "blue") < 10
    assert _count(halves[:, 24:], "blue") > 100 and _count(halves[:, 24:], "red") < 10
    stripes = _draw(_object(pattern="striped"))
    rows = [_count(stripes[y:y + 1], "blue") > 5 for y in range(14, 34)]
    assert True in rows and False in rows  # horizontal bands: some rows blue, some not


def test_rendering_is_48px_and_seeded():
    scenes = world_v2.sample_scenes(16, "train", 3)
    images = world_v2.render(scenes)
    assert images.shape == (16, 48, 48, 3) and images.dtype == np.uint8
    assert np.array_equal(images, world_v2.render(world_v2.sample_scenes(16, "train", 3)))


def test_captions_say_colours_pattern_and_shape():
    obj = _object(colour="magenta", colour2="white", shape="diamond")
    assert world_v2.object_phrase(*obj.identity) == "a magenta and white striped diamond"
    assert world_v2.object_phrase("orange", "orange", "solid", "heart") == "an orange heart"
    scene = world_v2.SceneV2("grass", (obj,), 0, 1)
    assert world_v2.caption(scene) == "a photo of a magenta and white striped diamond on grass"


def test_training_split_never_shows_heldout_pairs_concepts_or_invisible_colours():
    scenes = world_v2.sample_scenes(3000, "train", 0)
    assert not any(world_v2.is_heldout(s) for s in scenes)
    for s in scenes:
        for o in s.objects:
            assert {o.colour, o.colour2} <= set(world_v2.visible_colours(s.background))
            assert (o.pattern == "solid") == (o.colour == o.colour2)
    patterns = {o.pattern for s in scenes for o in s.objects}
    assert patterns == set(world_v2.PATTERNS)
    heldout = world_v2.sample_scenes(300, "heldout", 0)
    assert all(world_v2.is_heldout(s) for s in heldout)
    assert "white" not in world_v2.visible_colours("snow") and "black" not in world_v2.visible_colours("night")


def test_concepts_are_drawable_and_held_out():
    assert len(world_v2.CONCEPTS) >= 5 and sum(not c.design for c in world_v2.CONCEPTS) >= 2
    for concept in world_v2.CONCEPTS:
        assert not world_v2.is_training_object(concept.identity)
        assert concept.description.endswith(concept.class_word)
        refs = world_v2.render_concept(concept, 5).astype(int)
        assert refs.shape == (5, 48, 48, 3)
        for colour in concept.identity[:2]:
            assert all(_count(r, colour) > 15 for r in refs), (concept.name, colour)


class _Interrupt(Exception):
    pass


def _interrupting_tqdm(after: int):
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


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return train_toy_model_v2(tmp_path_factory.mktemp("v2") / "whole", TINY, checkpoint_every=1, progress=False)


@pytest.mark.parametrize("cut", [2, 5, 8])  # inside the clip, vae and unet phases
def test_resume_is_bit_identical_in_every_phase(whole, tmp_path, monkeypatch, cut):
    with monkeypatch.context() as patch:
        bar = _interrupting_tqdm(cut)  # one count over the phases, as a killed job
        patch.setattr(model_v2, "tqdm", bar)
        patch.setattr(toy_clip, "tqdm", bar)
        with pytest.raises(_Interrupt):
            train_toy_model_v2(tmp_path / "cut", TINY, checkpoint_every=1, progress=False)
    train_toy_model_v2(tmp_path / "cut", TINY, resume=True, checkpoint_every=1, progress=False)
    for name in ("clip/clip", "vae", "unet", "unet_ema"):
        expected = load_file(str(whole.out.parent / "training" / f"{name}.safetensors"))
        resumed = load_file(str(tmp_path / "cut" / "training" / f"{name}.safetensors"))
        for key, value in expected.items():
            assert torch.equal(value, resumed[key]), f"{name}.{key} differs after resume at {cut}"


def test_phases_record_retrieval_psnr_and_step_times(whole):
    state = whole.state
    assert state["phase"] == "unet" and state["step"] == TINY.steps
    assert {"image_to_text", "text_to_image", "chance"} <= set(state["retrieval"])
    assert set(state["seconds_per_step"]) == {"clip", "vae", "unet"}
    assert state["vae_psnr"] > 0 and state["scaling_factor"] > 0
    judged = state["vae_reconstructions"]  # the ceiling of every base-quality metric
    assert judged["images"] == TINY.eval_scenes and 0 <= judged["colours_one"] <= 1
    chosen = state["clip_attributes"]  # does the frozen tower tell each caption word apart?
    assert set(chosen) == {a + k for a in (*model_v2.ATTRIBUTES, "binding") for k in ("", "_chance")}
    assert chosen["shape_chance"] == 1 / len(world_v2.SHAPES) and all(0 <= v <= 1 for v in chosen.values())


def test_attribute_variants_change_that_attribute_only():
    from compinv.toy.metrics_v2 import heldout_scenes

    scene = next(s for s in heldout_scenes(64, 0) if len(s.objects) == 1 and s.objects[0].pattern != "solid")
    for attribute, field in (("shape", "shape"), ("colour", "colour"), ("pattern", "pattern")):
        variants = model_v2.attribute_variants(scene, attribute)
        assert scene in variants and len({getattr(v.objects[0], field) for v in variants}) == len(variants)
        for v in variants:
            kept = {k: getattr(v.objects[0], k) for k in ("x", "y", "radius", "colour2", "shape", "pattern", "colour")
                    if k != field}
            assert kept == {k: getattr(scene.objects[0], k) for k in kept} and v.background == scene.background
    solid = next(s for s in heldout_scenes(64, 0) if len(s.objects) == 1 and s.objects[0].pattern == "solid")
    assert model_v2.attribute_variants(solid, "pattern") is None
    with pytest.raises(CompinvError, match="attribute"):
        model_v2.attribute_variants(solid, "size")


def test_the_weights_average_warms_up_then_decays_at_the_set_rate():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = model_v2.unet_ema(model, decay=0.5)
    expected = None
    for n, value in enumerate([4.0, 8.0, 2.0, 6.0]):
        model.weight.data.fill_(value)
        ema.update_parameters(model)
        d = min(0.5, (1 + n) / (10 + n))  # n = 0 copies the weights (AveragedModel's first update)
        expected = value if expected is None else expected * d + value * (1 - d)
        assert ema.module.weight.item() == pytest.approx(expected)
    assert expected != model.weight.item()


def test_the_exported_unet_is_the_weights_average(whole):
    training = whole.out.parent / "training"
    averaged = load_file(str(training / "unet_ema.safetensors"))
    trained = load_file(str(training / "unet.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(whole.out)
    exported = pipe.unet.state_dict()
    assert averaged["n_averaged"].item() == TINY.steps
    key = "conv_in.weight"
    assert torch.equal(exported[key], averaged[f"module.{key}"].to(torch.float16).float())
    assert not torch.equal(exported[key], trained[key].to(torch.float16).float())


def test_the_latent_has_the_shape_the_settings_say(whole):
    pipe = StableDiffusionPipeline.from_pretrained(whole.out)
    assert pipe.vae.config.latent_channels == TINY.vae_latent_channels == 4
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == 4
    assert pipe.vae.config.norm_num_groups == TINY.vae_norm_groups
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 24  # 48 px -> 24 x 24
    assert pipe.unet.config.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    image = pipe("a red star on grass", num_inference_steps=2, height=48, width=48, output_type="np").images
    assert image.shape == (1, 48, 48, 3)


def test_cross_attention_levels_must_match_the_unet_levels():
    with pytest.raises(CompinvError, match="unet_cross_attention"):
        model_v2.build_unet_and_vae(dataclasses.replace(TINY, unet_channels=(32, 32)))


def test_unet_phase_leaves_the_text_tower_frozen_and_the_folder_is_stock_sd(whole):
    clip = load_file(str(whole.out.parent / "training" / "clip" / "clip.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(whole.out)
    pipe.set_progress_bar_config(disable=True)
    for key, value in pipe.text_encoder.state_dict().items():
        stored = clip.get(f"text_model.{key}", clip.get(key))
        expected = stored.to(torch.float16).float()  # the folder is fp16
        assert torch.equal(value, expected), key
    image = pipe("a magenta and white striped diamond on grass", num_inference_steps=2,
                 guidance_scale=3.0, output_type="np").images
    assert image.shape == (1, 48, 48, 3)


def test_stop_after_clip_then_resume_continues_and_other_settings_are_refused(tmp_path):
    run = train_toy_model_v2(tmp_path / "run", TINY, progress=False, stop_after="clip")
    assert run.state["phase"] == "vae"
    with pytest.raises(CompinvError, match="pass --resume"):
        train_toy_model_v2(tmp_path / "run", TINY, progress=False)
    other = ToyModelV2Settings(**{**TINY.__dict__, "steps": 4})
    with pytest.raises(CompinvError, match="steps=3"):
        train_toy_model_v2(tmp_path / "run", other, resume=True, progress=False)


def test_v2_only_flags_are_refused_for_version_1(capsys):
    from helpers import cli_error

    line = cli_error(capsys, ["toy", "train-model", "--clip-steps", "5", "--out", "unused"])
    assert "--clip-steps" in line and "--version 2" in line
    line = cli_error(capsys, ["toy", "train-model", "--timestep-sampling", "logit-normal", "--out", "unused"])
    assert "--timestep-sampling" in line and "--version 2" in line


def test_train_model_v2_flags_reach_the_settings(monkeypatch, tmp_path, capsys):
    from compinv.cli import main

    seen = {}

    def fake(out, settings, **kwargs):
        seen.update(settings=settings, **kwargs)
        return model_v2.ToyModelV2Run(Path(out), 0.0, {"phase": "clip", "step": 0})

    monkeypatch.setattr(model_v2, "train_toy_model_v2", fake)
    main(["toy", "train-model", "--version", "2", "--out", str(tmp_path), "--steps", "7",
          "--timestep-sampling", "logit-normal", "--stop-after", "clip"])
    assert seen["settings"].timestep_sampling == "logit-normal" and seen["settings"].steps == 7
    assert seen["stop_after"] == "clip" and "phase clip" in capsys.readouterr().out


def test_evaluate_model_blocks_padding_and_says_so(tmp_path, capsys):
    import json

    from compinv.cli import main
    from compinv.diagnostics import padding_blocked
    from compinv.toy.ablation import generate
    from compinv.toy.model import load_toy_model

    pipe = load_toy_model()
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red star and a blue ring at night", "a green square on sand"]
    plain = generate(pipe, prompts, [0, 1])
    with padding_blocked(pipe):
        blocked = generate(pipe, prompts, [0, 1])
    assert np.abs(plain - blocked).max() > 0.05  # the shipped v1 model reads its padding
    assert main(["toy", "evaluate-model", "--n", "2", "--block-padding", "--out", str(tmp_path / "s.json")]) in (0, None)
    recorded = json.loads((tmp_path / "s.json").read_text())
    assert recorded["block_padding"] is True and recorded["guidance_scale"] == 3.0


def test_evaluate_model_generates_at_the_guidance_scale_asked(monkeypatch, tmp_path):
    import json

    from compinv.cli import main
    from compinv.toy import ablation

    scales = []
    real = ablation.generate

    def spy(*args, **kwargs):
        scales.append(kwargs.get("guidance_scale"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ablation, "generate", spy)
    assert main(["toy", "evaluate-model", "--n", "2", "--guidance-scale", "6",
                 "--out", str(tmp_path / "s.json")]) in (0, None)
    assert scales == [6.0] and json.loads((tmp_path / "s.json").read_text())["guidance_scale"] == 6.0


def test_padding_dropout_hides_only_the_padding_of_the_chosen_rows():
    ids = model_v2.token_ids(["a red star on grass", ""])
    keep = model_v2.padding_dropout(ids, torch.tensor([True, False]))
    eos = ids[0].tolist().index(49407)
    assert keep[0, : eos + 1].eq(1).all() and keep[0, eos + 1:].eq(0).all()
    assert keep[1].eq(1).all()  # not chosen: the UNet sees its padding, as stock pipelines show it


def test_logit_normal_timesteps_favour_mid_noise_and_stay_in_range():
    uniform = model_v2.training_timesteps("uniform", 20_000, 1000, torch.Generator().manual_seed(0))
    centred = model_v2.training_timesteps("logit-normal", 20_000, 1000, torch.Generator().manual_seed(0))
    def mid(t):
        return ((t >= 300) & (t < 700)).float().mean().item()
    assert 0.38 < mid(uniform) < 0.42 and mid(centred) > 0.55
    assert centred.min() >= 0 and centred.max() <= 999 and centred.dtype == torch.long
    with pytest.raises(CompinvError, match="timestep_sampling"):
        model_v2.training_timesteps("cosine", 4, 1000, torch.Generator())


class _Oracle:
    """A v2 'classifier' that reports the scenes it is given, to check the scoring rules."""

    def __init__(self, scenes, drop_pattern: bool = False):
        from compinv.toy.classifier_v2 import HEADS, Predictions, _C, _P, _S, targets

        pairs, patterns, backgrounds = targets(scenes)
        if drop_pattern:
            patterns = torch.zeros_like(patterns)
        self.predictions = Predictions(pairs.reshape(-1, len(_C), len(_S)).numpy(),
                                       patterns.reshape(-1, len(_P), len(_S)).numpy(),
                                       torch.nn.functional.one_hot(backgrounds, HEADS[2]).float().numpy())

    def predict(self, images):
        return self.predictions


def test_v2_scores_follow_the_captions():
    from compinv.toy.metrics_v2 import heldout_scenes, score_generations_v2

    scenes = heldout_scenes(16)
    images = world_v2.render(scenes)
    perfect = score_generations_v2(_Oracle(scenes), images, scenes)
    assert perfect["background"] == perfect["colours_one"] == perfect["patterns"] == perfect["all_right"] == 1.0
    no_patterns = score_generations_v2(_Oracle(scenes, drop_pattern=True), images, scenes)
    assert no_patterns["patterns"] == 0.0 and no_patterns["all_right"] == 0.0 and no_patterns["colours_one"] == 1.0


def test_evaluate_model_v2_takes_the_shipped_or_a_given_classifier_and_scores_identity(whole, tmp_path, capsys):
    import json

    from helpers import cli_error

    from compinv.cli import main
    from compinv.toy.classifier_v2 import train_pattern_classifier

    line = cli_error(capsys, ["toy", "evaluate-model", "--model", str(whole.out), "--n", "2",
                              "--classifier", str(tmp_path / "none")])
    assert "none holds no classifier.json" in line and "--version 2" in line
    assert main(["toy", "evaluate-model", "--model", str(whole.out), "--n", "1", "--identity-images", "1"]) in (0, None)
    assert "identity_min" in capsys.readouterr().out  # no --classifier: the shipped v2 one
    train_pattern_classifier(tmp_path / "cls", steps=1, batch_size=2, progress=False)
    assert main(["toy", "evaluate-model", "--model", str(whole.out), "--classifier", str(tmp_path / "cls"),
                 "--n", "2", "--identity-images", "1", "--out", str(tmp_path / "s.json")]) in (0, None)
    scores = json.loads((tmp_path / "s.json").read_text())
    assert {f"identity/{c.name}" for c in world_v2.CONCEPTS} <= set(scores)
    assert {"patterns", "colours_two", "identity_min"} <= set(scores)


def test_composition_prompts_and_scores_on_v2():
    from compinv.toy.metrics_v2 import composition_prompts_v2, score_compositions_v2

    concept = world_v2.CONCEPTS[0]
    prompts = composition_prompts_v2(concept, 20)
    assert len({p.text("<c>") for p in prompts}) == 20
    assert all(p.shape != concept.class_word and p.background != concept.background for p in prompts)
    assert prompts[0].text("<c>").startswith("a photo of a <c> and a")
    shown = world_v2.PatternObject(*concept.identity, 12.0, 24.0, 9.0, 0.0)
    both = [world_v2.SceneV2(p.background, (shown, world_v2.PatternObject(p.colour, p.colour, "solid", p.shape,
                                                                           36.0, 24.0, 9.0, 0.0)), 0, 0)
            for p in prompts]
    alone = [world_v2.SceneV2(s.background, s.objects[:1], 0, 0) for s in both]
    full = score_compositions_v2(_Oracle(both), world_v2.render(both), prompts, concept)
    assert full["concept_inclusion"].tolist() == [1.0] * 20 and full["concept_identity"].tolist() == [1.0] * 20
    assert full["text_alignment"].min() == 1.0
    vanished = score_compositions_v2(_Oracle(alone), world_v2.render(alone), prompts, concept)
    assert vanished["concept_inclusion"].max() == 0.0 and vanished["concept_identity"].min() == 1.0
    assert vanished["text_alignment"].max() < 1.0


def test_ablation_runs_on_the_v2_world(whole, tmp_path):
    """What the composition benchmark does per concept, at tiny scale on a tiny v2 model: learn
    the concept at 48 px, compose with and without (batched, per-image) layouts, score, probe."""
    from compinv.toy.ablation import (TrainingBudget, compose, learn_concept, pipeline_with_concept, probe_word,
                                      score_variant, token_of, toy_study, toy_version)

    base = pipeline_with_concept(whole.out, None)
    study = toy_study(toy_version(base))
    assert study.version == 2 and study.image_size == 48
    concept = study.concepts[1]
    images = study.write_images(tmp_path / "concepts") / concept.name
    assert len(list(images.glob("*.png"))) == 5
    run = learn_concept(whole.out, concept, images, "textual-inversion", False, tmp_path / "ti",
                        TrainingBudget(ti_steps=2, batch_size=1), resolution=study.image_size)
    pipe = pipeline_with_concept(whole.out, run)
    prompts = study.prompts(concept, 2)
    plain = compose(pipe, concept, prompts, [0, 1], spatial=False)
    guided = compose(pipe, concept, prompts, [0, 1], spatial=True, batch_size=3)  # two calls: 3 + 1 images
    assert plain.shape == guided.shape == (4, 48, 48, 3) and not np.allclose(plain, guided)
    scores = score_variant(study, study.classifier(), guided, concept, prompts, [0, 1])
    assert set(scores) == set(study.metrics) and all(len(v) == 4 for v in scores.values())
    probe = probe_word(study, study.classifier(), pipe, concept, token_of(concept), prompts[0], identity_images=2)
    assert probe["norm_ratio"] > 0 and 0 < probe["concept_share"] < 1 and 0 < probe["other_share"] < 1
    assert 0 <= probe["identity_alone"] <= 1
    class_probe = probe_word(study, study.classifier(), base, concept, concept.class_word, prompts[0], identity_images=1)
    assert class_probe["concept_share"] != probe["concept_share"]


def test_the_v2_benchmark_budget_is_the_long_one_the_disease_needs():
    from compinv.toy.ablation import toy_study

    assert toy_study(2).budget.ti_steps >= 3000 and toy_study(2).budget.batch_size == 4  # issue 11's minimum
    assert toy_study(1).budget.ti_steps == 300  # v1's published tables keep their budget


def test_the_disease_check_runs_vanilla_rows_only():
    from compinv.toy.ablation import variants

    every = variants(("textual-inversion", "custom-diffusion"))
    vanilla = variants(("textual-inversion", "custom-diffusion"), vanilla_only=True)
    assert len(every) == 8 and [v.name for v in vanilla] == ["TI", "CD"]
    assert not any(v.semantic or v.spatial for v in vanilla)


def test_the_demo_runs_on_the_v2_world(whole, tmp_path):
    """`compinv demo` reads the world off the model: v2 concepts, 48 px, the v2 metrics."""
    import json

    from compinv.demo import DemoSize, run_demo
    from compinv.toy.metrics_v2 import COMPOSITION_METRICS

    report = run_demo(tmp_path / "demo", concept="checked-star", size=DemoSize(ti_steps=2, prompts=1, seeds=1),
                      model=whole.out)
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["toy_world"] == 2 and summary["concept"] == "checked-star"
    assert all(set(v["metrics"]) == set(COMPOSITION_METRICS) for v in summary["variants"])
    page = report.read_text()
    assert "toy model v2" in page and "concept identity" in page and "pattern on its shape" in page
    assert len(list((tmp_path / "demo" / "concepts" / "checked-star").glob("*.png"))) == 5
    with pytest.raises(CompinvError, match="checked-star.*toy world 2|toy world 2"):
        run_demo(tmp_path / "other", concept="no-such-concept", model=whole.out)
    assert not (tmp_path / "other").exists()
