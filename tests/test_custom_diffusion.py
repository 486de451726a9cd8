"""Custom Diffusion with semantic inversion on the tiny model: what changes, multi-concept, resume."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from compinv.methods.custom_diffusion import CustomDiffusionConfig
from compinv.methods import custom_diffusion as cd
from compinv.methods.custom_diffusion import WEIGHTS_NAME
from compinv.training import train


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from helpers import write_concept_images

    root = tmp_path_factory.mktemp("img")
    return write_concept_images(root / "a", seed=0), write_concept_images(root / "b", seed=1)


def cd_config(model, out, **overrides) -> CustomDiffusionConfig:
    settings = dict(model=str(model), out=str(out), steps=3, batch_size=2, resolution=32,
                    checkpoint_every=0, save_every=0, validation_every=0, seed=1, lr=1e-2)
    settings.update(overrides)
    return CustomDiffusionConfig(**settings)


def _concepts_file(tmp_path, images, **extra):
    path = tmp_path / "concepts.yaml"
    path.write_text(
        f"- {{token: '<a>', class_word: cat, init_word: dog, images: '{images[0]}'{extra.get('a', '')}}}\n"
        f"- {{token: '<b>', class_word: toy, init_word: car, images: '{images[1]}'}}\n")
    return path


@pytest.fixture(scope="module")
def two_concept_run(tiny_model, images, tmp_path_factory):
    """A two-concept run; keeps the trained UNet and embedding table for inspection."""
    from compinv.artifacts import output_folder
    from compinv.training import prepare

    tmp = tmp_path_factory.mktemp("cd")
    cfg = cd_config(tiny_model, tmp / "run", concepts=str(_concepts_file(tmp, images))).resolved()
    with output_folder(cfg.out) as out:
        trainer = prepare(cfg, out)
        result = trainer.run()
    captured = {"unet": {k: v.clone() for k, v in trainer.pipe.unet.state_dict().items()},
                "table": trainer.method.text_encoder.get_input_embeddings().weight.detach().clone()}
    return result, captured


def _base(tiny_model):
    return StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)


def test_both_tokens_of_two_concepts_are_trained(two_concept_run, tiny_model):
    result, _ = two_concept_run
    base = _base(tiny_model)
    table = base.text_encoder.get_input_embeddings().weight.detach()
    for token, init in (("<a>", "dog"), ("<b>", "car")):
        file = result.artifact / cd.embedding_file_name(token)
        vector = load_file(str(file))[token][0]
        init_row = table[base.tokenizer(init, add_special_tokens=False).input_ids[0]]
        assert not torch.equal(vector, init_row), f"{token} never moved (official bug 3.3)"


def test_only_attn2_kv_and_token_rows_change(two_concept_run, tiny_model):
    _, captured = two_concept_run
    base = _base(tiny_model)
    base_unet = base.unet.state_dict()
    trained = captured["unet"]
    custom = {k for k in trained if "custom_diffusion" in k}
    assert custom and all(".attn2.processor.to_" in k for k in custom)
    assert all(k.split(".")[-2] in ("to_k_custom_diffusion", "to_v_custom_diffusion") for k in custom)
    for key, value in base_unet.items():
        assert torch.equal(trained[key], value), f"{key} changed"
    for key in custom:
        layer = key.split(".processor.")[0]
        proj = "to_k" if "to_k_" in key else "to_v"
        assert not torch.equal(trained[key], base_unet[f"{layer}.{proj}.weight"])
    table, base_table = captured["table"], base.text_encoder.get_input_embeddings().weight.detach()
    n = base_table.shape[0]
    assert torch.equal(table[:n], base_table)
    assert table.shape[0] == n + 2


def test_artifact_loads_in_stock_diffusers(two_concept_run, tiny_model):
    """The recipe of docs/methods.md: install the processors by hand, load each token file."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    folder = two_concept_run[0].artifact
    pipe = _base(tiny_model)
    before = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0]
    state = load_file(str(folder / WEIGHTS_NAME))
    processors = {}
    for name, proc in pipe.unet.attn_processors.items():
        weights = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        if weights:
            k = weights["to_k_custom_diffusion.weight"]
            proc = CustomDiffusionAttnProcessor(
                train_kv=True, train_q_out=False, hidden_size=k.shape[0],
                cross_attention_dim=k.shape[1])
            proc.load_state_dict(weights)
        processors[name] = proc
    pipe.unet.set_attn_processor(processors)
    for file in sorted(folder.glob("*.safetensors")):
        if file.name != WEIGHTS_NAME:
            pipe.load_textual_inversion(str(file))
    after = pipe.encode_prompt("a photo of a <a> cat and <b> toy", "cpu", 1, False)[0]
    assert not torch.allclose(before, after)
    loaded = {n for n, p in pipe.unet.attn_processors.items()
              if isinstance(p, CustomDiffusionAttnProcessor)}
    assert loaded == {k.split(".processor.")[0] + ".processor" for k in state}


def test_scale_augmentation_masks_the_canvas(tiny_model, images):
    from compinv.data import SMALL_PREFIXES, ZOOM_PREFIXES, ConceptDataset, ConceptSamples
    from compinv.data import load_images
    from compinv.models import clip_tokenizer

    concept = ConceptSamples(load_images(images[0]), ("photo of a cat",), ())
    data = ConceptDataset([concept], 32, clip_tokenizer(), 0, 2, scale_aug=True)
    seen = set()
    for i in range(40):
        pixels, ids, mask = data.sample(i)
        assert pixels.shape == (3, 32, 32) and mask.shape == (1, 16, 16)
        text = data.tokenizer.decode(ids, skip_special_tokens=True)
        if mask.sum() < mask.numel():
            seen.add("small")
            # The mask keeps a one-cell margin inside the photo; two cells out, all is canvas.
            grown = torch.nn.functional.max_pool2d(mask[None], 5, stride=1, padding=2)
            outside = torch.nn.functional.interpolate(grown, size=32)[0].expand(3, -1, -1) == 0
            # The canvas is mid-grey (0 in [-1, 1]), as the official code pads it.
            assert mask.sum() > 0 and torch.all(pixels[outside] == 0.0)
        if any(text.startswith(p.strip()) for p in ZOOM_PREFIXES):
            seen.add("zoom")
            assert mask.sum() == mask.numel()
        if any(text.startswith(p.strip()) for p in SMALL_PREFIXES):
            assert mask.sum() < mask.numel()
    assert seen == {"small", "zoom"}


def test_anchor_without_prior_and_prior_without_anchor(tiny_model, images, tmp_path):
    anchored = train(cd_config(
        tiny_model, tmp_path / "anchor", images=str(images[0]), token="<c>", init_word="dog",
        anchor_word="cat", steps=2, no_aug=True))
    assert anchored.last_losses["anchor"] > 0 and anchored.last_losses["prior"] == 0
    classes = images[1]
    prior = train(cd_config(
        tiny_model, tmp_path / "prior", images=str(images[0]), token="<c>", class_word="cat",
        steps=2, no_anchor=True, prior_weight=1.0, class_images=str(classes), hflip=True))
    assert prior.last_losses["prior"] > 0 and prior.last_losses["anchor"] == 0


def test_resume_ends_with_the_same_weights(tiny_model, images, tmp_path):
    common = dict(images=str(images[0]), token="<c>", class_word="cat", steps=4, checkpoint_every=2)
    whole = train(cd_config(tiny_model, tmp_path / "whole", **common))
    train(cd_config(tiny_model, tmp_path / "parts", **{**common, "steps": 2}))
    resumed = train(cd_config(tiny_model, tmp_path / "parts", resume="latest",
                                               **common))
    assert resumed.steps == 4
    for name in (WEIGHTS_NAME, cd.embedding_file_name("<c>")):
        a = load_file(str(whole.artifact / name))
        b = load_file(str(resumed.artifact / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_freeze_model_crossattn_also_trains_q_and_out(tiny_model, images, tmp_path):
    from compinv import load_concepts

    result = train(cd_config(tiny_model, tmp_path / "qo", images=str(images[0]),
                                              token="<c>", class_word="cat", steps=1,
                                              freeze_model="crossattn"))
    keys = load_file(str(result.artifact / WEIGHTS_NAME)).keys()
    assert {k.split(".processor.")[1] for k in keys} == {
        "to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight",
        "to_q_custom_diffusion.weight", "to_out_custom_diffusion.0.weight",
        "to_out_custom_diffusion.0.bias"}
    assert load_concepts(_base(tiny_model), result.out) == ["<c>"]
