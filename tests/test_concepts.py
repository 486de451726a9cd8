"""Loading run folders of every method (several at once), generate --concept, and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from compinv import load_concepts
from compinv.cli import main
from compinv.methods.custom_diffusion import CustomDiffusionConfig
from compinv.methods.dreambooth import DreamBoothConfig
from compinv.errors import CompinvError
from compinv.training import train
from helpers import cli_error, ti_config

FAST = dict(steps=1, resolution=32, checkpoint_every=0, save_every=0, validation_every=0, seed=1,
            lr=1e-2)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """One finished run of each method, each with its own token."""
    from helpers import write_concept_images

    tmp = tmp_path_factory.mktemp("runs")
    images = str(write_concept_images(tmp / "img"))
    model = str(tiny_model)
    ti = train(ti_config(tiny_model, images, tmp / "ti", token="<t>", steps=1))
    cd = train(CustomDiffusionConfig(model=model, images=images, token="<c>",
                                                      class_word="cat", out=str(tmp / "cd"), **FAST))
    lora = train(DreamBoothConfig(model=model, images=images, token="<l>", lora=True,
                                             class_word="dog", out=str(tmp / "lora"), **FAST))
    db = train(DreamBoothConfig(model=model, images=images, token="<d>",
                                           class_word="toy", out=str(tmp / "db"), **FAST))
    return {"ti": ti.out, "cd": cd.out, "lora": lora.out, "db": db.out, "images": images}


def _pipe(tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, prompt):
    return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("kind", ["ti", "cd", "lora", "db"])
def test_each_run_loads_and_changes_the_output(runs, tiny_model, kind):
    pipe = _pipe(tiny_model)
    before = _image(pipe, "a photo of a cat")
    tokens = load_concepts(pipe, runs[kind])
    assert tokens == [{"ti": "<t>", "cd": "<c>", "lora": "<l>", "db": "<d>"}[kind]]
    assert tokens[0] in pipe.tokenizer.get_vocab()
    if kind != "ti":  # TI changes only the token's rows; the others change the model itself
        assert not torch.allclose(before, _image(pipe, "a photo of a cat"))
    assert len(pipe.tokenizer) == pipe.text_encoder.get_input_embeddings().weight.shape[0]


def test_several_runs_load_together(runs, tiny_model):
    pipe = _pipe(tiny_model)
    tokens = load_concepts(pipe, [runs["ti"], runs["cd"], runs["lora"], runs["db"]])
    assert sorted(tokens) == ["<c>", "<d>", "<l>", "<t>"]
    # Every loaded token is live in the one text encoder: its row is the saved vector, and the
    # image of a prompt with all four differs from the same prompt with plain words.
    from safetensors.torch import load_file

    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    saved = load_file(str(runs["ti"] / "learned_embeds.safetensors"))["<t>"]
    assert torch.equal(table[pipe.tokenizer.convert_tokens_to_ids("<t>")], saved[0])
    together = _image(pipe, "<t> and <c> and <l> and <d>")
    assert not torch.allclose(together, _image(pipe, "cat and cat and cat and cat"))
    assert torch.equal(together, _image(pipe, "<t> and <c> and <l> and <d>"))


def test_runs_that_cannot_be_combined(runs, tiny_model):
    pipe = _pipe(tiny_model)
    with pytest.raises(CompinvError, match="both custom-diffusion runs"):
        load_concepts(pipe, [runs["cd"], runs["cd"]])
    load_concepts(pipe, runs["ti"])
    with pytest.raises(CompinvError, match="token '<t>' is already loaded"):
        load_concepts(pipe, runs["ti"])
    with pytest.raises(CompinvError, match="not a compinv run folder"):
        load_concepts(pipe, runs["images"])
    with pytest.raises(CompinvError, match="load the DreamBooth run first"):
        load_concepts(pipe, runs["db"])


@pytest.mark.parametrize("layout", [[], ["--box", "<c>=0.1,0.2,0.5,0.8", "--box", "<t>=0.6,0.2,0.95,0.8"]])
def test_generate_with_concepts(runs, tiny_model, tmp_path, capsys, layout):
    out = tmp_path / "gen"
    code = main(["generate", "--model", str(tiny_model), "--concept", str(runs["ti"]),
                 "--concept", str(runs["cd"]), "--prompt", "a <c> and a <t>", "--num-images", "1",
                 "--steps", "3", "--guided-steps", "1", "--height", "32", "--width", "32",
                 "--out", str(out), *layout])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "generation.json").read_text())
    assert sorted(record["tokens_loaded"]) == ["<c>", "<t>"]
    assert (out / "0000.png").is_file()
    assert (record["layout"] is not None) == bool(layout)


# ---- bad input -----------------------------------------------------------------------------
def _cd_argv(tiny_model, out, *extra):
    return ["train", "custom-diffusion", "--model", str(tiny_model), "--steps", "1",
            "--resolution", "32", "--out", str(out), *extra]


def test_class_images_folder_without_images(capsys, tiny_model, runs, tmp_path):
    (tmp_path / "classes").mkdir()
    (tmp_path / "classes" / "readme.txt").write_text("no pictures here")
    msg = cli_error(capsys, _cd_argv(tiny_model, tmp_path / "out", "--images", runs["images"],
                                      "--token", "<a>", "--class-word", "cat", "--prior-weight", "1",
                                      "--class-images", str(tmp_path / "classes")))
    assert "--class-images" in msg and "readable image" in msg


def test_concepts_file_with_flags_and_existing_token(capsys, tiny_model, runs, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"token": "<a>", "images": runs["images"], "class_word": "cat"}]))
    msg = cli_error(capsys, _cd_argv(tiny_model, tmp_path / "o", "--concepts", str(path),
                                      "--token", "<x>"))
    assert "--concepts replaces --token" in msg
    msg = cli_error(capsys, ["train", "dreambooth", "--model", str(tiny_model), "--images",
                              runs["images"], "--token", "cat", "--class-word", "cat", "--out",
                              str(tmp_path / "o2")])
    assert "already in the tokenizer's vocabulary" in msg
    msg = cli_error(capsys, ["train", "dreambooth", "--model", str(tiny_model), "--images",
                              runs["images"], "--token", "<a>", "--class-word", "cat", "--lora",
                              "--train-text-encoder", "--out", str(tmp_path / "o3")])
    assert "--lora with --train-text-encoder" in msg


@pytest.mark.parametrize("method, extra", [("custom-diffusion", ["--no-aug"]),
                                           ("dreambooth", ["--lora", "--lora-rank", "2"])])
def test_cli_trains_each_method(capsys, tiny_model, runs, tmp_path, method, extra):
    out = tmp_path / "run"
    code = main(["train", method, "--model", str(tiny_model), "--images", runs["images"],
                 "--token", "<x>", "--class-word", "cat", "--steps", "1", "--resolution", "32",
                 "--checkpoint-every", "0", "--out", str(out), *extra])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["method"] == method
    assert load_concepts(_pipe(tiny_model), out) == ["<x>"]
